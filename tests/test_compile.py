"""--compile for real: every script compiled by torch.compile (dynamo and AOTAutograd, forward and backward graphs,
through the aot_eager backend: the compiler's whole program transformation, with eager kernels, so that it takes
seconds on a CPU), with 1 process and with 2 (DDP over gloo, dynamo's DDP graph splitting on, as on GPUs), plain
and with --accum-steps 2 and --grad-checkpointing, MoCo with its switches. Each compiled run

- ends where the same command run eagerly ends: every float tensor of the checkpoint within COMPILED_ATOL
  (AOTAutograd decomposes some ops, so the last bits may differ; nothing else may);
- compiles one graph for training (and one for evaluation where the compiled model evaluates): no graph break
  inside the model's forward (a break would split it into more graphs; DDP's own wrapper code is not traced, by
  design, and is not ours);
- compiles nothing after its first epoch (tests/compile_probe.py snapshots dynamo's counters after each epoch).

One case goes through inductor (code generation and a C++ compiler) to prove that the generated kernels run too.
The tiny models keep it within CI's time."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY

COMPILED_ATOL = 1e-5      # float32, 2 epochs of 2 steps: AOTAutograd's decompositions change the last bits only
PROBE = os.path.join(ROOT, "tests", "compile_probe.py")
AOT = ["--compile", "--compile-backend", "aot_eager"]
SAVINGS = ["--accum-steps", "2", "--grad-checkpointing"]


def folder_flags(data) -> list:
    return ["--dataset", "imagefolder", "--data-root", str(data), "--img-size", "16", "--batch-size", "8",
            "--num-workers", "0", "--device", "cpu"]


def scripts(data, moco_ckpt) -> dict:
    """script -> (file, flags) of a 2-epoch run of 2 steps an epoch (16 images, batch 8)."""
    base = folder_flags(data)
    return {
        "pretrain": ("main_pretrain.py", TINY + base + ["--nepoch", "2", "--warmup-epochs", "1", "--nsampling", "2",
                                                         "--knn-every", "0"]),
        "moco": ("main_moco.py", base + ["-a", "resnet18", "--moco-k", "16", "--moco-dim", "8", "--mlp-hidden-dim",
                                         "16", "--epochs", "2", "--knn-every", "0", "--enable-multicrop",
                                         "--num-mini-crops", "2", "--mini-crop-size", "8", "--enable-scalemix",
                                         "--enable-asymm-aug", "--enable-mean-encoding"]),
        "finetune": ("main_finetune.py", TINY[:10] + base + ["--epochs", "2", "--warmup-epochs", "1", "--mixup", "0",
                                                             "--cutmix", "0", "--drop-path", "0.1"]),
        "lincls": ("main_lincls.py", base + ["--pretrained", str(moco_ckpt), "--epochs", "2"]),
    }


# (script, processes, extra flags): each is compiled and compared with its eager run
CASES = [
    ("pretrain", 1, SAVINGS),
    ("pretrain", 2, []),                                        # SyncBN heads, all-gathered targets
    ("moco", 1, ["--bn-splits", "2"] + SAVINGS),                # split BN in chunks, recomputed stages
    ("moco", 2, ["--enable-asym-bn", "--syncbn-group-size", "2", "--grad-checkpointing"]),   # shuffle-BN, AsymBN
    ("finetune", 1, SAVINGS),
    ("finetune", 2, []),
    ("lincls", 1, ["--lars", "--head-bn"] + SAVINGS[:2]),
    ("lincls", 2, ["--head-bn"]),
]


def run(script: str, flags: list, out, processes: int, port: int, probe: bool):
    """The script with `flags` in `processes` processes (torchrun, gloo), through the probe if asked; the
    checkpoint and the probe's counters of rank 0 (None without it)."""
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc_per_node", str(processes), "--master_port", str(port)]
    target = [PROBE, str(out / "dynamo"), script] if probe else [script]
    done = subprocess.run(launcher + target + flags + ["--output-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    counters = json.loads((out / "dynamo.0.json").read_text()) if probe else None
    return ckpt, counters


@pytest.fixture
def inputs(tmp_path, make_folder, moco_checkpoints):
    """A folder of 16 training JPEGs (and 16 val) and a tiny MoCo checkpoint for the probe."""
    make_folder(tmp_path / "data", classes=2, per_class=8)
    moco_checkpoints(tmp_path)
    return tmp_path / "data", tmp_path / "ours.pth"


def graphs_per_epoch(counters: dict) -> list:
    return [e.get("stats", {}).get("unique_graphs", 0) for e in counters["epochs"]]


@pytest.mark.slow
@pytest.mark.parametrize("name, processes, extra", CASES, ids=[f"{c[0]}-{c[1]}proc" for c in CASES])
def test_compiled_run_ends_where_the_eager_run_ends(tmp_path, inputs, name, processes, extra):
    script, flags = scripts(*inputs)[name]
    port = 29600 + CASES.index((name, processes, extra))
    eager, _ = run(script, flags + extra, tmp_path / "eager", processes, port, probe=False)
    compiled, counters = run(script, flags + extra + AOT, tmp_path / "compiled", processes, port, probe=True)
    assert compiled["global_step"] == eager["global_step"] == 4 * (2 if name == "pretrain" else 1)  # (2 rounds)
    gaps = {k: (v - eager["model"][k]).abs().max().item() for k, v in compiled["model"].items()
            if v.is_floating_point()}
    moved = [k for k, v in compiled["model"].items() if v.is_floating_point() and "queue" not in k]
    assert max(gaps.values()) <= COMPILED_ATOL, max(gaps.items(), key=lambda kv: kv[1])
    assert len(moved) > 4
    graphs = graphs_per_epoch(counters)
    # one process: the compiled model also evaluates (eval mode: a second graph); under DDP the unwrapped module
    # evaluates, eagerly
    evaluates = name in ("finetune", "lincls") and processes == 1
    assert graphs[0] == 1 + evaluates, counters["epochs"][0]
    assert graphs[-1] == graphs[0], "recompiled after the first epoch"
    frames = [e["frames"]["total"] for e in counters["epochs"]]
    assert frames[-1] == frames[0], f"frames compiled per epoch: {frames}"
    if processes == 1:
        assert not counters["end"].get("graph_break"), counters["end"]["graph_break"]


@pytest.mark.slow
def test_inductor_generates_kernels_that_train_like_eager(tmp_path, inputs):
    """The default backend end to end on the CPU: inductor writes and compiles C++ kernels for the probe's
    forward and backward (the smallest of the scripts), and the run ends where the eager run ends."""
    script, flags = scripts(*inputs)["lincls"]
    flags = flags + ["--epochs", "1"]
    eager, _ = run(script, flags, tmp_path / "eager", 1, 0, probe=False)
    compiled, counters = run(script, flags + ["--compile"], tmp_path / "compiled", 1, 0, probe=True)
    assert counters["end"].get("inductor", {}), "inductor did not run"
    for k, v in compiled["model"].items():
        if v.is_floating_point():
            assert (v - eager["model"][k]).abs().max().item() <= 1e-4, k   # fused kernels: round-off
