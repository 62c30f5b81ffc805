"""The GPU session's one command: correctness first, then speed, in one call of at most ~8 minutes, written as
JSON lines (one file per phase) and a summary to --out.

    python3 -m bench.gpu_report --out "$OUT"           # on the device machine
    python -m bench.gpu_report --out /tmp/r --small     # the same phases at CPU-sized shapes, to check it here

It prints the versions first (torch, torchvision, timm, CUDA, cuDNN, NCCL, the driver and the GPU). Then the
phases, in the order of what matters, each in a process of its own with a time limit (LIMITS: they add up to
480 s; a phase that fails, exits or runs out is recorded as such, and the next one starts):

1. correctness (bench.gpu_checks: each script's short epoch in bf16, then the same views and patches on the GPU as
   on the CPU, GPU-decoded JPEGs against CPU-decoded ones, the epochs in fp16 and compiled, all under torch.cuda's
   sync debug mode, --deterministic runs, 2 processes against 1; each check isolated, written as it ends);
2. the APS ViT-S/2 step eager, with the profiler's split; 3. the same step compiled;
4. MoCo ResNet-50 at 224 px on both data paths; 5. the APS data paths end to end (and the reference's imitated);
6. the CUDA-marked tests; 7. the memory table (bench --memory, a few savings), with whatever time is left.

summary.txt says it for a person in at most 20 lines; summary.json has pass/fail per correctness check apart from
the speed targets (each phase's `targets` line). A line a phase prints that is not JSON is kept aside (its .log
file), never in the way of the summary. --small runs every phase at CPU-sized shapes (compiled with aot_eager).
"""
import json
import os
import subprocess
import sys
import time

from utils.config import ArgumentParser
from utils.errors import exit_on_user_error
from utils.flags import count, output_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the phases in order of what matters (what a short session must not miss comes first), each with its time limit;
# the limits add up to the default --budget (480 s), and memory, last, is cut short by what is left
GPU = {"eager": ["--archs", "vit-small", "--batch-size", "512", "--skip-pipeline", "--profile", "3"],
       "compiled": ["--archs", "vit-small", "--batch-size", "512", "--skip-pipeline", "--compile", "--profile", "3"],
       "moco": ["--skip-model", "--skip-aps-pipeline", "--moco-arch", "resnet50", "--moco-batch", "256",
                "--moco-img-size", "224"],
       "pipelines": ["--skip-model", "--skip-moco-pipeline", "--pipeline-archs", "vit-small", "--reference"],
       "memory": ["--skip-model", "--skip-pipeline", "--memory", "--memory-steps", "2", "--memory-only",
                  "aps-vit-small,moco-resnet50", "--memory-savings", "grad-checkpointing,accum-4"]}
CPU = ["--device", "cpu", "--batch-size", "4", "--img-size", "16", "--patch-size", "4", "--sampler-batch", "16",
       "--loop-pairs", "4"]
SMALL = {"eager": CPU + ["--archs", "vit-tiny", "--steps", "1", "--warmup", "0", "--skip-pipeline", "--profile", "1"],
         "compiled": CPU + ["--archs", "vit-tiny", "--steps", "1", "--warmup", "1", "--skip-pipeline", "--compile",
                            "--compile-backend", "aot_eager"],
         "moco": CPU + ["--skip-model", "--skip-aps-pipeline", "--pipeline-batches", "1", "--workers", "1",
                        "--moco-arch", "resnet18", "--moco-batch", "4", "--moco-img-size", "32"],
         "pipelines": CPU + ["--skip-model", "--skip-moco-pipeline", "--pipeline-archs", "vit-tiny",
                             "--pipeline-batches", "1", "--workers", "1", "--reference"],
         "memory": CPU + ["--skip-model", "--skip-pipeline", "--memory", "--memory-steps", "1", "--memory-only",
                          "aps-vit-small", "--memory-savings", "accum-2", "--memory-scale", "64"]}
ORDER = ("correctness", "eager", "compiled", "moco", "pipelines", "tests", "memory")
LIMITS = {"correctness": 170, "eager": 40, "compiled": 90, "moco": 45, "pipelines": 55, "tests": 30, "memory": 50}
assert sum(LIMITS.values()) <= 480


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
    """bench.gpu_checks -> correctness.jsonl; the phase's record, with pass/fail per check (a check the phase's
    limit cut off is missing, and the phase says it ran out)."""
    start = time.perf_counter()
    runs = os.path.join(out, "correctness-runs")
    argv = ["--out", runs, "--budget", str(max(1, int(limit) - 25))] + (["--small"] if small else [])
    stdout, code, err = run_module("bench.gpu_checks", argv, limit)
    records, other = json_lines(stdout)
    save_lines(out, "correctness", records, other)
    checks = {r["check"]: ("pass" if r["passed"] else "skipped" if r["passed"] is None else "FAIL")
              for r in records if "check" in r}
    errors = {r["check"]: r.get("error", "") for r in records if r.get("passed") is False}
    return {"phase": "correctness", "command": "python3 -m bench.gpu_checks " + " ".join(argv), "exit": code,
            "seconds": round(time.perf_counter() - start, 1), "checks": checks, "errors": errors,
            "all_passed": bool(checks) and code == 0 and "FAIL" not in checks.values(),
            **({"error": err} if code != 0 else {})}


