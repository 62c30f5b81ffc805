"""MoCo v2 (with any Asym-Siam switches) as a Trainer method (SPEC C): one optimizer step per batch, the query
encoder under SGD with a cosine schedule per epoch."""
from engine import Method
from models.moco import moco_inputs, shuffle_permutation
from utils.schedule import cosine_per_epoch


class MoCoPretraining(Method):
    """module: a models.moco.MoCo (model: the same, DDP-wrapped); knn: evaluate(epoch) -> kNN metrics, or None."""

    name = "MoCo"
    evaluate_at_start = True                                # the kNN baseline of the random (or loaded) weights
    lr_flag = "--lr"
    known_ranges = {"moco_t": (0.01, 1.0)}                  # MoCo's 0.07-0.2, with room

    def __init__(self, module, model, lr: float, epochs: int, knn=None, model_config: dict = None):
        super().__init__(module, model, model_config)
        self.lr, self.epochs, self.knn = lr, epochs, knn

    def training_steps(self, batch, rng):
        query, keys, minis = moco_inputs(batch[0], rng)
        yield self.model(query, keys, minis, perm=shuffle_permutation(keys, rng))

    def lr_at(self, epoch: float) -> float:
        return cosine_per_epoch(epoch, self.epochs, self.lr)

    def evaluate(self, epoch: int):
        return None if self.knn is None else self.knn(epoch)
