"""Your own images: an unlabelled nested folder of mixed formats and modes pretrains APS and MoCo on both data
paths; a file list of the same images trains bit for bit the same; file-name subsets; unreadable files."""
import json
import os

import numpy as np
import pytest
import torch

import main_moco
import main_pretrain
from data.datasets import build_dataset
from data.files import NO_LABEL, cached_scan, read_rgb, to_rgb
from utils.errors import UserError

PRE = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
       "--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim", "32", "--img-size", "16",
       "--batch-size", "8", "--nepoch", "1", "--warmup-epochs", "1", "--num-workers", "0", "--device", "cpu"]
MOCO = ["-a", "resnet18", "--img-size", "16", "--batch-size", "8", "--moco-k", "16", "--moco-dim", "8",
        "--mlp-hidden-dim", "16", "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--bn-splits", "2",
        "--enable-multicrop", "--num-mini-crops", "2", "--mini-crop-size", "8"]
MODES = ("jpg-rgb", "jpg-grey", "jpg-cmyk", "png-grey", "png-palette", "png-rgba", "png-16bit", "webp", "bmp", "tiff")


def picture(seed, h=20, w=24):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 9 + rng.randint(0, 99)) % 256, (yy * 11 + rng.randint(0, 99)) % 256,
                     ((xx + yy) * 5) % 256], -1).astype(np.uint8)


def save(path, kind, seed):
    from PIL import Image
    rgb = Image.fromarray(picture(seed))
    img = {"jpg-rgb": rgb, "jpg-grey": rgb.convert("L"), "jpg-cmyk": rgb.convert("CMYK"), "png-grey": rgb.convert("L"),
           "png-palette": rgb.convert("P"), "png-rgba": rgb.convert("RGBA"), "webp": rgb, "bmp": rgb, "tiff": rgb,
           "png-16bit": Image.fromarray(picture(seed)[..., 0].astype(np.uint16) * 257)}[kind]
    img.save(path)


@pytest.fixture
def own_folder(tmp_path):
    """20 images, two of each kind, in nested folders of no particular layout."""
    root = tmp_path / "photos"
    for i, kind in enumerate(MODES * 2):
        folder = root / ("trip" if i % 3 else "misc/old") / ("x" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        save(folder / f"{kind}-{i}.{kind.split('-')[0]}", kind, i)
    return root


def run(module, argv):
    return module.main(module.get_args_parser().parse_args(argv))


def test_every_mode_becomes_rgb_without_clipping(own_folder):
    from PIL import Image
    names = cached_scan(str(own_folder))
    assert len(names) == 20
    for name in names:
        img = read_rgb(os.path.join(own_folder, name))
        assert img.mode == "RGB" and img.size == (24, 20)
    sixteen = next(n for n in names if "16bit" in n)
    grey = np.asarray(read_rgb(os.path.join(own_folder, sixteen)))[..., 0]
    seed = int(sixteen.split("-")[-1].split(".")[0])
    assert np.array_equal(grey, picture(seed)[..., 0])                   # x * 257 / 65535 * 255 = x
    assert np.asarray(to_rgb(Image.new("I;16", (2, 2), 65535))).max() == 255


def test_the_list_is_sorted_cached_and_not_rescanned(own_folder, tmp_path, monkeypatch):
    import data.files as files
    first = cached_scan(str(own_folder), str(tmp_path / "out"))
    assert first == sorted(first) and (tmp_path / "out" / files.LIST_CACHE).exists()
    monkeypatch.setattr(files, "scan_images", lambda root: pytest.fail("rescanned"))
    assert cached_scan(str(own_folder), str(tmp_path / "out")) == first


def test_both_data_paths_decode_every_file_to_the_same_rgb_image(own_folder):
    """The device path's workers decode what the GPU does not (every non-JPEG, CMYK JPEGs) exactly as the CPU path
    does; JPEGs decoded in one batched call (here by torchvision on the CPU) agree with PIL's decoder."""
    from data.device_loaders import EncodedImages, FolderDeviceLoader
    folder = build_dataset("folder", str(own_folder))
    encoded = EncodedImages(folder, decode=False)
    loader = FolderDeviceLoader(folder, 4, 0, torch.device("cpu"), None, num_workers=0, rank=0, world=1,
                                worker_decode=False)
    for i, (path, _) in enumerate(folder.samples):
        data, _, _ = encoded[i]
        device = loader.decode([data], [i])[0]
        cpu = torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1)
        gap = (device.int() - cpu.int()).abs().max().item()
        if data.dim() == 1:                                             # JPEG bytes: the batched decoder
            assert os.path.basename(path).startswith("jpg-") and "cmyk" not in path and gap <= 2, (path, gap)
        else:
            assert gap == 0, path


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cpu", "device"])
def test_an_unlabelled_folder_pretrains_aps_and_moco(own_folder, tmp_path, path):
    aps = run(main_pretrain, PRE + ["--dataset", "folder", "--data-root", str(own_folder), "--data-path", path,
                                    "--output-dir", str(tmp_path / "aps")])
    moco = run(main_moco, MOCO + ["--dataset", "folder", "--data-root", str(own_folder), "--data-path", path,
                                  "--output-dir", str(tmp_path / "moco")])
    assert np.isfinite(aps["train_loss"]) and np.isfinite(moco["train_loss"])
    assert "knn_top1" not in aps
    assert "no kNN was run" in (tmp_path / "aps" / "report.md").read_text()
    assert (tmp_path / "aps" / "image_list.txt").read_text().count("\n") == 22   # the root line, 20, the count