def run_phase(name: str, argv: list, out: str, limit: float) -> dict:
    """python -m bench argv -> <out>/<name>.jsonl; the phase's record for the summary."""
    start = time.perf_counter()
    stdout, code, err = run_module("bench", argv, limit)
    records, other = json_lines(stdout)
    save_lines(out, name, records, other)
    targets = next((r for r in records if r.get("bench") == "targets"), None)
    return {"phase": name, "command": "python3 -m bench " + " ".join(argv), "exit": code,
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
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m bench.gpu_report")
    p.add_argument("--out", type=output_folder(), required=True, help="where the JSON lines and summary.json go")
    p.add_argument("--small", action="store_true", help="CPU-sized shapes (to check the phases without a GPU)")
    p.add_argument("--budget", type=count(), default=480, help="seconds for all phases together")
    return p


def run_any(name: str, shapes: dict, out: str, small: bool, limit: float) -> dict:
    """One phase, whatever happens in it: an error of this tool's own is recorded as the phase's failure."""
    try:
        if name == "correctness":
            return run_correctness(out, small, limit)
        if name == "tests":
            return run_cuda_tests(out, limit)
        return run_phase(name, shapes[name], out, limit)
    except Exception as e:                                           # the next phase still runs
        return {"phase": name, "exit": None, "error": [f"{type(e).__name__}: {e}"]}


def summary_lines(summary: dict) -> list:
    """The report for a person, in at most 20 lines: versions, each correctness check that failed, each phase."""
    v, c = summary["versions"], summary["correctness"]
    lines = [f"gpu_report: {summary['seconds']:.0f} s; {v.get('gpu') or 'no GPU'}; torch {v['torch']}, CUDA "
             f"{v.get('cuda')}, cuDNN {v.get('cudnn')}, NCCL {v.get('nccl')}, driver {v.get('driver')}"]
    counts = {k: list(c["checks"].values()).count(k) for k in ("pass", "FAIL", "skipped")}
    lines.append(f"correctness: {'all passed' if c['all_passed'] else 'NOT all passed'} ({counts['pass']} pass, "
                 f"{counts['FAIL']} FAIL, {counts['skipped']} skipped); CUDA tests: {c['cuda_tests']}")
    failed = [f"  FAIL {k}: {str(e)[:110]}" for k, e in c.get("errors", {}).items()]
    lines += failed[:8] + ([f"  ... {len(failed) - 8} more in correctness.jsonl"] if len(failed) > 8 else [])
    for p in summary["phases"][1:]:
        if "skipped" in p:
            state = f"skipped ({p['skipped']})"
        elif p.get("exit") == 0 or (p["phase"] == "tests" and p.get("exit") == 5):
            met = [c["met"] for c in (p.get("targets") or {}).get("checks", []) if c.get("met") is not None]
            state = "ok" + (f", {p['result']}" if p["phase"] == "tests" else "") + \
                ("" if not met else f", targets {'met' if all(met) else 'NOT met'} ({sum(met)} of {len(met)})")
        else:
            state = f"FAILED ({'ran out of time' if p.get('exit') is None else 'exit ' + str(p.get('exit'))}): " + \
                    str((p.get("error") or [""])[-1])[:80]
        lines.append(f"{p['phase']}: {state}, {p.get('seconds', 0):.0f} s")
    return lines[:20]


@exit_on_user_error
def main(args):
    os.makedirs(args.out, exist_ok=True)
    shapes, start = SMALL if args.small else GPU, time.perf_counter()
    about = versions()
    print(json.dumps({"versions": about}), flush=True)
    phases = []
    for name in ORDER:
        left = args.budget - (time.perf_counter() - start)
        limit = min(LIMITS[name], left) if name != "memory" else left    # memory: whatever is left
        if limit < 15:
            phases.append({"phase": name, "skipped": "no time left"})
        else:
            phases.append(run_any(name, shapes, args.out, args.small, limit))
        print(json.dumps(phases[-1]), flush=True)
    correctness, tests = phases[0], next(p for p in phases if p["phase"] == "tests")
    summary = {"seconds": round(time.perf_counter() - start, 1), "versions": about,
               "correctness": {"all_passed": correctness.get("all_passed", False),
                               "checks": correctness.get("checks", {}), "errors": correctness.get("errors", {}),
                               "cuda_tests": tests.get("result", tests.get("skipped"))},
               "speed": {p["phase"]: (p.get("targets") or {}).get("all_met", p.get("skipped"))
                         for p in phases if p["phase"] not in ("correctness", "tests")},
               "phases": phases}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = summary_lines(summary)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text), flush=True)
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
