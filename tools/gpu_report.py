"""The GPU session's one command: correctness first, then speed, in one call of at most ~8 minutes, written as
JSON lines (one file per phase) and a summary to --out.

    python3 -m tools.gpu_report --out "$OUT"           # on the device machine
    python -m tools.gpu_report --out /tmp/r --small     # the same phases at CPU-sized shapes, to check it here

It prints the versions first (torch, torchvision, timm, CUDA, cuDNN, NCCL, the driver and the GPU). Then the
phases, each in a process of its own with a time limit (a phase that runs out is recorded as such and the next
one starts): correctness (tools.gpu_checks: each script's short epoch in bf16, fp16 and compiled under
torch.cuda's sync debug mode, the same views and patches on the GPU as on the CPU, GPU-decoded JPEGs against
CPU-decoded ones, --deterministic runs, 2 processes against 1); the CUDA-marked tests; the APS step eager with
the profiler's split; the data paths end to end (ours on both paths, the reference's pipeline imitated, MoCo
ResNet-50 at 224 px both ways); the memory table (tools.bench --memory: each saving's peak memory and step
time); the APS step compiled. summary.json says pass/fail per correctness check apart
from the speed targets (each phase's `targets` line). A line a phase prints that is not JSON is kept aside
(its .log file), never in the way of the summary.
"""
import json
import os
import subprocess
import sys
import time

from utils.errors import ArgumentParser, exit_on_user_error
from utils.flags import count, output_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = {"eager": ["--archs", "vit-small", "--batch-size", "512", "--skip-pipeline", "--profile", "3"],
       "compiled": ["--archs", "vit-small", "--batch-size", "512", "--skip-pipeline", "--compile", "--profile", "3"],
       "pipelines": ["--skip-model", "--pipeline-archs", "vit-small", "--reference", "--moco-arch", "resnet50",
                     "--moco-batch", "256", "--moco-img-size", "224"],
       "memory": ["--skip-model", "--skip-pipeline", "--memory", "--memory-steps", "3"]}
SMALL = {"eager": ["--device", "cpu", "--archs", "vit-tiny", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                   "--img-size", "16", "--patch-size", "4", "--sampler-batch", "16", "--loop-pairs", "4",
                   "--skip-pipeline", "--profile", "1"],
         "compiled": None,                                        # minutes of compiling on a CPU: left out here
         "pipelines": ["--device", "cpu", "--skip-model", "--batch-size", "4", "--img-size", "16", "--patch-size",
                       "4", "--sampler-batch", "16", "--loop-pairs", "4", "--pipeline-archs", "vit-tiny",
                       "--pipeline-batches", "1", "--workers", "1", "--reference", "--moco-arch", "resnet18",
                       "--moco-batch", "4", "--moco-img-size", "32"],
         "memory": None}                                          # ViT-B and ResNet-50 steps: tests/test_memory.py
LIMITS = {"correctness": 200, "tests": 70, "eager": 80, "pipelines": 110, "memory": 200, "compiled": 150}


