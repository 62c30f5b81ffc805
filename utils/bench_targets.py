"""The speed targets the benchmark is held to, checked against its own records.

`python -m utils.bench` ends with one `targets` line: per target, the figure it measured, the bar, whether it
was met, and whether the run had the target's shape (the GPU targets are stated for one H100 in bf16, APS
ViT-S/2 at batch 512 and 32 px, MoCo ResNet-50 at batch 256 and 224 px). A target whose record is missing
(its arch was not run, or the device's peak FLOP/s is unknown for MFU) reads `measured: null`.
"""


class Target:
    def __init__(self, name, bench, key, minimum, arch=None, shape=None):
        self.name, self.bench, self.key, self.minimum = name, bench, key, minimum
        self.arch, self.shape = arch, shape or {}

    def check(self, results: list) -> dict:
        rec = next((r for r in results if r.get("bench") == self.bench and self.arch in (None, r.get("arch"))), None)
        measured = None if rec is None else rec.get(self.key)
        out = {"target": self.name, "need": f">= {self.minimum:g}", "measured": measured,
               "met": None if measured is None else measured >= self.minimum}
        if rec is not None and self.shape:
            out["at_spec_shape"] = all(rec.get(k) == v for k, v in self.shape.items())
        return out


APS_SHAPE = {"batch": 512, "img_size": 32, "patch": 2, "amp": "bfloat16"}
MOCO_SHAPE = {"batch": 256, "img_size": 224, "amp": "bfloat16"}
GPU_TARGETS = (
    Target("ViT-S/2 training step MFU", "aps_step", "mfu", 0.35, "vit-small", APS_SHAPE),
    Target("APS on-device path over the CPU-worker path", "aps_ratio", "device_over_cpu", 3.0, "vit-small",
           APS_SHAPE),
    Target("APS augmentation alone over the training step", "aps_ratio", "augment_over_training", 20.0,
           "vit-small", APS_SHAPE),
    Target("MoCo on-device path over the CPU-worker path", "moco_ratio", "device_over_cpu", 2.0, "resnet50",
           MOCO_SHAPE),
)
CPU_TARGETS = (
    Target("APS on-device path not slower than the CPU-worker path", "aps_ratio", "device_over_cpu", 1.0),
    Target("MoCo on-device path not slower than the CPU-worker path", "moco_ratio", "device_over_cpu", 1.0),
)


def check_targets(results: list, gpu: bool, device_name: str = "") -> dict:
    """The `targets` record: GPU targets on a GPU, the CPU one (device path >= CPU-worker path) on a CPU."""
    checks = [t.check(results) for t in (GPU_TARGETS if gpu else CPU_TARGETS)]
    met = [c["met"] for c in checks if c["met"] is not None]
    return {"bench": "targets", "device_name": device_name, "checks": checks,
            "all_met": bool(met) and all(met) and len(met) == len(checks)}
