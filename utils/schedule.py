"""Learning-rate schedules as pure functions of the (fractional) epoch."""
import math


def aps_factor(epoch: float, warmup_epochs: float, epochs: float) -> float:
    """APS (docs/REFERENCE.md#aps-optimisation): f(e) = min((e + 1) / warmup, (1 + cos(pi * e / E)) / 2)."""
    warm = (epoch + 1) / warmup_epochs if warmup_epochs > 0 else float("inf")
    return min(warm, 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))


def warmup_cosine(epoch: float, warmup_epochs: float, epochs: float, base: float, min_value: float = 0.0,
                  start_value: float = 0.0) -> float:
    """Linear warmup from `start_value` to `base`, then half-cosine down to `min_value` at `epochs`."""
    if epoch < warmup_epochs:
        return start_value + (base - start_value) * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_value + (base - min_value) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def cosine_per_epoch(epoch: float, epochs: float, base: float) -> float:
    """MoCo and its linear probe: base * (1 + cos(pi * floor(epoch) / epochs)) / 2, constant within an epoch."""
    return base * 0.5 * (1.0 + math.cos(math.pi * math.floor(epoch) / epochs))


def poly(epoch: float, epochs: int, base: float, power: float = 0.9) -> float:
    """lr = base * (1 - epoch / epochs) ** power: mmsegmentation's poly decay, per step, to 0 at the end."""
    return base * max(0.0, 1.0 - epoch / epochs) ** power
