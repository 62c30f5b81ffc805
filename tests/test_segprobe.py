"""The segmentation probe: mIoU against hand counts on tiny masks, the layouts and their bad data, the joint
augmentation, the features of each backbone family, and a short run under 1 and 2 processes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import main_segprobe
from data.segmentation import JointTransform, SegPairs, build_seg_dataset, shapes_pair
from models.dense import DenseFeatures, SegProbe
from models.resnet import create_resnet
from models.vit import create_vit
from utils.errors import UserError
from utils.miou import IGNORE, confusion, scores


def test_miou_and_pixel_accuracy_by_hand_with_the_ignore_index_and_an_absent_class():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    m = confusion(pred, target, num_classes=5)
    # labelled pixels: 6; correct: (0,0) (0,2) (0,3) (1,0) -> 4
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 (a 0 predicted 1) -> 1/3; class 1: TP 2, FP 1 -> 2/3;
    # class 2: TP 1, FN 1 -> 1/2; class 3: only predicted on an ignored pixel -> no union; class 4: absent -> left out
    out = scores(m)
    assert out["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert out["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 50])
    assert np.isnan(out["iou"][3]) and np.isnan(out["iou"][4])
    assert out["miou"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)


def test_the_joint_crop_and_flip_move_image_and_mask_together():
    img, mask = shapes_pair(3, True)
    t = JointTransform(32, (0.0,) * 3, (1.0,) * 3, train=True)
    for seed in range(5):
        x, m = t(img, mask, np.random.default_rng(seed))
        assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.long
        assert set(m.unique().tolist()) <= {0, 1, 2, 3}                      # nearest: no blended labels
    colour = torch.tensor(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    x, m = JointTransform(64, (0.0,) * 3, (1.0,) * 3, train=False)(img, mask)     # same size: untouched
    assert torch.allclose(x, colour) and torch.equal(m, torch.from_numpy(np.asarray(mask, dtype=np.int64)))


def write_folder(root, masks, sizes=None, classes=3):
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i, mask in enumerate(masks):
            size = (sizes or {}).get(i, mask.shape[::-1])
            Image.new("RGB", size, (i * 20, 0, 0)).save(root / split / "images" / f"{i}.jpg")
            Image.fromarray(mask.astype(np.uint8)).save(root / split / "masks" / f"{i}.png")


@pytest.mark.parametrize("case, message", [
    ("size", "is 4x4, its image"),
    ("class", "holds class 7, beyond the 3 classes"),
    ("lonely", "has no mask in"),
])
def test_bad_segmentation_data_is_one_line_naming_the_file(tmp_path, case, message):
    masks = [np.zeros((4, 4)), np.full((4, 4), 7 if case == "class" else 1)]
    write_folder(tmp_path, masks, sizes={0: (6, 6)} if case == "size" else None)
    if case == "lonely":
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / "images" / "extra.jpg")
    with pytest.raises(UserError, match=message):
        ds, _ = build_seg_dataset("folder", str(tmp_path), True, num_classes=3)
        for i in range(len(ds)):
            ds[i]


def test_voc_and_ade_layouts(tmp_path):
    voc = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for name, value in (("a", 1), ("b", 20)):
        Image.new("RGB", (5, 4)).save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(np.array([[value, IGNORE, 0, 0, 0]] * 4, np.uint8), mode="L").convert("P").save(
            voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    ds, classes = build_seg_dataset("voc", str(voc), True)
    assert classes == 21 and len(ds) == 2 and np.asarray(ds[1][1])[0, :2].tolist() == [20, IGNORE]
    ade = tmp_path / "ade"
    (ade / "images" / "training").mkdir(parents=True)
    (ade / "annotations" / "training").mkdir(parents=True)
    Image.new("RGB", (3, 1)).save(ade / "images" / "training" / "x.jpg")
    Image.fromarray(np.array([[0, 1, 150]], np.uint8)).save(ade / "annotations" / "training" / "x.png")
    ds, classes = build_seg_dataset("ade20k", str(ade), True)
    assert classes == 150 and np.asarray(ds[0][1]).tolist() == [[IGNORE, 0, 149]]     # 0 = other, ignored


def test_dense_features_of_a_vit_at_any_multiple_of_its_patch_and_of_a_resnet():
    vit = create_vit("vit-tiny", 16, 4, depth=2, embed_dim=32, num_heads=2, dynamic_img_size=True).eval()
    assert DenseFeatures(vit, "vit")(torch.randn(2, 3, 32, 48)).shape == (2, 32, 8, 12)   # beyond the 16 px grid
    four = DenseFeatures(vit, "vit", layers=2)(torch.randn(1, 3, 16, 16))
    assert four.shape == (1, 64, 4, 4)
    resnet = create_resnet("resnet18", cifar_stem=False).eval()
    f = DenseFeatures(resnet, "resnet")
    assert f.channels == 512 and f(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    probe = SegProbe(f, 5)
    assert probe(torch.randn(2, 3, 64, 64)).shape == (2, 5, 64, 64)
    with pytest.raises(UserError, match="--layers 4 is for ViTs"):
        DenseFeatures(resnet, "resnet", layers=4)


@pytest.mark.slow
def test_a_short_probe_run_under_one_and_two_processes(tmp_path, tiny_aps, torchrun):
    cfg = dict(arch="vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    torch.save({"model": tiny_aps().state_dict(), "model_config": cfg, "args": {}, "epoch": 1, "optimizer": {}},
               tmp_path / "aps.pth")
    argv = ["--pretrained", str(tmp_path / "aps.pth"), "--img-size", "32", "--batch-size", "32", "--epochs", "1",
            "--eval-every", "1", "--num-workers", "0", "--device", "cpu", "--eval-scales", "1", "1.5"]
    one = main_segprobe.main(main_segprobe.get_args_parser().parse_args(argv + ["--output-dir", str(tmp_path / "1")]))
    assert 0 < one["miou"] <= 100 and one["pixel_acc"] > 50                 # most pixels are background
    out = torchrun(29641, "main_segprobe.py", *argv, "--output-dir", str(tmp_path / "2"))
    assert out.returncode == 0, out.stderr[-2000:]
    two = json.loads((tmp_path / "2" / "log.jsonl").read_text().splitlines()[-1])
    assert two["miou"] == pytest.approx(one["miou"], abs=0.05) and two["pixel_acc"] == pytest.approx(
        one["pixel_acc"], abs=0.05)


class ViTDetLayout(torch.nn.Module):
    """detectron2's ViTDet backbone as its source lays it out, re-written here (global attention, no relative
    positions): no class token, no final norm, an absolute position embedding whose first (class) position is
    dropped and the rest read at the pre-training grid, blocks of norm1 / attn.qkv (with bias) / attn.proj /
    norm2 / mlp.fc1 / mlp.fc2, output [B, D, H, W]."""

    def __init__(self, dim, depth, heads, patch, grid, eps):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(b)

    def forward(self, x):
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)                   # [B, H, W, D]
        B, H, W, D = x.shape
        x = (x + self.pos_embed[:, 1:].reshape(1, H, W, D)).reshape(B, H * W, D)
        for b in self.blocks:
            q, k, v = b.attn.qkv(b.norm1(x)).reshape(B, H * W, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-2, -1) / (D // self.heads) ** 0.5, -1) @ v
            x = x + b.attn.proj(a.transpose(1, 2).reshape(B, H * W, D))
            x = x + b.mlp.fc2(torch.nn.functional.gelu(b.mlp.fc1(b.norm2(x))))
        return x.reshape(B, H, W, D).permute(0, 3, 1, 2)


def test_a_vit_exports_in_the_layout_vitdet_loads(tmp_path, tiny_aps, capsys):
    from tools import weights
    cfg = dict(arch="vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
    aps = tiny_aps()
    torch.save({"model": aps.state_dict(), "model_config": cfg, "args": {}, "epoch": 1, "optimizer": {}},
               tmp_path / "aps.pth")
    weights.main(weights.get_args_parser().parse_args(["convert", "--to", "vitdet", str(tmp_path / "aps.pth"),
                                                       str(tmp_path / "vitdet.pth")]))
    assert "4x4 pre-training grid" in capsys.readouterr().out
    saved = torch.load(tmp_path / "vitdet.pth", weights_only=True)["model"]
    assert all(k.startswith("backbone.net.") for k in saved)
    det = ViTDetLayout(32, 2, 2, 4, 4, eps=1e-5)
    det.load_state_dict({k[len("backbone.net."):]: v for k, v in saved.items()}, strict=True)   # every name, shape
    vit, x = aps.encoder.eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = vit.patch_embed(x) + vit.pos_embed                              # ours on the patch tokens alone
        for blk in vit.blocks:
            h = blk(h)
        ours = h.reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
        assert torch.allclose(det(x), ours, atol=1e-5)


def test_segmentation_evaluation_syncs_once_per_pass_not_per_batch(device_guard):
    from methods.segment import segment_eval
    from test_gpu_paths import META, syncs_of
    vit = create_vit("vit-tiny", 16, 4, depth=1, embed_dim=32, num_heads=2, dynamic_img_size=True)
    probe = SegProbe(DenseFeatures(vit, "vit"), 3).to(META)
    loader = lambda n: [(torch.zeros(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)) for _ in range(n)]  # noqa
    one = syncs_of(device_guard, lambda: segment_eval(probe, loader(1), META, None, 3, scales=(1.0, 1.5)))
    three = syncs_of(device_guard, lambda: segment_eval(probe, loader(3), META, None, 3, scales=(1.0, 1.5)))
    assert one == three <= 1, device_guard.syncs
