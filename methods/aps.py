"""APS pretraining as a Trainer method (docs/REFERENCE.md#aps-pretraining): each loaded batch of view pairs gives
`steps_per_batch` optimizer steps, one per sampling round, under the schedule f(e) = min((e + 1) / warmup, (1 + cos(pi e
/ E)) / 2)."""
from methods.selfsup import SelfSupervised
from models.aps import aps_training_steps
from utils.checkpoint import backbone_record
from utils.recompute import split_batch
from utils.schedule import aps_factor


class APSPretraining(SelfSupervised):
    """module: a models.aps.APS (model: the same, DDP-wrapped); knn: evaluate(epoch) -> kNN metrics, or None."""

    name = "APS"

    def __init__(self, module, model, grid: int, ratio: float, steps_per_batch: int, power: float, lr: float,
                 warmup_epochs: float, epochs: int, knn=None, model_config: dict = None):
        super().__init__(module, model, lr, epochs, warmup_epochs, knn, model_config)
        self.grid, self.ratio, self.steps_per_batch, self.power = grid, ratio, steps_per_batch, power

    def training_steps(self, batch, rng):
        return aps_training_steps(self.model, batch[0], self.grid, self.ratio, self.steps_per_batch, self.power, rng)

    def split_backbone(self, chunks: int):
        split_batch(self.module.encoder, chunks, ("forward_kept",))     # no batch norm: any chunks are exact

    def lr_at(self, epoch: float) -> float:
        return self.lr * aps_factor(epoch, self.warmup_epochs, self.epochs)

    def backbone_record(self) -> dict:
        return backbone_record("APS", "vit", "encoder.", ("projector.", "predictor."), self.model_config,
                               format="ours-aps")
