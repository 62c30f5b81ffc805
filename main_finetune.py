"""Fine-tune an APS ViT for classification, or train one from scratch (SPEC part B)."""
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from augment import finetune_transforms
from augment.device_finetune import finetune_device_view
from augment.randaugment import parse_policy
from data import add_data_args, apply_preset, build_dataset, build_eval_loader, build_train_loader
from data.datasets import num_classes_of
from data.device import add_data_path_arg, device_loader, use_device_path
from data.loader import holdout_split, per_rank_batch_size
from engine import Trainer, add_runtime_args, start_run
from models import create_vit
from models.vit import add_vit_args, vit_overrides
from models.loading import load_classifier
from utils.accuracy import evaluate_classifier
from utils.checkpoint import find_resume_path, load_strict, load_training_checkpoint
from utils.dist import cleanup, get_world_size, init_distributed
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.runtime import amp_dtype, fused, make_grad_scaler, seed_everything
from utils.schedule import warmup_cosine

BASE_LR = {"vit-tiny": 2e-3, "vit-small": 1e-3, "vit-base": 5e-4}  # per 512 images


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_path_arg(add_data_args(p, batch_size=128))
    g = add_vit_args(p)
    g.add_argument("--pretrained-weights", default="", help="APS checkpoint (ours or the reference's); "
                                                            "empty: train from scratch")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate (applied, unlike the reference)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="fine-tuning epochs")
    g.add_argument("--base-lr", type=float, default=None,
                   help="lr per 512 images (default 2e-3 tiny, 1e-3 small, 5e-4 base); lr = base * batch / 512")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, "
                                                                     "pos_embed, cls_token)")
    g.add_argument("--opt-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--warmup-epochs", type=float, default=5, help="linear warmup epochs")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at the start of the warmup")
    g.add_argument("--min-lr", type=float, default=1e-5, help="lr at the end of the cosine")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (e.g. 0.75); off by default")
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy ('none' to disable)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel", choices=("pixel", "rand", "const"), help="random erasing mode")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g = p.add_argument_group("evaluation")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights and evaluate it")
    g.add_argument("--model-ema-decay", type=float, default=0.9999, help="EMA decay per step")
    g.add_argument("--val-split", type=float, default=0.0,
                   help="hold out this fraction of the training set to select the best epoch (checkpoint-best.pth)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs and at the end")
    g.add_argument("--eval", action="store_true",
                   help="only evaluate --resume (default <output-dir>/checkpoint.pth) on the test set")
    add_runtime_args(p)
    return p


def build_model(args, num_classes):
    """(model, config): from --pretrained-weights with a new head, or from scratch."""
    overrides = vit_overrides(args)
    if args.pretrained_weights:
        extra = {"num_heads": args.num_heads} if args.num_heads else {}
        return load_classifier(args.pretrained_weights, num_classes, args.arch, args.patch_size, args.img_size,
                               drop_path_rate=args.drop_path, **extra)
    cfg = dict(arch=args.arch, img_size=args.img_size, patch_size=args.patch_size, num_classes=num_classes,
               drop_path_rate=args.drop_path, **overrides)
    return create_vit(**cfg), cfg


def param_groups(module, weight_decay: float, layer_decay: float = None):
    """No decay on ndim <= 1 tensors (norms, biases) and on pos_embed / cls_token; with layer decay, each
    group carries timm's `lr_scale` (layer_decay ** (depth + 1 - layer))."""
    no_decay = module.no_weight_decay()
    if layer_decay:
        return param_groups_layer_decay(module, weight_decay, no_decay, layer_decay=layer_decay)
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=no_decay)


def evaluate_only(args, test_loader, device, amp, logger):
    path = find_resume_path(args.resume, args.output_dir)
    if path is None:
        raise UserError(f"--eval needs a fine-tuned checkpoint: pass --resume PATH (none in {args.output_dir})")
    ckpt = load_training_checkpoint(path)
    model = create_vit(**ckpt["model_config"]).to(device)
    ema = ckpt.get("extra", {}).get("ema")
    weights = {k[len("module."):]: v for k, v in ema.items()} if ema else ckpt["model"]
    load_strict(model, weights, path)
    metrics = evaluate_classifier(model, test_loader, device, amp)
    logger.info(f"{path} ({'EMA' if ema else 'live'} weights): test top-1 {metrics['acc1']:.2f}% "
                f"top-5 {metrics['acc5']:.2f}%")
    return {f"test_{k}": v for k, v in metrics.items()}