@pytest.mark.slow
def test_a_file_list_trains_bit_for_bit_like_the_folder_and_knn_data_monitors_it(own_folder, tmp_path):
    from tools.same_runs import compare_checkpoint
    names = cached_scan(str(own_folder))
    listed = tmp_path / "lists"
    listed.mkdir()
    (listed / "train.txt").write_text("".join(f"{os.path.join('..', 'photos', n)}\n" for n in names))
    common = PRE + ["--knn-every", "1", "--knn-data", "digits"]
    a = run(main_pretrain, common + ["--dataset", "folder", "--data-root", str(own_folder), "--output-dir",
                                     str(tmp_path / "folder")])
    b = run(main_pretrain, common + ["--dataset", "filelist", "--data-root", str(listed / "train.txt"),
                                     "--output-dir", str(tmp_path / "list")])
    assert compare_checkpoint(str(tmp_path / "folder" / "checkpoint.pth"), str(tmp_path / "list" / "checkpoint.pth"),
                              ignore=("args", "metrics", "start_metrics")) == []
    assert a["knn_top1"] == b["knn_top1"] > 0


def test_a_labelled_list_maps_labels_through_the_training_list(tmp_path, own_folder):
    names = cached_scan(str(own_folder))
    (tmp_path / "train.txt").write_text("".join(f"{own_folder / n} {['cat', 'dog'][i % 2]}\n"
                                                for i, n in enumerate(names)))
    (tmp_path / "val.txt").write_text(f"{own_folder / names[0]} dog\n")
    train = build_dataset("filelist", str(tmp_path), train=True)
    val = build_dataset("filelist", str(tmp_path), train=False)
    assert train.classes == ["cat", "dog"] and train.targets[:2] == [0, 1] and val.targets == [1]
    unlabelled = build_dataset("folder", str(own_folder))
    assert set(unlabelled.targets) == {NO_LABEL} and unlabelled.classes == []


def test_a_subset_of_file_names_selects_what_the_same_indices_select(tmp_path, make_folder):
    from data.subsets import file_names, read_subset_file
    make_folder(tmp_path / "data", classes=3, per_class=4)
    dataset = build_dataset("imagefolder", str(tmp_path / "data"))
    chosen = [1, 5, 10]
    by_index = tmp_path / "indices.txt"
    by_index.write_text("".join(f"{i}\n" for i in chosen))
    by_name = tmp_path / "names.txt"                                   # SimCLR's style: class/file, or the file alone
    by_name.write_text("class0/1.jpg\nclass1/1.jpg\nclass2/2.jpg\n")
    names = file_names(dataset)
    assert read_subset_file(str(by_index), len(dataset), names) == chosen
    assert read_subset_file(str(by_name), len(dataset), names) == chosen
    (tmp_path / "ambiguous.txt").write_text("1.jpg\n")
    with pytest.raises(UserError, match="names 3 training files"):
        read_subset_file(str(tmp_path / "ambiguous.txt"), len(dataset), names)
    (tmp_path / "stranger.txt").write_text("class0/1.jpg\nn01440764_10026.JPEG\n")
    with pytest.raises(UserError, match="line 2: 'n01440764_10026.JPEG' is not a file of the training set"):
        read_subset_file(str(tmp_path / "stranger.txt"), len(dataset), names)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_skip_bad_images_logs_the_file_and_trains_on_a_stand_in(own_folder, tmp_path, path):
    broken = own_folder / "trip" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    argv = PRE + ["--dataset", "folder", "--data-root", str(own_folder), "--data-path", path, "--output-dir",
                  str(tmp_path / "out")]
    with pytest.raises(SystemExit):                                   # by default: one line naming it, exit 2
        run(main_pretrain, argv)
    metrics = run(main_pretrain, argv + ["--skip-bad-images"])
    assert np.isfinite(metrics["train_loss"])
    assert str(broken) in (tmp_path / "out" / "bad_images.txt").read_text()


