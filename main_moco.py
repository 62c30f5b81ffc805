"""MoCo v2 pretraining of a ResNet with the Asym-Siam asymmetries (SPEC part C).

The baseline and all five switches: MultiCrop, ScaleMix, AsymAug, AsymBN and MeanEnc. Launch many processes with torchrun; the
reference's --dist-url/--multiprocessing-distributed/--world-size/--rank flags are accepted and ignored.
"""
import torch
from torch.nn.parallel import DistributedDataParallel

from augment.mix import scalemix
from augment.device import moco_device_views
from augment.moco import moco_views
from data import add_data_args, apply_preset, build_dataset, build_train_loader
from data.args import add_data_dir_arg, resolve_data_dir
from data.device import DeviceLoader, add_data_path_arg, device_loader, use_device_path
from engine import Trainer, add_runtime_args, start_run
from models.moco import MoCo, check_queue, synchronise_key_projector
from models.resnet import RESNETS, ResNetTrunk, create_resnet, moco_projector
from utils.dist import cleanup, get_world_size, init_distributed
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.knn import add_knn_args, knn_monitor
from utils.runtime import amp_dtype, fused, make_grad_scaler, seed_everything
from utils.schedule import cosine_per_epoch


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_dir_arg(p)
    add_data_path_arg(add_data_args(p, batch_size=256, dataset=None))
    g = p.add_argument_group("model")
    g.add_argument("-a", "--arch", default="resnet50", choices=RESNETS, help="torchvision ResNet")
    g.add_argument("--cifar-stem", default=None, action="store_true",
                   help="3x3 stride-1 first conv, no max-pool (default: on for 32 px datasets)")
    g.add_argument("--mlp-hidden-dim", type=int, default=2048, help="projector hidden width")
    g.add_argument("--moco-dim", type=int, default=128, help="key dimension")
    g.add_argument("--moco-k", type=int, default=65536, help="queue size (a multiple of the global batch)")
    g.add_argument("--moco-m", type=float, default=0.999, help="key-encoder momentum")
    g.add_argument("--moco-t", type=float, default=0.2, help="softmax temperature")
    g.add_argument("--bn-splits", type=int, default=8,
                   help="one process: BN statistics per chunk of the batch (stand-in for shuffle-BN); 1 = off")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="pretraining epochs")
    g.add_argument("--lr", type=float, default=0.03, help="lr per 256 images (scaled by batch / 256)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4, help="weight decay")
    g = p.add_argument_group("augmentation and asymmetries")
    g.add_argument("--blur-prob", type=float, default=0.5, help="Gaussian blur probability")
    g.add_argument("--enable-multicrop", action="store_true", help="MultiCrop: small query crops")
    g.add_argument("--num-mini-crops", type=int, default=6, help="mini query crops with MultiCrop")
    g.add_argument("--mini-crop-size", type=int, default=None, help="mini crop size (default 96/224 of the image)")
    g.add_argument("--mini-crop-scale", type=float, nargs=2, default=(0.05, 0.14), metavar=("MIN", "MAX"),
                   help="mini crop area range; the large crops then use (MAX, 1)")
    g.add_argument("--enable-scalemix", action="store_true",
                   help="ScaleMix: the query pastes a box of a second query view into the first")
    g.add_argument("--enable-asymm-aug", action="store_true",
                   help="AsymAug: RandAugment on the query side, crop + flip only on the key side")
    g.add_argument("--enable-asym-bn", action="store_true",
                   help="AsymBN: synchronise the target projector's BN over groups of processes")
    g.add_argument("--syncbn-group-size", type=int, default=8, help="processes per AsymBN group (divides the world)")
    g.add_argument("--enable-mean-encoding", action="store_true", help="MeanEnc: average several key views")
    g.add_argument("--num-key-views", type=int, default=2, help="key views with MeanEnc")
    g = p.add_argument_group("reference launcher flags (accepted, ignored: use torchrun)")
    for flag in ("--dist-url", "--dist-backend", "--world-size", "--rank", "--gpu"):
        g.add_argument(flag, default=None, help="ignored")
    g.add_argument("--multiprocessing-distributed", action="store_true", help="ignored")
    add_knn_args(p)
    add_runtime_args(p)
    return p


def moco_inputs(v: dict, rng=None):
    """Named views of a batch -> MoCo's (query [N, ...], keys [V, N, ...], mini queries [M, N, ...] or None)."""
    query = scalemix(v["query"], v["query_mix"], rng)[0] if "query_mix" in v else v["query"]
    minis = v["mini_queries"].transpose(0, 1) if "mini_queries" in v else None
    return query, v["keys"].transpose(0, 1), minis


@exit_on_user_error
def main(args):
    device = init_distributed(args.device)
    resolve_data_dir(args)
    preset = apply_preset(args)
    args.cifar_stem = args.img_size <= 64 if args.cifar_stem is None else args.cifar_stem
    args.mini_crop_size = args.mini_crop_size or max(8, round(args.img_size * 96 / 224))
    check_queue(args.moco_k, args.batch_size)
    world = get_world_size()
    bn_splits = args.bn_splits if world == 1 else 1  # many processes: real shuffle-BN across ranks
    if bn_splits > 1 and (args.batch_size % bn_splits or args.batch_size // bn_splits < 2):
        raise UserError(f"--batch-size {args.batch_size} does not split into --bn-splits {bn_splits} chunks of "
                        "2 or more; change one of them (--bn-splits 1 turns split BN off)")
    seed_everything(args.seed)
    logger = start_run(args)

    view_kw = dict(num_key_views=args.num_key_views if args.enable_mean_encoding else 1,
                   num_minis=args.num_mini_crops if args.enable_multicrop else 0, mini_size=args.mini_crop_size,
                   mini_scale=tuple(args.mini_crop_scale), scalemix=args.enable_scalemix)
    if use_device_path(args):
        train_set = build_dataset(args.dataset, args.data_root, train=True, download=args.download)
        views = moco_device_views(preset, args.img_size, args.blur_prob, asym_aug=args.enable_asymm_aug, **view_kw)
        loader = device_loader(train_set, args, device, views.compile() if args.compile else views)
    else:
        views = moco_views(preset, args.img_size, args.blur_prob, asym_aug=args.enable_asymm_aug, **view_kw)
        train_set = build_dataset(args.dataset, args.data_root, train=True, download=args.download, transform=views)
        loader = build_train_loader(train_set, args.batch_size, args.num_workers, args.seed, device)

    encoder = create_resnet(args.arch, args.cifar_stem, bn_splits)
    encoder.fc = moco_projector(encoder.feature_dim, args.mlp_hidden_dim, args.moco_dim, bn_splits)
    module = MoCo(encoder, args.moco_dim, args.moco_k, args.moco_m, args.moco_t).to(device)
    if device.type == "cuda":  # NHWC convolutions (tensor cores); the inputs follow the weights' layout
        module.to(memory_format=torch.channels_last)
    if args.enable_asym_bn:
        if world == 1:
            logger.warning("--enable-asym-bn does nothing with one process (there is nothing to synchronise)")
        else:  # the target (key) projector's BN only, over groups of --syncbn-group-size ranks
            synchronise_key_projector(module, device, args.syncbn_group_size)
    model = module
    if world > 1:
        model = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(module.encoder_q.parameters(), lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, **fused(device))
    amp = amp_dtype(args.amp, device)
    logger.info(f"MoCo v2 {args.arch}{' (CIFAR stem)' if args.cifar_stem else ''} at {args.img_size} px, "
                f"{len(train_set)} images, queue {args.moco_k}, lr {lr:.3g}, {world} process(es), "
                f"split BN {bn_splits}, multicrop {args.enable_multicrop}, scalemix {args.enable_scalemix}, "
                f"asym-aug {args.enable_asymm_aug}, asym-bn {args.enable_asym_bn and world > 1}, "
                f"mean-enc {args.enable_mean_encoding}, data path "
                f"{'device' if isinstance(loader, DeviceLoader) else 'cpu workers'}")

    def train_steps(batch, rng):
        yield model(*moco_inputs(batch[0], rng), rng=rng)

    trainer = Trainer(
        args=args, module=module, model=model, optimizer=optimizer, scaler=make_grad_scaler(device, amp),
        loader=loader, train_steps=train_steps, steps_per_batch=1,
        lr_at=lambda e: cosine_per_epoch(e, args.epochs, lr),
        epochs=args.epochs, device=device, amp=amp,
        evaluate=knn_monitor(args, preset, ResNetTrunk(module.encoder_q), device, amp), eval_every=args.knn_every,
        model_config=dict(arch=args.arch, cifar_stem=args.cifar_stem, mlp_hidden_dim=args.mlp_hidden_dim,
                          moco_dim=args.moco_dim))
    metrics = trainer.fit()
    if "knn_top1" in metrics:
        logger.info(f"final kNN top-1 {metrics['knn_top1']:.2f}% (top-5 {metrics['knn_top5']:.2f}%)")
    cleanup()
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