@exit_on_user_error
def main(args):
    device = init_distributed(args.device)
    preset = apply_preset(args)
    args.base_lr = args.base_lr or BASE_LR[args.arch]
    mixing = args.mixup > 0 or args.cutmix > 0
    if mixing and per_rank_batch_size(args.batch_size) % 2:
        raise UserError(f"mixup/cutmix need an even batch per process (got {args.batch_size // get_world_size()}); "
                        "change --batch-size or pass --mixup 0 --cutmix 0")
    if args.aa != "none":
        try:
            parse_policy(args.aa)
        except ValueError as e:
            raise UserError(f"--aa {args.aa}: {e}; use e.g. --aa rand-m9-mstd0.5-inc1, or --aa none") from e
    seed_everything(args.seed)
    logger = start_run(args)
    amp = amp_dtype(args.amp, device)

    train_tf, eval_tf = finetune_transforms(preset, args.img_size, args.aa, args.reprob, args.remode)
    test_set = build_dataset(args.dataset, args.data_root, train=False, transform=eval_tf, download=args.download)
    eval_bs = max(1, per_rank_batch_size(args.batch_size))
    test_loader = build_eval_loader(test_set, eval_bs, args.num_workers, device)
    if args.eval:
        return evaluate_only(args, test_loader, device, amp, logger)
    on_device = use_device_path(args, "image folders" if args.dataset == "imagefolder" else None)
    train_set = build_dataset(args.dataset, args.data_root, train=True, transform=None if on_device else train_tf)
    num_classes = num_classes_of(train_set)
    val_loader = None
    if args.val_split:
        keep, held = holdout_split(len(train_set), args.val_split, args.seed)
        val_set = Subset(build_dataset(args.dataset, args.data_root, train=True, transform=eval_tf), held)
        train_set = Subset(train_set, keep)
        val_loader = build_eval_loader(val_set, eval_bs, args.num_workers, device)
    if on_device:  # uint8 images on the device, SPEC B's view made there in batches
        views = finetune_device_view(preset, args.img_size, args.aa, args.reprob, args.remode)
        loader = device_loader(train_set, args, device, views.compile() if args.compile else views)
    else:
        loader = build_train_loader(train_set, args.batch_size, args.num_workers, args.seed, device)

    module, model_config = build_model(args, num_classes)
    module.to(device)
    model = module
    if get_world_size() > 1:
        model = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    lr = args.base_lr * args.batch_size / 512
    optimizer = torch.optim.AdamW(param_groups(module, args.weight_decay, args.layer_decay), lr=lr, eps=args.opt_eps,
                                  **fused(device))
    ema = ModelEmaV3(module, decay=args.model_ema_decay) if args.model_ema else None
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                  num_classes=num_classes) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    logger.info(f"{args.arch}/{args.patch_size} at {args.img_size} px, {num_classes} classes, {len(train_set)} "
                f"training images, lr {lr:.3g}, {'pretrained' if args.pretrained_weights else 'from scratch'}, "
                f"data path {'device' if on_device else 'cpu workers'}")

    def train_steps(batch, rng):
        images, target = batch
        if mixup is not None:
            images, target = mixup(images, target)
        yield criterion(model(images), target), {}

    def evaluate(epoch):
        net = ema.module if ema is not None else module
        out = {f"test_{k}": v for k, v in evaluate_classifier(net, test_loader, device, amp).items()}
        if val_loader is not None:
            out.update({f"val_{k}": v for k, v in evaluate_classifier(net, val_loader, device, amp).items()})
        return out

    trainer = Trainer(
        args=args, module=module, model=model, optimizer=optimizer, scaler=make_grad_scaler(device, amp),
        loader=loader, train_steps=train_steps, steps_per_batch=1,
        lr_at=lambda e: warmup_cosine(e, args.warmup_epochs, args.epochs, lr, args.min_lr, args.warmup_lr),
        epochs=args.epochs, device=device, amp=amp, evaluate=evaluate, eval_every=args.eval_every,
        extra_state={"ema": ema} if ema is not None else None, model_config=model_config,
        after_step=(lambda step: ema.update(module, step)) if ema is not None else None,
        select_metric="val_acc1" if val_loader is not None else None)
    metrics = trainer.fit()
    if "test_acc1" in metrics:
        logger.info(f"final-epoch test top-1 {metrics['test_acc1']:.2f}% (top-5 {metrics['test_acc5']:.2f}%)"
                    + (f", best val top-1 {trainer.best:.2f}%" if trainer.best is not None else ""))
    cleanup()
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
