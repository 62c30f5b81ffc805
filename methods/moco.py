"""MoCo v2 (with any Asym-Siam switches) as a Trainer method (docs/REFERENCE.md#moco): one optimizer step per batch, the
query encoder under SGD with a cosine schedule per epoch."""
from methods.selfsup import SelfSupervised
from models.moco import moco_inputs, shuffle_permutation
from utils.dist import get_world_size
from utils.checkpoint import backbone_record
from utils.errors import UserError
from utils.recompute import split_batch
from utils.schedule import cosine_per_epoch


class MoCoPretraining(SelfSupervised):
    """module: a models.moco.MoCo (model: the same, DDP-wrapped); knn: evaluate(epoch) -> kNN metrics, or None."""

    name = "MoCo"

    def __init__(self, module, model, lr: float, epochs: int, knn=None, model_config: dict = None):
        super().__init__(module, model, lr, epochs, 0.0, knn, model_config)

    def training_steps(self, batch, rng):
        query, keys, minis = moco_inputs(batch[0], rng)
        perm = shuffle_permutation(keys, rng)
        self.module.momentum_update()                           # eager, outside the (compiled, DDP) forward
        yield self.model(query, keys, minis, perm=perm, update_key_encoder=False)

    def split_backbone(self, chunks: int):
        """The query encoder in chunks of whole BN splits (each BN then sees what it sees without); the key encoder
        (no gradient), shuffle-BN, the loss and the queue on the whole batch."""
        splits = self.module.splits
        if get_world_size() > 1:
            raise UserError(f"--accum-steps {chunks}: with {get_world_size()} processes each one's batch norm "
                            "normalises its whole batch, which chunks cannot reproduce; run one process with "
                            f"--bn-splits (a multiple of {chunks}), or leave --accum-steps out")
        if splits % chunks:
            raise UserError(f"--accum-steps {chunks} does not divide --bn-splits {splits}: MoCo's batch norms "
                            f"normalise each split, so a chunk must hold whole splits; use --bn-splits "
                            f"{chunks * max(1, splits // chunks)} or an --accum-steps that divides {splits}")
        split_batch(self.module.encoder_q, chunks)

    def lr_at(self, epoch: float) -> float:
        return cosine_per_epoch(epoch, self.epochs, self.lr)

    def param_groups(self) -> list:
        """The query encoder (with its projector); the key encoder follows it by momentum."""
        return [{"params": list(self.module.encoder_q.parameters())}]

    def backbone_record(self) -> dict:
        """The query encoder without its fc (the projector); the key encoder and the queue are left out."""
        config = {k: self.model_config[k] for k in ("arch", "cifar_stem") if k in self.model_config}
        return backbone_record("MoCo", "resnet", "encoder_q.", ("encoder_q.fc.",), config, format="ours-moco")