# ---------------------------------------------------------------- the data check
def check(root, *flags):
    from tools import check_data
    return check_data.main(check_data.get_args_parser().parse_args([str(root), "--workers", "0", *flags]))


def test_the_data_check_finds_nothing_in_a_clean_set(tmp_path, make_folder, own_folder):
    make_folder(tmp_path / "clean", classes=3, per_class=3)
    result = check(tmp_path / "clean")
    assert result["layout"] == "imagefolder" and result["clean"], result["defects"]
    assert result["stats"]["files"] == {"train": 9, "val": 9} and result["stats"]["classes"] == {"train": 3, "val": 3}
    mixed = check(own_folder)
    assert mixed["layout"] == "folder" and mixed["clean"], mixed["defects"]
    s = mixed["stats"]
    assert (s["grey"], s["cmyk"], s["alpha"], s["sixteen_bit"]) == (6, 2, 2, 2)   # grey: 2 + 2 L, 2 16-bit
    assert s["width"]["median"] == 24 and s["height"]["max"] == 20


def test_the_data_check_finds_each_planted_defect(tmp_path, make_folder, capsys):
    import shutil
    from PIL import Image
    root = tmp_path / "data"
    make_folder(root, classes=2, per_class=3)
    (root / "train" / "class0" / "0.jpg").write_bytes(b"\xff\xd8 not a jpeg")                 # undecodable
    (root / "train" / "class1" / "empty.jpg").write_bytes(b"")                              # empty
    Image.new("RGB", (4, 40)).save(root / "train" / "class1" / "thin.png")                  # tiny
    shutil.copy(root / "train" / "class1" / "1.jpg", root / "val" / "class0" / "copy.jpg")   # duplicate
    (root / "val" / "class9").mkdir()                                                       # class disagreement
    shutil.copy(root / "val" / "class0" / "1.jpg", root / "val" / "class9" / "x.jpg")
    state = tmp_path / "state.jsonl"
    result = check(root, "--state", str(state), "--out", str(tmp_path / "report.json"))
    d = result["defects"]
    assert d["undecodable"] == [str(root / "train" / "class0" / "0.jpg")]
    assert d["empty"] == [str(root / "train" / "class1" / "empty.jpg")]
    assert d["tiny"] == [str(root / "train" / "class1" / "thin.png")]
    assert [str(root / "train" / "class1" / "1.jpg"), str(root / "val" / "class0" / "copy.jpg")] in d["duplicates"]
    assert d["class_disagreement"] == {"only in val": ["class9"]} and not result["clean"]
    assert "DEFECT undecodable: 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["defects"] == d
    lines = state.read_text().count("\n")                                   # resumable: nothing checked twice
    assert check(root, "--state", str(state))["defects"] == d and state.read_text().count("\n") == lines


def test_an_imagefolder_whose_splits_disagree_on_classes_stops_before_training(tmp_path, make_folder):
    make_folder(tmp_path / "data", classes=3, per_class=2)
    import shutil
    shutil.rmtree(tmp_path / "data" / "val" / "class1")
    with pytest.raises(UserError, match="lacks 1 of its classes \\(class1\\).*class indices would not match"):
        build_dataset("imagefolder", str(tmp_path / "data"), train=False)


