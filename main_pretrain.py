"""APS pretraining of a ViT: asymmetric patch sampling + contrastive loss (SPEC part A)."""
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from augment import TwoViews, add_aps_augment_args, aps_augment_kwargs, aps_view_transform
from augment.device import aps_device_views
from data import add_data_args, apply_preset, build_dataset, build_train_loader
from data.device import DeviceLoader, add_data_path_arg, device_loader, use_device_path
from engine import Trainer, add_runtime_args, start_run
from models import APS, create_vit
from models.vit import add_vit_args, vit_overrides
from models.aps import aps_training_steps
from samplers.aps import kept_per_view
from utils.dist import cleanup, get_world_size, init_distributed
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.knn import add_knn_args, knn_monitor
from utils.runtime import amp_dtype, fused, make_grad_scaler, seed_everything
from utils.schedule import aps_factor
from utils.syncbn import convert_sync_batchnorm

BASE_LR = {"vit-tiny": 1e-3, "vit-small": 5e-4, "vit-base": 5e-4}


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_path_arg(add_data_args(p, batch_size=512))
    g = add_vit_args(p)
    g.add_argument("--proj-hidden-dim", type=int, default=512, help="projector hidden width")
    g.add_argument("--proj-dim", type=int, default=128, help="projector output width")
    g.add_argument("--pred-hidden-dim", type=int, default=512, help="predictor hidden width")
    g = p.add_argument_group("APS")
    g.add_argument("--sampling-ratio", type=float, default=0.25, help="fraction of patches kept per view")
    g.add_argument("--nsampling", type=int, default=4, help="sampling rounds (= optimizer steps) per batch")
    g.add_argument("--power", type=float, default=3.0, help="view-2 cells drawn with probability ~ uncovered^power")
    g.add_argument("--temperature", type=float, default=0.1, help="contrastive temperature T")
    g = p.add_argument_group("optimisation")
    g.add_argument("--nepoch", type=int, default=1600, help="pretraining epochs E")
    g.add_argument("--warmup-epochs", type=float, default=20, help="linear warmup epochs")
    g.add_argument("--base-lr", type=float, default=None,
                   help="lr per 256 images (default 1e-3 tiny, 5e-4 small/base); lr = base * batch / 256")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (on all parameters)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"), help="AdamW betas")
    add_aps_augment_args(p)
    add_knn_args(p)
    add_runtime_args(p)
    return p


def validate(args, grid: int):
    for name in ("sampling_ratio", "temperature", "nepoch", "batch_size"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    if args.warmup_epochs < 0 or args.num_workers < 0:
        raise UserError("--warmup-epochs and --num-workers must be >= 0")
    for name in ("flip_prob", "color_jitter_prob", "grayscale_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must lie in [0, 1]")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop-scale {args.crop_scale[0]} {args.crop_scale[1]} must satisfy 0 < MIN <= MAX <= 1")
    try:
        kept_per_view(grid * grid, args.sampling_ratio, args.nsampling)
    except ValueError as e:
        raise UserError(f"{e} (flags --sampling-ratio/--nsampling, {grid}x{grid} patches)") from e


@exit_on_user_error
def main(args):
    device = init_distributed(args.device)
    preset = apply_preset(args)
    args.base_lr = args.base_lr or BASE_LR[args.arch]
    model_config = dict(arch=args.arch, img_size=args.img_size, patch_size=args.patch_size, **vit_overrides(args))
    seed_everything(args.seed)  # same initial weights on every rank and every run
    encoder = create_vit(**model_config)  # validates arch / sizes before any work
    validate(args, encoder.grid)
    logger = start_run(args)

    if use_device_path(args):  # uint8 dataset on the device, views made there in batches
        train_set = build_dataset(args.dataset, args.data_root, train=True, download=args.download)
        views = aps_device_views(preset, args.img_size, **aps_augment_kwargs(args))
        loader = device_loader(train_set, args, device, views.compile() if args.compile else views)
    else:
        views = TwoViews(aps_view_transform(preset, args.img_size, **aps_augment_kwargs(args)))
        train_set = build_dataset(args.dataset, args.data_root, train=True, download=args.download, transform=views)
        loader = build_train_loader(train_set, args.batch_size, args.num_workers, args.seed, device)

    model = APS(encoder, args.proj_hidden_dim, args.proj_dim, args.pred_hidden_dim, args.temperature).to(device)
    module = model
    if get_world_size() > 1:
        module = model = convert_sync_batchnorm(model, device)
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    lr = args.base_lr * args.batch_size / 256
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, **fused(device))
    amp = amp_dtype(args.amp, device)
    logger.info(f"{args.arch}/{args.patch_size} at {args.img_size} px, {len(train_set)} images, "
                f"{len(loader)} batches x {args.nsampling} steps per epoch, lr {lr:.3g}, device {device}, "
                f"{get_world_size()} process(es), precision {amp or torch.float32}, "
                f"data path {'device' if isinstance(loader, DeviceLoader) else 'cpu workers'}")

    evaluate = knn_monitor(args, preset, module.encoder, device, amp)
    grid = encoder.grid
    trainer = Trainer(
        args=args, module=module, model=model, optimizer=optimizer, scaler=make_grad_scaler(device, amp),
        loader=loader, steps_per_batch=args.nsampling,
        train_steps=lambda batch, rng: aps_training_steps(model, batch[0], grid, args.sampling_ratio,
                                                          args.nsampling, args.power, rng),
        lr_at=lambda e: lr * aps_factor(e, args.warmup_epochs, args.nepoch),
        epochs=args.nepoch, device=device, amp=amp, evaluate=evaluate, eval_every=args.knn_every,
        model_config=model_config)
    metrics = trainer.fit()
    if "knn_top1" in metrics:
        logger.info(f"final kNN top-1 {metrics['knn_top1']:.2f}% (top-5 {metrics['knn_top5']:.2f}%)")
    logger.info(f"checkpoint: {os.path.join(args.output_dir, 'checkpoint.pth')}")
    cleanup()
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
