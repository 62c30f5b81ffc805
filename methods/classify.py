"""Supervised classification as Trainer methods: fine-tuning (docs/REFERENCE.md#fine-tuning: mixup/cutmix, an optional
EMA that is what gets evaluated, held-out selection) and the linear probe (docs/REFERENCE.md#linear-probe: a frozen
backbone, checked after the first epoch); and the evaluation of a saved classifier (--eval / --evaluate)."""
import torch

from engine import Method
from models.loading import load_fine_tuned, open_checkpoint
from models.vit import create_vit, param_groups
from utils.accuracy import evaluate_classifier
from utils.checkpoint import backbone_record, find_resume_path, load_strict, load_training_checkpoint
from utils.errors import UserError
from utils.log import get_logger
from utils.recompute import split_batch
from utils.runtime import no_autocast


def classification_loss(criterion, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """criterion(logits, target) in fp32 (at least), outside autocast: the log-softmax over bf16/fp16 logits, and
    the soft targets of mixup and smoothing, stay exact."""
    with no_autocast(logits.device):
        up = lambda t: t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t  # noqa: E731
        return criterion(up(logits), up(target))


class Classification(Method):
    """Steps of criterion(model(images), labels), mixup/cutmix first when given; evaluation of every loader in
    `eval_loaders` ({split: loader} -> '{split}_acc1', ...) on the EMA's weights when there is an EMA, else on
    `evaluated` (default: the module). schedule(epoch) -> lr. records: more state to checkpoint (the data's:
    data.pipeline.TrainData.records)."""

    def __init__(self, module, model, criterion, schedule, eval_loaders: dict, device, amp, mixup=None, ema=None,
                 evaluated=None, model_config: dict = None, select_metric: str = None, records: dict = None):
        super().__init__(module, model, model_config, {**({"ema": ema} if ema is not None else {}), **(records or {})})
        self.criterion, self.schedule, self.mixup, self.ema = criterion, schedule, mixup, ema
        self.eval_loaders, self.device, self.amp = eval_loaders, device, amp
        self.evaluated = module if evaluated is None else evaluated
        self.select_metric = select_metric

    def training_steps(self, batch, rng):
        images, target = batch
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        yield classification_loss(self.criterion, self.model(images), target), {}

    def lr_at(self, epoch: float) -> float:
        return self.schedule(epoch)

    def summary(self, metrics: dict, best=None, start: dict = None) -> str:
        if "test_acc1" not in metrics:
            return ""
        return f"final test top-1 {metrics['test_acc1']:.2f}% (top-5 {metrics['test_acc5']:.2f}%)"

    def split_backbone(self, chunks: int):
        """The classifier in chunks (a ViT mixes no samples; mixup and cutmix are drawn on the whole batch before
        it runs); the loss on the whole batch."""
        split_batch(self.module, chunks)

    def after_step(self, step: int):
        if self.ema is not None:
            self.ema.update(self.module, step)

    def evaluate(self, epoch: int) -> dict:
        net = self.ema.module if self.ema is not None else self.evaluated
        return {f"{split}_{k}": v for split, loader in self.eval_loaders.items()
                for k, v in evaluate_classifier(net, loader, self.device, self.amp).items()}


class FineTuning(Classification):
    """Classification whose closing line says the test accuracy is the last epoch's (the best held-out epoch is
    only selected, as checkpoint-best.pth)."""
    name = "fine-tuning"

    def __init__(self, *args, weight_decay: float = 0.0, layer_decay: float = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_decay, self.layer_decay = weight_decay, layer_decay

    def summary(self, metrics: dict, best=None, start: dict = None) -> str:
        if "test_acc1" not in metrics:
            return ""
        return (f"final-epoch test top-1 {metrics['test_acc1']:.2f}% (top-5 {metrics['test_acc5']:.2f}%)"
                + (f", best val top-1 {best:.2f}%" if best is not None else ""))

    def param_groups(self) -> list:
        """No weight decay on norms, biases and the position embedding; with --layer-decay each group's lr_scale
        (models.vit.param_groups)."""
        return param_groups(self.module, self.weight_decay, self.layer_decay)

    def backbone_record(self) -> dict:
        """The whole ViT but its classifier, which a reader may keep (--eval, the weights tool)."""
        return backbone_record("fine-tuning", "vit", "", ("head.",), self.model_config, classifier="head.",
                               format="ours-vit")


class LinearProbing(Classification):
    """Classification of a models.linear.LinearProbe: `guard` (a BackboneGuard) remembers the backbone before
    the first optimizer step and checks after the first epoch that training left it alone."""

    name = "the linear probe"

    def __init__(self, *args, guard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard

    def training_steps(self, batch, rng):
        self.guard.snapshot()                       # before the first optimizer step of this process
        return super().training_steps(batch, rng)

    def param_groups(self) -> list:
        """The new linear layer (and --head-bn's BN) only: the backbone is frozen."""
        return [{"params": list(self.module.head.parameters())}]

    def after_epoch(self, epoch: int):
        self.guard.check()

    def split_backbone(self, chunks: int):
        """The frozen backbone (no gradient, eval mode) in chunks, the head (and its BN) on the whole batch."""
        split_batch(self.module.backbone, chunks)


def saved_source(args, flag: str, what: str) -> str:
    """What --eval/--evaluate reads: --resume, else <output-dir>/checkpoint.pth."""
    path = find_resume_path(args.resume, args.output_dir)
    if path is None:
        raise UserError(f"{flag} needs {what}: pass --resume PATH (none in {args.output_dir})")
    return path


def saved_checkpoint(args, flag: str, what: str):
    """(path, checkpoint) for --eval/--evaluate: --resume, else <output-dir>/checkpoint.pth."""
    path = saved_source(args, flag, what)
    return path, load_training_checkpoint(path)


def finetuned_classifier(source, given: dict, num_classes: int):
    """(model, weights to load or None, note) of what --eval evaluates: one of our fine-tuning checkpoints (its
    EMA when it kept one), or a released fine-tuned APS classifier (the reference's pickled ViT, read without
    running it; given: the --arch/--patch-size/--img-size passed and the --depth/--embed-dim/--num-heads as
    `given`, checked against the file)."""
    ck = open_checkpoint(source)
    if not ck.head or (ck.format.ours and not ck.saved):
        raise UserError(f"{ck.name} holds {ck.format.name}, not a fine-tuned classifier; --eval takes one of our "
                        "fine-tuning checkpoints or a released fine-tuned APS file")
    if not ck.format.ours:
        model, _ = load_fine_tuned(ck, num_classes=num_classes, **given)
        return model, None, " (released fine-tuned classifier)"
    ck.vit_config(**given)                                  # the flags given must describe it
    weights, which = ema_or_live(ck.loaded)
    return create_vit(**ck.saved), weights, f" ({which} weights)"


def ema_or_live(ckpt: dict):
    """(weights, 'EMA' or 'live'): a fine-tuned checkpoint's EMA weights when it kept an EMA, else the model's."""
    ema = ckpt.get("extra", {}).get("ema")
    if ema:
        return {k[len("module."):]: v for k, v in ema.items()}, "EMA"
    return ckpt["model"], "live"


def evaluate_saved(model, weights, path: str, loader, device, amp, note: str = "") -> dict:
    """Load `weights` (unless None: already loaded) into `model` strictly, evaluate it on `loader`, log one line;
    {'test_acc1', ...}."""
    model.to(device)
    if weights is not None:
        load_strict(model, weights, path)
    metrics = evaluate_classifier(model, loader, device, amp)
    get_logger().info(f"{path}{note}: test top-1 {metrics['acc1']:.2f}% top-5 {metrics['acc5']:.2f}%")
    return {f"test_{k}": v for k, v in metrics.items()}
