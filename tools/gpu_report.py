"""The GPU session's one command: every measurement issue 18's targets need, in one call of at most ~8 minutes,
written as JSON lines (one file per phase) and a summary to --out.

    python3 -m tools.gpu_report --out "$OUT"           # on the device machine (bf16, ViT-S/2 at batch 512, ...)
    python -m tools.gpu_report --out /tmp/r --small     # the same phases at CPU-sized shapes, to check it here

Phases, each in a process of its own with a time limit (a phase that runs out is recorded as such and the next
one starts): the APS step eager with the profiler's split; the same compiled; the data paths end to end (ours on
both paths, the reference's pipeline imitated, MoCo ResNet-50 at 224 px both ways); the CUDA-marked tests, if the
suite has any. summary.json gathers each phase's `targets` line.
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
                     "--moco-batch", "256", "--moco-img-size", "224"]}
SMALL = {"eager": ["--device", "cpu", "--archs", "vit-tiny", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                   "--img-size", "16", "--patch-size", "4", "--sampler-batch", "16", "--loop-pairs", "4",
                   "--skip-pipeline", "--profile", "1"],
         "compiled": None,                                        # minutes of compiling on a CPU: left out here
         "pipelines": ["--device", "cpu", "--skip-model", "--batch-size", "4", "--img-size", "16", "--patch-size",
                       "4", "--sampler-batch", "16", "--loop-pairs", "4", "--pipeline-archs", "vit-tiny",
                       "--pipeline-batches", "1", "--workers", "1", "--reference", "--moco-arch", "resnet18",
                       "--moco-batch", "4", "--moco-img-size", "32"]}
LIMITS = {"eager": 120, "compiled": 210, "pipelines": 150, "tests": 60}


def run_phase(name: str, argv: list, out: str, limit: float) -> dict:
    """python -m tools.bench argv -> <out>/<name>.jsonl; the phase's record for the summary."""
    start = time.perf_counter()
    path = os.path.join(out, f"{name}.jsonl")
    try:
        done = subprocess.run([sys.executable, "-m", "tools.bench", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=limit, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        stdout, code = done.stdout, done.returncode
        err = done.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired as e:                    # keep what the phase printed before its limit
        raw = e.stdout or b""                                     # bytes, whatever text= says
        stdout = raw.decode() if isinstance(raw, bytes) else raw
        code, err = None, [f"stopped after {limit:.0f} s"]
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
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
    shapes, start, phases = SMALL if args.small else GPU, time.perf_counter(), []
    for name, argv in shapes.items():
        left = args.budget - (time.perf_counter() - start)
        if argv is None or left < 20:
            phases.append({"phase": name, "skipped": "left out at small shapes" if argv is None else "no time left"})
            continue
        phases.append(run_phase(name, argv, args.out, min(LIMITS[name], left)))
        print(json.dumps(phases[-1]), flush=True)
    left = args.budget - (time.perf_counter() - start)
    phases.append(run_cuda_tests(args.out, min(LIMITS["tests"], left)) if left >= 20 else
                  {"phase": "tests", "skipped": "no time left"})
    summary = {"seconds": round(time.perf_counter() - start, 1), "phases": phases}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({"summary": os.path.join(args.out, "summary.json"), "seconds": summary["seconds"]}))
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
