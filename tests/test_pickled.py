"""Whole-module pickles (the reference's fine-tuned files) read without running anything: the genuine article
gives the original's logits, hostile files are refused before unpickling, every entry point takes them."""
import functools
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import main_finetune
import main_lincls
from models.loading import describe_weights, load_backbone, load_fine_tuned
from models.pickled import pickle_globals, read_pickle_bytes
from tools import weights as weights_tool
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = ["--dataset", "digits", "--num-workers", "0", "--batch-size", "64"]


@pytest.mark.parametrize("img_size, patch", [(32, 2), (224, 16)])
def test_a_genuine_module_pickle_gives_the_original_logits(tmp_path, reference_classifier, img_size, patch):
    path = tmp_path / "finetuned.pth"
    original = reference_classifier(path, img_size, patch, classes=7)
    assert "module.model" not in sys.modules                     # the reader cannot import the class: it is gone
    names = set(pickle_globals(read_pickle_bytes(str(path))))
    assert {"module.model.Vit", "timm.models.vision_transformer.Block", "torch.nn.modules.conv.Conv2d",
            "builtins.set", "torch.FloatStorage", "torch._utils._rebuild_parameter"} <= names
    ours, cfg = load_fine_tuned(str(path))
    assert (cfg["patch_size"], cfg["img_size"], cfg["num_classes"], cfg["num_heads"]) == (patch, img_size, 7, 2)
    x = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), original(x), atol=1e-5)
        features = load_backbone(str(path)).eval()(x)               # the backbone: the head's input
        assert torch.allclose(ours.head(features), original(x), atol=1e-5)


class System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Eval(System):
    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


class Popen(System):
    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.marker)],)


def hostile(kind: str, folder, reference_classifier):
    """A file of `kind` that would touch folder/ran if unpickled the usual way; returns (path, marker)."""
    marker, path = folder / "ran", folder / f"{kind}.pth"
    if kind == "reduce-os-system":
        torch.save({"model": System(marker)}, path)
    elif kind == "builtins-eval":
        torch.save(Eval(marker), path)
    elif kind == "nested-popen":                                 # deep inside an allowlisted model's state
        reference_classifier(path, extra={"hooks": [{"on_load": Popen(marker)}]})
    elif kind == "smuggled-partial":
        reference_classifier(path, hook=functools.partial(os.system, f"touch {marker}"))
    elif kind == "smuggled-function":                           # a function under an allowlisted module path
        from timm.layers import create_act_layer
        reference_classifier(path, hook=create_act_layer)
    elif kind == "truncated-zip":
        reference_classifier(path)
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "legacy-pickle":
        torch.save(System(marker), path, _use_new_zipfile_serialization=False)
    return path, marker


HOSTILE = {"reduce-os-system": "posix.system", "builtins-eval": "builtins.eval", "nested-popen": "subprocess.Popen",
           "smuggled-partial": "functools.partial", "smuggled-function": "create_act_layer",
           "truncated-zip": "truncated", "legacy-pickle": "legacy (non-zip) pickle"}