# ---------------------------------------------------------------- shards
def make_shards(src, out, *flags):
    from tools import make_shards as tool
    return tool.main(tool.get_args_parser().parse_args([str(src), str(out), *flags]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cpu", "device"])
def test_shards_train_bit_for_bit_like_their_folder_and_resume_mid_epoch_exactly(own_folder, tmp_path, monkeypatch,
                                                                               path):
    import signal
    from tools.same_runs import compare_checkpoint
    made = make_shards(own_folder, tmp_path / "shards", "--per-shard", "7")
    assert made["train"]["samples"] == 20 and made["train"]["shards"] == 3
    flags = PRE + ["--nepoch", "2", "--data-path", path, "--print-freq", "1"]
    run(main_pretrain, flags + ["--dataset", "folder", "--data-root", str(own_folder), "--output-dir",
                                str(tmp_path / "folder")])
    sharded = flags + ["--dataset", "shards", "--data-root", str(tmp_path / "shards")]
    run(main_pretrain, sharded + ["--output-dir", str(tmp_path / "sharded")])
    reference = str(tmp_path / "sharded" / "checkpoint.pth")
    assert compare_checkpoint(str(tmp_path / "folder" / "checkpoint.pth"), reference,
                              ignore=("args", "metrics", "start_metrics")) == []
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):                          # the scheduler's SIGTERM, mid-way through epoch 2
        calls["n"] += 1
        if calls["n"] == 10:                                  # (8 steps an epoch: 2 batches x K = 4)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(SystemExit) as e:
        run(main_pretrain, sharded + ["--output-dir", str(tmp_path / "preempted")])
    assert e.value.code == 0 and load(tmp_path / "preempted" / "checkpoint.pth")["batches_done"] == 1
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    run(main_pretrain, sharded + ["--output-dir", str(tmp_path / "preempted")])
    assert compare_checkpoint(str(tmp_path / "preempted" / "checkpoint.pth"), reference,
                              ignore=("args", "metrics", "start_metrics", "rng", "batches_done")) == []


def test_labelled_shards_keep_their_splits_classes_and_names(tmp_path, make_folder):
    make_folder(tmp_path / "data", classes=3, per_class=3)
    made = make_shards(tmp_path / "data", tmp_path / "shards", "--per-shard", "4")
    assert made["train"]["classes"] == made["val"]["classes"] == 3
    folder = build_dataset("imagefolder", str(tmp_path / "data"), train=False)
    sharded = build_dataset("shards", str(tmp_path / "shards"), train=False)
    assert sharded.classes == folder.classes and sharded.targets == folder.targets
    assert [n for n, _ in sharded.samples] == [os.path.relpath(p, tmp_path / "data" / "val") for p, _ in folder.samples]
    for i in (0, 8):
        assert np.array_equal(np.asarray(sharded[i][0]), np.asarray(folder[i][0]))
    part = sharded.subset([2, 7])
    assert np.array_equal(np.asarray(part[1][0]), np.asarray(folder[7][0])) and part.targets == [0, 2]


@pytest.mark.parametrize("damage", ["truncated", "other-index", "missing"])
def test_a_damaged_shard_stops_with_one_line(own_folder, tmp_path, damage):
    import shutil
    make_shards(own_folder, tmp_path / "a", "--per-shard", "7")
    shard = tmp_path / "a" / "shard-00001.tar"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:3000])
    elif damage == "other-index":                              # the same sizes, other members: swap two shards
        make_shards(own_folder, tmp_path / "b", "--per-shard", "10")
        shutil.copy(tmp_path / "b" / "index.json", tmp_path / "a" / "index.json")
    else:
        shard.unlink()
    expected = {"truncated": "truncated or replaced", "other-index": "", "missing": "is missing"}[damage]
    with pytest.raises(UserError, match=f"shards: .*{expected}.*make the shards again|shards: .*{expected}"):
        build_dataset("shards", str(tmp_path / "a"))


@pytest.mark.slow
def test_a_labelled_file_list_fine_tunes_and_evaluates_on_its_val_list(own_folder, tmp_path):
    import main_finetune
    names = cached_scan(str(own_folder))
    lists = tmp_path / "lists"
    lists.mkdir()
    lines = [f"{own_folder / n} {'odd' if i % 2 else 'even'}\n" for i, n in enumerate(names)]
    (lists / "train.txt").write_text("".join(lines[:16]))
    (lists / "val.txt").write_text("".join(lines[16:]))
    metrics = run(main_finetune, ["--dataset", "filelist", "--data-root", str(lists), "--arch", "vit-tiny", "--depth",
                                  "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4", "--img-size", "16",
                                  "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "1", "--num-workers", "0",
                                  "--device", "cpu", "--output-dir", str(tmp_path / "ft")])
    assert 0.0 <= metrics["test_acc1"] <= 100.0 and np.isfinite(metrics["train_loss"])
    ckpt = load(tmp_path / "ft" / "checkpoint.pth")
    assert ckpt["model"]["head.weight"].shape[0] == 2                  # the list's two classes
