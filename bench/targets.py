"""The speed targets the benchmark is held to, checked against its own records.

`python -m bench` ends with one `targets` line: per target, the figure it measured, the bar, whether it
was met, and whether the run had the target's shape (the GPU targets are stated for one H100 in bf16, APS
ViT-S/2 at batch 512 and 32 px, MoCo ResNet-50 at batch 256 and 224 px). A target whose record is missing
(its arch was not run, or the device's peak FLOP/s is unknown for MFU) reads `measured: null`.
"""


class Target:
    def __init__(self, name, bench, key, minimum, arch=None, shape=None, optional=False):
        self.name, self.bench, self.key, self.minimum = name, bench, key, minimum
        self.arch, self.shape, self.optional = arch, shape or {}, optional

    def check(self, results: list) -> list:
        """One check per record of this target's kind and arch (any arch when None); one with
        `measured: null` when the run has none (none at all for an optional target: a mode not asked for)."""
        recs = [r for r in results if r.get("bench") == self.bench and self.arch in (None, r.get("arch"))]
        return [self._check(r) for r in recs] or ([] if self.optional else [self._check(None)])

    def _check(self, rec) -> dict:
        measured = None if rec is None else rec.get(self.key)
        out = {"target": self.name, "arch": self.arch if rec is None else rec.get("arch"),
               "need": f">= {self.minimum:g}", "measured": measured,
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
    Target("APS ViT-S/2 epoch end to end over the reference's pipeline (bench --reference)", "aps_reference_ratio",
           "ours_over_reference", 2.0, "vit-small", {k: v for k, v in APS_SHAPE.items() if k != "amp"}, optional=True),
)
CPU_TARGETS = (
    Target("APS on-device path not slower than the CPU-worker path", "aps_ratio", "device_over_cpu", 1.0),
    Target("MoCo on-device path not slower than the CPU-worker path", "moco_ratio", "device_over_cpu", 1.0),
)


def check_targets(results: list, gpu: bool, device_name: str = "") -> dict:
    """The `targets` record: GPU targets on a GPU, the CPU ones (each device path >= its CPU-worker path, per
    arch run) on a CPU. all_met: every check measured and met."""
    checks = [c for t in (GPU_TARGETS if gpu else CPU_TARGETS) for c in t.check(results)]
    return {"bench": "targets", "device_name": device_name, "checks": checks,
            "all_met": all(c["met"] is True for c in checks)}