ENTRIES = {"finetune-eval": (main_finetune, lambda f: DIGITS + ["--eval", "--resume", f]),
           "finetune-weights": (main_finetune, lambda f: DIGITS + ["--epochs", "1", "--pretrained-weights", f]),
           "lincls": (main_lincls, lambda f: DIGITS + ["--epochs", "1", "--pretrained", f])}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_files_are_refused_in_one_line_and_never_run(kind, entry, tmp_path, reference_classifier,
                                                             monkeypatch, capsys):
    path, marker = hostile(kind, tmp_path, reference_classifier)
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's notes")
    monkeypatch.chdir(tmp_path)
    script, argv = ENTRIES[entry]
    with pytest.raises(SystemExit) as e:
        script.main(script.get_args_parser().parse_args(argv(str(path)) + ["--output-dir", str(out)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert HOSTILE[kind] in err[0] and "Traceback" not in err[0], err
    assert not marker.exists()
    assert (out / "keep.txt").read_text() == "an earlier run's notes" and not (out / "checkpoint.pth").exists()


def test_the_reader_refuses_other_pickled_modules_and_names_what_it_reads(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "seq.pth")
    with pytest.raises(UserError, match="pickled torch.nn.modules.container.Sequential.*refuse"):
        load_backbone(str(tmp_path / "seq.pth"))


def test_eval_of_a_released_classifier_reads_its_shape_off_the_file(tmp_path, reference_classifier, capsys):
    path = tmp_path / "released.pth"
    original = reference_classifier(path, classes=10)
    run = lambda *flags: main_finetune.main(main_finetune.get_args_parser().parse_args(  # noqa: E731
        DIGITS + ["--eval", "--resume", str(path), "--output-dir", str(tmp_path / "out"), *flags]))
    metrics = run()
    # the same test images through the original module: the same accuracy
    from augment.pil import pil_pipeline
    from augment.recipes import eval_view
    from data import build_dataset, build_eval_loader, get_preset
    preset = get_preset("digits")
    loader = build_eval_loader(build_dataset("digits", train=False,
                                             transform=pil_pipeline(eval_view(preset, 32, *preset.finetune_stats))),
                               64, 0, torch.device("cpu"))
    with torch.no_grad():
        hits = sum((original(x).argmax(1) == y).sum().item() for x, y in loader)
    assert metrics["test_acc1"] == pytest.approx(100 * hits / len(loader.dataset))
    assert "released fine-tuned classifier" in capsys.readouterr().out
    for flags, named in ((["--patch-size", "4"], "--patch-size 2"), (["--arch", "vit-base"], "vit-base"),
                         (["--img-size", "64"], "--img-size 32")):
        with pytest.raises(SystemExit):
            run(*flags)
        assert named in capsys.readouterr().err
    other = tmp_path / "seven.pth"
    reference_classifier(other, classes=7)
    with pytest.raises(UserError, match="classifies 7 classes, the dataset has 10; pass the --dataset"):
        load_fine_tuned(str(other), num_classes=10)


def test_fine_tuning_continues_from_a_released_classifier(tmp_path, reference_classifier, capsys):
    path = tmp_path / "released.pth"
    reference_classifier(path)
    metrics = main_finetune.main(main_finetune.get_args_parser().parse_args(
        DIGITS + ["--epochs", "1", "--pretrained-weights", str(path), "--output-dir", str(tmp_path / "out")]))
    assert 0 <= metrics["test_acc1"] <= 100
    assert "(reference-aps-classifier); dropped 2 head keys (fc)" in capsys.readouterr().out
    saved = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["model_config"]
    assert saved["num_heads"] == 2 and saved["norm_eps"] == 1e-6      # read off the tree (timm's Block default)


def test_convert_and_inspect_a_released_classifier(tmp_path, reference_classifier, capsys):
    path, out = tmp_path / "released.pth", tmp_path / "plain.pth"
    original = reference_classifier(path, classes=5)
    tool = lambda *argv: weights_tool.main(weights_tool.get_args_parser().parse_args(list(argv)))  # noqa: E731
    tool("convert", str(path), str(out))
    said = capsys.readouterr().out
    cfg = json.loads(said.split("create_vit(**", 1)[1].rstrip().removesuffix(")"))
    assert cfg["num_classes"] == 5 and cfg["norm_eps"] == 1e-6 and cfg["final_norm_eps"] == 1e-5
    from models.vit import create_vit
    model = create_vit(**cfg)
    model.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), original(x), atol=1e-5)
    capsys.readouterr()
    tool("inspect", str(path))
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["format"] == "reference-aps-classifier" and lines["num_classes"] == "5"
    assert (lines["patch_size"], lines["img_size"], lines["num_heads"], lines["depth"]) == ("2", "32", "2", "2")
    assert int(lines["params"]) == sum(p.numel() for p in original.parameters())
    assert lines["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert describe_weights(str(out))["format"] == "timm-vit"


def test_torch_hub_gives_the_released_classifier(tmp_path, reference_classifier):
    import hubconf
    path = tmp_path / "small.pth"
    original = reference_classifier(path, dim=384, heads=6)
    x = torch.randn(2, 3, 32, 32)
    model = hubconf.aps_vit_small(weights=str(path), classifier=True).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-5)
    with pytest.raises(UserError, match="not vit-tiny"):
        hubconf.aps_vit_tiny(weights=str(path), classifier=True)


def test_no_code_loads_with_weights_only_false():
    needle = "weights_only" + "=False"
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "output")]
        for f in files:
            if f.endswith((".py", ".md", ".sh")):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                found += [f"{f}:{i + 1}" for i, line in enumerate(text.splitlines()) if needle in line.replace(" ", "")]
    assert not found, found


def test_a_legacy_pickle_and_a_plain_zip_are_refused_in_one_line(tmp_path):
    import zipfile
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.pth").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="legacy"):
        load_backbone(str(tmp_path / "legacy.pth"))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    from models.pickled import read_module_tree
    with pytest.raises(UserError, match="no data.pkl"):
        read_module_tree(str(tmp_path / "other.zip"))
