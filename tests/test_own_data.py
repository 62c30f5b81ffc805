"""Your own images: an unlabelled nested folder of mixed formats and modes pretrains APS and MoCo on both data
paths; a file list of the same images trains bit for bit the same; file-name subsets; unreadable files."""
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
    assert (tmp_path / "aps" / "image_list.txt").read_text().count("\n") == 21          # the root line + 20


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
