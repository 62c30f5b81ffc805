"""Fine-tune an APS ViT for classification, or train one from scratch (docs/REFERENCE.md#fine-tuning)."""
from functools import partial

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from augment.recipes import add_finetune_view_args, eval_view, finetune_view_from_args
from data import add_data_args, per_rank_batch_size
from data.datasets import num_classes_of
from data.pipeline import eval_loader
from methods.classify import FineTuning, evaluate_saved, finetuned_classifier, saved_source
from methods.run import Run
from models.loading import build_classifier, vit_label
from models.vit import add_vit_args, check_vit_flags, vit_overrides
from utils.dist import get_world_size
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.run import VIT_IDENTITY, add_runtime_args, check_per_process
from utils.optim import add_adamw_args, adamw_from_args
from utils.schedule import warmup_cosine
from models.registry import is_registry_name
from utils.flags import count, fraction, input_weights, momentum, nonnegative, positive, probability, rate

BASE_LR = {"vit-tiny": 2e-3, "vit-small": 1e-3, "vit-base": 5e-4}  # per 512 images


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_args(p, batch_size=128, subset="the training set")
    g = add_vit_args(p, arch=None, arch_help="ViT size (depth 12); default: what --pretrained-weights or --eval's "
                                              "file holds, else vit-small")
    g.add_argument("--pretrained-weights", type=input_weights(empty="train from scratch", registry=is_registry_name),
                   default="", help="APS checkpoint: ours or the reference's, pretrained or fine-tuned")
    g.add_argument("--drop-path", type=rate(), default=0.1,
                   help="stochastic depth rate (applied, unlike the reference)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--nepoch", dest="epochs", type=count(), default=100, help="fine-tuning epochs")
    g.add_argument("--base-lr", type=positive(), default=None,
                   help="lr per 512 images (default 2e-3 tiny, 1e-3 small, 5e-4 base); lr = base * batch / 512")
    add_adamw_args(g, weight_decay=0.05, decay_on="not on norms, biases, pos_embed, cls_token", eps=True)
    g.add_argument("--warmup-epochs", type=nonnegative(), default=5, help="linear warmup epochs")
    g.add_argument("--warmup-lr", type=nonnegative(), default=1e-6, help="lr at the start of the warmup")
    g.add_argument("--min-lr", type=nonnegative(), default=1e-5, help="lr at the end of the cosine")
    g.add_argument("--layer-decay", type=fraction(high_closed=True), default=None,
                   help="layer-wise lr decay (e.g. 0.75); off by default")
    g = add_finetune_view_args(p)
    g.add_argument("--mixup", type=nonnegative(zero="off"), default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=nonnegative(zero="off"), default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup-prob", type=probability(), default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=probability(), default=0.5,
                   help="probability of cutmix when both are on")
    g.add_argument("--smoothing", type=rate(), default=0.1, help="label smoothing")
    g = p.add_argument_group("evaluation")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights and evaluate it")
    g.add_argument("--model-ema-decay", type=momentum(), default=0.9999, help="EMA decay per step")
    g.add_argument("--val-split", type=fraction(zero="no held-out split"), default=0.0,
                   help="hold out this fraction of the training set to select the best epoch (checkpoint-best.pth)")
    g.add_argument("--eval-every", type=count(zero="never"), default=1, help="evaluate every N epochs and at the end")
    g.add_argument("--eval", action="store_true",
                   help="only evaluate --resume (default <output-dir>/checkpoint.pth) on the test set: one of our "
                        "fine-tuning checkpoints, or a released fine-tuned APS file (a path or a registry name)")
    add_runtime_args(p, resume_names=is_registry_name)
    return p


@exit_on_user_error
def main(args):
    given = dict(arch=args.arch, patch_size=args.patch_size, img_size=args.img_size,   # what --eval checks
                 given=vit_overrides(args))
    run = Run(args)
    device, preset = run.device, run.preset
    mixing = args.mixup > 0 or args.cutmix > 0
    check_per_process(args.batch_size, 1, "training")
    if mixing and per_rank_batch_size(args.batch_size) % 2:
        raise UserError(f"mixup/cutmix need an even batch per process (got {args.batch_size // get_world_size()}); "
                        "change --batch-size or pass --mixup 0 --cutmix 0")
    check_vit_flags(args.arch or ("vit-small" if not (args.pretrained_weights or args.eval) else None), args.img_size,
                    args.patch_size, args.embed_dim, args.num_heads)
    recipe = finetune_view_from_args(args, preset)
    amp = run.begin().amp

    test_view = eval_view(preset, args.img_size, *preset.finetune_stats)
    eval_bs = max(1, per_rank_batch_size(args.batch_size))
    test_loader = eval_loader(args, test_view, device, eval_bs)
    if args.eval:
        source = saved_source(args, "--eval", "a fine-tuned checkpoint")
        model, weights, note = finetuned_classifier(source, given, num_classes_of(test_loader.dataset))
        return evaluate_saved(model, weights, source, test_loader, device, amp, note)
    data = run.training_data(recipe, holdout=args.val_split, few_labels=True)
    eval_loaders = {"test": test_loader}
    if data.held_out is not None:
        eval_loaders["val"] = eval_loader(args, test_view, device, eval_bs, train=True, indices=data.held_out)

    module, model_config = build_classifier(args.pretrained_weights, data.num_classes, args.arch, args.patch_size,
                                            args.img_size, args.drop_path, **vit_overrides(args))
    module = run.place(module)
    args.arch = model_config["arch"]
    args.base_lr = args.base_lr or BASE_LR[args.arch]
    lr = args.base_lr * args.batch_size / 512
    optimizer = adamw_from_args(args, lr)     # the method's groups say which parameters decay
    ema = ModelEmaV3(module, decay=args.model_ema_decay) if args.model_ema else None
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                  num_classes=data.num_classes) if mixing else None
    criterion = SoftTargetCrossEntropy() if mixing else torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    schedule = partial(warmup_cosine, warmup_epochs=args.warmup_epochs, epochs=args.epochs, base=lr,
                       min_value=args.min_lr, start_value=args.warmup_lr)
    method = FineTuning(module, run.parallel(module), criterion, schedule, eval_loaders, device, amp, mixup, ema,
                        model_config=model_config, select_metric="val_acc1" if data.held_out is not None else None,
                        records=data.records, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
    what = f"{vit_label(model_config)}/{args.patch_size} at {args.img_size} px, {data.num_classes} classes"
    return run.train(method, optimizer, f"{what}, {'pretrained' if args.pretrained_weights else 'from scratch'}", lr,
                     eval_every=args.eval_every, identity=VIT_IDENTITY, lr_flag="--base-lr")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
