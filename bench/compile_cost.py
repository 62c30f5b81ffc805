"""python -m bench --compile-cost: what --compile costs and gives, eager against compiled, for an APS step (ViT-T/2 by
default) and a MoCo v2 step (ResNet-18), as the Trainer compiles them (the whole module, in place):

- compile_s: the first compiled step (tracing, AOTAutograd, code generation) less an eager step;
- eager_step_ms / compiled_step_ms: the steady-state step (the best of the timed steps), and their ratio;
- recompiles: frames dynamo compiled after the first step, over `epochs` epochs of `steps` steps each (the model
  switched to eval mode and back between epochs, as an evaluation does): 0 means the step compiled once.

    python -m bench --compile-cost --device cpu --skip-model --skip-pipeline      # inductor on the CPU
"""
import torch

from models.moco import build_moco, shuffle_permutation
from samplers.aps import kept_per_view
from bench import pipeline as P
from utils.rng import BatchRandom
from utils.runtime import compile_in_place, make_grad_scaler


def aps_step(arch: str, batch: int, img_size: int, patch: int, device):
    model, opt = P.aps_model(arch, img_size, patch, device)
    grid = img_size // patch
    n = kept_per_view(grid * grid, 0.25, 1)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(batch, 3, img_size, img_size, generator=g).to(device) for _ in range(2))
    idx1, idx2 = (torch.rand(batch, grid * grid, generator=g).argsort(1)[:, :n].to(device) for _ in range(2))
    return model, opt, lambda: model(x1, x2, idx1, idx2)[0]


def moco_step(arch: str, batch: int, img_size: int, device):
    torch.manual_seed(0)
    model = build_moco(arch, img_size <= 64, 2, 512, 128, 4096 // batch * batch, device=device)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    keys = torch.randn(1, batch, 3, img_size, img_size, generator=g).to(device)
    perm = shuffle_permutation(keys, BatchRandom("cpu", 0, 1).reseed(0)).to(device)

    def step():
        model.momentum_update()                       # as methods.moco does: eager, outside the compiled forward
        return model(query, keys, perm=perm, update_key_encoder=False)[0]
    return model, opt, step


def frames() -> int:
    import torch._dynamo.utils as dynamo_utils
    return int(dynamo_utils.counters["frames"]["total"])


def time_steps(model, opt, loss_fn, device, amp, steps: int, epochs: int = 1) -> tuple:
    """(first step s, best later step s, frames compiled after the first step) over epochs x steps steps."""
    scaler, times, after_first = make_grad_scaler(device, amp), [], None
    for epoch in range(epochs):
        model.train()
        for _ in range(steps):
            times.append(P.timed_step(loss_fn, opt, scaler, device, amp))
            after_first = frames() if after_first is None else after_first
        model.eval()                                  # an evaluation between epochs flips the mode
    return times[0], min(times[1:]), frames() - after_first


def compile_cost(device, amp, backend: str = "inductor", steps: int = 3, epochs: int = 3, batch: int = 32,
                 aps_arch: str = "vit-tiny", moco_arch: str = "resnet18", img_size: int = 32) -> list:
    import torch._dynamo
    records = []
    makers = {"aps": lambda: aps_step(aps_arch, batch, img_size, 2, device),
              "moco": lambda: moco_step(moco_arch, batch, img_size, device)}
    for name, make in makers.items():
        model, opt, fn = make()
        eager_first, eager, _ = time_steps(model, opt, fn, device, amp, steps)
        torch._dynamo.reset()
        model, opt, fn = make()
        compile_in_place(model, "default", backend)
        first, compiled, recompiles = time_steps(model, opt, fn, device, amp, steps, epochs)
        records.append({"bench": "compile_cost", "step": name, "arch": aps_arch if name == "aps" else moco_arch,
                        "batch": batch, "img_size": img_size, "device": str(device), "amp": P.amp_name(amp),
                        "backend": backend, "compile_s": round(first - eager, 1),
                        "eager_step_ms": round(1000 * eager, 1), "compiled_step_ms": round(1000 * compiled, 1),
                        "compiled_over_eager": round(compiled / eager, 3), "epochs": epochs,
                        "steps_per_epoch": steps, "recompiles": recompiles})
    return records