def versions() -> dict:
    """What the numbers were measured with."""
    import platform

    import timm
    import torch
    import torchvision
    v = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "timm": timm.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        v["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        v["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        v["driver"] = None
    return v


def json_lines(text: str):
    """(records, other lines): each line that parses as a JSON object, and the rest."""
    records, other = [], []
    for line in text.splitlines():
        try:
            record = json.loads(line) if line.lstrip().startswith("{") else None
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            other.append(line)
    return records, other


def run_module(module: str, argv: list, limit: float):
    """(stdout, exit code or None when it ran out, last stderr lines) of python -m module argv."""
    try:
        done = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=limit, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return done.stdout, done.returncode, done.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired as e:                    # keep what the phase printed before its limit
        raw = e.stdout or b""                                     # bytes, whatever text= says
        return (raw.decode() if isinstance(raw, bytes) else raw), None, [f"stopped after {limit:.0f} s"]


def save_lines(out: str, name: str, records: list, other: list):
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    if other:
        with open(os.path.join(out, f"{name}.log"), "w") as f:
            f.write("\n".join(other) + "\n")


def run_correctness(out: str, small: bool, limit: float) -> dict:
    """tools.gpu_checks -> correctness.jsonl; the phase's record, with pass/fail per check."""
    start = time.perf_counter()
    argv = ["--out", os.path.join(out, "correctness-runs")] + (["--small"] if small else [])
    stdout, code, err = run_module("tools.gpu_checks", argv, limit)
    records, other = json_lines(stdout)
    save_lines(out, "correctness", records, other)
    checks = {r["check"]: ("pass" if r["passed"] else "skipped" if r["passed"] is None else "FAIL")
              for r in records if "check" in r}
    return {"phase": "correctness", "command": "python3 -m tools.gpu_checks " + " ".join(argv), "exit": code,
            "seconds": round(time.perf_counter() - start, 1), "checks": checks,
            "all_passed": bool(checks) and code == 0 and "FAIL" not in checks.values(),
            **({"error": err} if code != 0 else {})}


def run_phase(name: str, argv: list, out: str, limit: float) -> dict:
    """python -m tools.bench argv -> <out>/<name>.jsonl; the phase's record for the summary."""
    start = time.perf_counter()
    stdout, code, err = run_module("tools.bench", argv, limit)
    records, other = json_lines(stdout)
    save_lines(out, name, records, other)
    targets = next((r for r in records if r.get("bench") == "targets"), None)
    return {"phase": name, "command": "python3 -m tools.bench " + " ".join(argv), "exit": code,
            "seconds": round(time.perf_counter() - start, 1), "records": len(records), "targets": targets,
            **({"error": err} if code != 0 else {})}


def run_cuda_tests(out: str, limit: float) -> dict:
    """The suite's CUDA-marked tests (pytest -m cuda), if it has any."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], cwd=ROOT,
                              capture_output=True, text=True, timeout=limit)
        text, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        text, code = f"stopped after {limit:.0f} s", None
    with open(os.path.join(out, "cuda-tests.txt"), "w") as f:
        f.write(text)
    summary = (text.strip().splitlines() or [""])[-1]
    return {"phase": "tests", "exit": code, "seconds": round(time.perf_counter() - start, 1), "result": summary,
            "note": "exit 5: the suite has no CUDA-marked test" if code == 5 else ""}


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.gpu_report")
    p.add_argument("--out", type=output_folder(), required=True, help="where the JSON lines and summary.json go")
    p.add_argument("--small", action="store_true", help="CPU-sized shapes (to check the phases without a GPU)")
    p.add_argument("--budget", type=count(), default=480, help="seconds for all phases together")
    return p


@exit_on_user_error
def main(args):
    os.makedirs(args.out, exist_ok=True)
    shapes, start = SMALL if args.small else GPU, time.perf_counter()
    about = versions()
    print(json.dumps({"versions": about}), flush=True)
    left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    phases = [run_correctness(args.out, args.small, min(LIMITS["correctness"], left()))]
    print(json.dumps(phases[-1]), flush=True)
    phases.append(run_cuda_tests(args.out, min(LIMITS["tests"], left())) if left() >= 20 else
                  {"phase": "tests", "skipped": "no time left"})
    print(json.dumps(phases[-1]), flush=True)
    for name in ("eager", "pipelines", "memory", "compiled"):
        argv = shapes[name]
        if argv is None or left() < 20:
            phases.append({"phase": name, "skipped": "left out at small shapes" if argv is None else "no time left"})
        else:
            phases.append(run_phase(name, argv, args.out, min(LIMITS[name], left())))
        print(json.dumps(phases[-1]), flush=True)
    correctness = phases[0]
    summary = {"seconds": round(time.perf_counter() - start, 1), "versions": about,
               "correctness": {"all_passed": correctness["all_passed"], "checks": correctness["checks"],
                               "cuda_tests": phases[1].get("result", phases[1].get("skipped"))},
               "speed": {p["phase"]: (p.get("targets") or {}).get("all_met", p.get("skipped")) for p in phases[2:]},
               "phases": phases}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({"summary": os.path.join(args.out, "summary.json"), "seconds": summary["seconds"],
                      "correctness": summary["correctness"], "speed": summary["speed"]}))
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
