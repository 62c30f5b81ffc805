"""Run a script as `python script args` would, and write what torch.compile did to OUT.<rank>.json: dynamo's
counters after each epoch (its training and evaluation) (frames compiled, graphs, graph breaks with their reasons), so that a test can see the
graph breaks and count recompilations over epochs. Test infrastructure (tests/test_compile.py):

    python tests/compile_probe.py OUT script.py args...        (under torchrun too)
"""
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot() -> dict:
    import torch._dynamo.utils as dynamo_utils
    return {k: dict(v) for k, v in dynamo_utils.counters.items()}


def main():
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, ROOT)
    import engine
    epochs = []

    class Snapshots(engine.Callback):
        def epoch_end(self, trainer, epoch):        # after each epoch's training and evaluation, on every rank
            epochs.append(snapshot())
    try:
        with engine.installed(Snapshots()):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        with open(f"{out}.{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump({"epochs": epochs, "end": snapshot()}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
