"""Experiment trackers beside TensorBoard (`--logger tensorboard,wandb,mlflow`, any combination): the scalars, the
resolved config, curves.png, report.md and the final metrics go to each; a resumed run continues the same tracker
run (the ids are kept in <output-dir>/trackers.json). wandb and mlflow are optional extras
(requirements-extras.txt), imported only when asked for; a missing one is one line saying what to install.

wandb: `WANDB_PROJECT` (default asym-ssl), `WANDB_ENTITY`, `WANDB_MODE=offline` as wandb reads them; its files go
under <output-dir>/wandb. mlflow: `MLFLOW_TRACKING_URI` (default a file store in <output-dir>/mlruns),
`MLFLOW_EXPERIMENT_NAME` (default asym-ssl).
"""
import json
import os
import time

from utils.errors import UserError

LOGGERS = ("tensorboard", "wandb", "mlflow")
EXTRAS = "requirements-extras.txt"
STATE = "trackers.json"
PROJECT = "asym-ssl"


def parse_loggers(text: str) -> tuple:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'); an unknown name is a UserError naming it."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or not names:
        raise UserError(f"--logger {text}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; use a "
                        f"comma-separated list of {', '.join(LOGGERS)}")
    return names


def loggers_problem(text: str) -> str:
    """For the flag's domain: '' when parse_loggers takes `text`, else what is wrong."""
    try:
        parse_loggers(text)
    except UserError:
        unknown = [n.strip() for n in text.split(",") if n.strip() and n.strip() not in LOGGERS]
        return f"names no logger we know ({', '.join(unknown) or 'empty'})"
    return ""


def missing(name: str) -> UserError:
    return UserError(f"--logger {name} needs the {name} package, which is not installed; pip install -r {EXTRAS} "
                     f"(or pip install {name})")


def _module(name: str):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise missing(name) from e


def require(names) -> tuple:
    """The logger names, each tracker's package found (else the one line saying what to install)."""
    import importlib.util
    for name in names:
        if name in KINDS and importlib.util.find_spec(name) is None:
            raise missing(name)
    return tuple(names)


def _flat(flags: dict) -> dict:
    """Flag values as trackers keep them (lists and None as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str) for k, v in flags.items()}


class Wandb:
    def __init__(self, output_dir: str, run_id: str = None, name: str = None):
        wandb = _module("wandb")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), dir=output_dir, id=run_id,
                              resume="allow" if run_id else None, name=name, reinit="finish_previous")
        self.run.define_metric("global_step")
        self.run.define_metric("train/*", step_metric="global_step")
        self.run.define_metric("epoch")
        self.run.define_metric("eval/*", step_metric="epoch")
        self.id = self.run.id

    def config(self, flags: dict):
        self.run.config.update(_flat(flags), allow_val_change=True)

    def scalars(self, metrics: dict, step: int, prefix: str):
        axis = "epoch" if prefix.startswith("eval") else "global_step"
        self.run.log({axis: step, **{prefix + k: v for k, v in metrics.items()}})

    def files(self, paths: list, output_dir: str):
        for path in paths:
            if path.endswith(".png"):
                self.run.log({"pictures/" + os.path.basename(path): self.wandb.Image(path)})
            self.run.save(path, base_path=output_dir, policy="now")

    def summary(self, metrics: dict):
        self.run.summary.update(metrics)

    def end(self, status: str):
        self.run.finish(exit_code=0 if status in ("finished", "preempted") else 1)


class Mlflow:
    def __init__(self, output_dir: str, run_id: str = None, name: str = None):
        mlflow = _module("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:                 # our default, a file store in the run's folder (mlflow 3 asks to be told so)
            uri = "file:" + os.path.abspath(os.path.join(output_dir, "mlruns"))
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.id, self.uri = run_id, uri

    def config(self, flags: dict):
        from mlflow.entities import Param
        known = set(self.client.get_run(self.id).data.params)         # a resumed run keeps its first values
        params = [Param(k, str(v)[:500]) for k, v in _flat(flags).items() if k not in known]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.id, params=params[start:start + 100])

    def scalars(self, metrics: dict, step: int, prefix: str):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        rows = [Metric(prefix + k, float(v), now, int(step)) for k, v in metrics.items()]
        self.client.log_batch(self.id, metrics=rows)

    def files(self, paths: list, output_dir: str):
        for path in paths:
            self.client.log_artifact(self.id, path)

    def summary(self, metrics: dict):
        self.scalars(metrics, 0, "final/")

    def end(self, status: str):
        final = {"finished": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.id, status=final)


KINDS = {"wandb": Wandb, "mlflow": Mlflow}


class Trackers:
    """The trackers of `names` (TensorBoard is utils.log.RunLog's own) for one run's output folder, rank 0 only;
    start() opens them, continuing the runs in trackers.json when the training run resumes."""

    def __init__(self, output_dir: str, names=()):
        self.output_dir, self.names = output_dir, [n for n in names if n in KINDS]
        self.open = {}

    def start(self, flags: dict, resumed: bool):
        if not self.names or self.open:
            return
        path = os.path.join(self.output_dir, STATE)
        saved = {}
        if resumed and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = {}                          # a damaged file: new tracker runs rather than a stop
        name = os.path.basename(os.path.abspath(self.output_dir))
        for kind in self.names:
            self.open[kind] = KINDS[kind](self.output_dir, saved.get(kind), name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({k: t.id for k, t in self.open.items()}, f)
        os.replace(path + ".tmp", path)
        for t in self.open.values():
            t.config(flags)

    def scalars(self, metrics: dict, step: int, prefix: str):
        for t in self.open.values():
            t.scalars(metrics, step, prefix)

    def end(self, status: str, metrics: dict = None, files=()):
        """Close every tracker: status finished (with the final metrics and files), preempted or failed."""
        numbers = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        existing = [p for p in files if os.path.isfile(p)]
        for t in self.open.values():
            if numbers:
                t.summary(numbers)
            if existing:
                t.files(existing, self.output_dir)
            t.end(status)
        self.open = {}
