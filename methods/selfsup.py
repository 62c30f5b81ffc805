"""What self-supervised pretraining methods share: the kNN monitor (evaluated before the first epoch too, the
random or loaded weights' baseline), its closing line, and a cosine lr with linear warm-up (a method with a
schedule of its own overrides lr_at). A method subclass holds its steps and its checkpoint's record."""
from engine import Method
from utils.knn import knn_summary
from utils.schedule import warmup_cosine


class SelfSupervised(Method):
    """module: the model that is saved (model: the same, DDP-wrapped); lr: the peak lr (after batch scaling);
    knn: evaluate(epoch) -> kNN metrics, or None (no labelled set to monitor with)."""

    evaluate_at_start = True                                # the kNN baseline of the random (or loaded) weights

    def __init__(self, module, model, lr: float, epochs: int, warmup_epochs: float = 0.0, knn=None,
                 model_config: dict = None):
        super().__init__(module, model, model_config)
        self.lr, self.epochs, self.warmup_epochs, self.knn = lr, epochs, warmup_epochs, knn

    def lr_at(self, epoch: float) -> float:
        return warmup_cosine(epoch, self.warmup_epochs, self.epochs, self.lr)

    def evaluate(self, epoch: int):
        return None if self.knn is None else self.knn(epoch)

    def summary(self, metrics: dict, best=None, start: dict = None) -> str:
        return knn_summary(metrics, start)
