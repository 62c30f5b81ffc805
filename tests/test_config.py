"""--config FILE.yaml (utils/config.py): a config file is the same flags on the command line, the command line wins,
a run's own config.yaml reruns it bit for bit, and a bad key or value stops with one line."""
import pytest
import torch
import yaml

import main_moco
import main_pretrain
from tools.same_runs import compare_checkpoint
from utils.config import plain

FLAGS = {"dataset": "digits", "nepoch": 1, "batch-size": 512, "warmup-epochs": 0, "nsampling": 2,
         "num-workers": 0, "knn-every": 0, "device": "cpu", "crop-scale": [0.2, 1.0], "temperature": 0.2}


def as_argv(flags: dict) -> list:
    out = []
    for k, v in flags.items():
        out += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
    return out


def run(argv):
    args = main_pretrain.get_args_parser().parse_args(argv)
    main_pretrain.main(args)
    return args


def resolved(args) -> dict:
    return {k: plain(v) for k, v in vars(args).items() if k not in ("config", "output_dir")}


@pytest.mark.slow
def test_a_config_file_is_the_same_flags_and_a_runs_own_config_reruns_it_exactly(tmp_path, tiny_flags):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(FLAGS))
    by_flags = run(tiny_flags + as_argv(FLAGS) + ["--output-dir", str(tmp_path / "flags")])
    by_file = run(tiny_flags + ["--config", str(config), "--output-dir", str(tmp_path / "file")])
    assert resolved(by_file) == resolved(by_flags)
    assert by_file.crop_scale == [0.2, 1.0] and by_file.temperature == 0.2 and by_file.epochs == 1
    ckpt = lambda d: str(tmp_path / d / "checkpoint.pth")  # noqa: E731
    assert compare_checkpoint(ckpt("flags"), ckpt("file")) == []               # every tensor, bit for bit
    saved = yaml.safe_load((tmp_path / "file" / "config.yaml").read_text())
    assert saved["temperature"] == 0.2 and saved["arch"] == "vit-tiny" and saved["base_lr"] == by_file.base_lr
    again = run(["--config", str(tmp_path / "file" / "config.yaml"), "--output-dir", str(tmp_path / "again")])
    assert resolved(again) == resolved(by_file)
    assert compare_checkpoint(ckpt("file"), ckpt("again")) == []


def test_the_command_line_wins_over_the_config_file(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("batch_size: 64\nnepoch: 3\nknn-every: 2\n")
    args = main_pretrain.get_args_parser().parse_args(["--config", str(config), "--nepoch", "5"])
    assert (args.batch_size, args.epochs, args.knn_every) == (64, 5, 2)          # dest, alias and option names
    moco = tmp_path / "moco.yaml"
    moco.write_text(f"wd: 0.001\nenable-multicrop: true\ndata_dir: {tmp_path}\n")    # the positional too
    args = main_moco.get_args_parser().parse_args(["--config", str(moco)])
    assert args.weight_decay == 0.001 and args.enable_multicrop is True and args.data_dir == str(tmp_path)


@pytest.mark.parametrize("body, said", [
    ("bogus: 1\n", "unknown key 'bogus', not a flag of this script"),
    ("batch-size: 0\n", "--batch-size 0 must be positive"),
    ("sampling-ratio: 1.5\n", "--sampling-ratio 1.5 must lie in (0, 1)"),
    ("arch: vit-huge\n", "--arch 'vit-huge' is not one of vit-tiny, vit-small, vit-base"),
    ("dry-run: 3\n", "--dry-run is a switch: give true or false"),
    ("crop-scale: 0.3\n", "--crop-scale takes a list of values"),
    ("- just\n- a list\n", "holds a list, not flag: value lines"),
    ("batch-size: [1\n", "is not readable YAML"),
], ids=["unknown-key", "out-of-domain", "fraction", "choice", "switch", "list", "not-a-mapping", "broken-yaml"])
def test_a_bad_config_file_exits_2_with_one_line(tmp_path, capsys, body, said):
    config = tmp_path / "bad.yaml"
    config.write_text(body)
    with pytest.raises(SystemExit) as e:
        main_pretrain.get_args_parser().parse_args(["--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and said in err[0] and str(config) in err[0], err
