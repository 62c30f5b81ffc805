"""--logger: the trackers get the run's scalars, config, pictures and final metrics, and a resumed run continues
the same tracker run. Offline, with the real libraries: wandb's offline mode (its run file read back) and MLflow's
file store (read back through its client). The runs are the loop's toy with the scripts' reporter (the trackers
sit in the loop's RunLog, which every script shares); the flag itself is tried on main_moco.py."""
import json
import struct

import pytest

import main_moco
from test_flags import TINY

BASE = ["--num-workers", "0", "--device", "cpu", *TINY["main_moco"]]


def train(tmp_path, *argv):
    args = main_moco.get_args_parser().parse_args(BASE + ["--output-dir", str(tmp_path / "run"), *argv])
    return main_moco.main(args)


def toy_run(make_trainer, folder, epochs: int, loggers: tuple) -> dict:
    """The loop's toy (a Linear(2, 1), 5 batches an epoch, a progress line per batch) with the run's reporter: the
    trackers see what a script's run gives them; a second call with more epochs resumes the first."""
    from utils.report import RunReporter

    def steps(model, batch):
        yield model(batch[0]).pow(2).mean(), {}

    folder.mkdir(exist_ok=True)
    flags = {"moco_k": 16, "epochs": epochs, "logger": ",".join(loggers)}
    trainer, _ = make_trainer(folder, steps, K=1, epochs=epochs, lr_log=[], reporter=RunReporter(str(folder)),
                              loggers=loggers, flags=flags)
    return trainer.finish(trainer.fit())


def log_records(path) -> list:
    """The records of a wandb run file, read as its format is written (no wandb reader involved): a 7-byte header
    (":W&B", magic, version), then LevelDB-log blocks of 32 KiB holding 7-byte-headed chunks (crc, length, type:
    1 whole, 2 first, 3 middle, 4 last)."""
    data, pos, out, part, block = path.read_bytes(), 7, [], b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:                                                   # the block's zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            out.append(part)
    return out


def wandb_records(folder) -> tuple:
    """(history rows, config, summary) of the offline runs under `folder`/wandb, from their run files."""
    from wandb.proto import wandb_internal_pb2
    history, config, summary = [], {}, {}
    for path in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        for data in log_records(path):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            key = lambda i: i.key or "/".join(i.nested_key)                    # noqa: E731
            if kind == "history":
                history.append({key(i): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "config":
                config.update({key(i): json.loads(i.value_json) for i in rec.config.update})
            elif kind == "summary":
                summary.update({key(i): json.loads(i.value_json) for i in rec.summary.update})
    return history, config, summary


def test_mlflow_gets_every_scalar_the_config_the_files_and_a_resume_continues_its_run(tmp_path, monkeypatch,
                                                                                      make_trainer):
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    toy_run(make_trainer, tmp_path / "run", 1, ("tensorboard", "mlflow"))
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri="file:" + str(tmp_path / "run" / "mlruns"))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["moco_k"] == "16" and run.data.params["epochs"] == "1"
    losses = client.get_metric_history(run_id, "train/loss")
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [m.step for m in losses] == [1, 2, 3, 4, 5]                              # a progress line per step
    assert client.get_metric_history(run_id, "final/train_loss")[0].value == pytest.approx(logged[-1]["train_loss"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"curves.png", "report.md", "config.yaml"} <= artifacts
    toy_run(make_trainer, tmp_path / "run", 2, ("tensorboard", "mlflow"))              # auto-resume, one more epoch
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"] == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 11)) and client.get_run(run_id).info.status == "FINISHED"


def test_wandb_offline_gets_the_scalars_config_and_summary_and_a_resume_keeps_its_id(tmp_path, monkeypatch,
                                                                                     make_trainer):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    toy_run(make_trainer, tmp_path / "run", 1, ("wandb",))
    first = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]
    history, config, summary = wandb_records(tmp_path / "run")
    assert config["moco_k"] == 16 and config["logger"] == "wandb"                     # the resolved flags
    assert any("train/loss" in row and "global_step" in row for row in history)
    assert summary["train_loss"] == pytest.approx(json.loads(
        (tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["train_loss"])
    assert not (tmp_path / "run" / "tensorboard").exists()                              # only what was asked for
    toy_run(make_trainer, tmp_path / "run", 2, ("wandb",))
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"] == first
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(first) for r in runs)                # the same run, continued


def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        train(tmp_path, "--epochs", "1", "--logger", "tensorboard,wandb")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --logger wandb needs the wandb package, which is not installed; pip "
                                         "install -r requirements-extras.txt (or pip install wandb)"]
    assert not (tmp_path / "run").exists()                                             # nothing written


def test_every_scripts_logger_flag_reaches_the_loop():
    import importlib

    from engine import TrainSettings
    from test_flags import SCRIPTS
    for script in SCRIPTS:
        args = importlib.import_module(script).get_args_parser().parse_args(["--logger", "mlflow,tensorboard,mlflow"])
        assert TrainSettings.from_args(args, 0).loggers == ("mlflow", "tensorboard"), script
