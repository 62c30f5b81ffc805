"""Linear classification on a frozen backbone (SPEC part D): MoCo ResNets, APS ViTs, or a random init.

The backbone stays in eval mode and gets no gradient; only a new linear layer (N(0, 0.01), bias 0) trains,
with SGD or LARS (--lars), cosine per epoch. Launch many processes with torchrun; the reference's launcher
flags are accepted and ignored.
"""
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from augment import lincls_transforms
from augment.device import lincls_device_view
from data import add_data_args, apply_preset, build_dataset, build_eval_loader, build_train_loader
from data.args import add_data_dir_arg, resolve_data_dir
from data.datasets import num_classes_of
from data.device import add_data_path_arg, device_loader, use_device_path
from data.loader import per_rank_batch_size
from engine import Trainer, add_runtime_args, start_run
from models.linear import PROBE_ARCHS, BackboneGuard, LinearProbe, backbone_and_fc, backbone_img_size, build_probe
from utils.accuracy import evaluate_classifier
from utils.checkpoint import find_resume_path, load_strict, load_training_checkpoint
from utils.dist import cleanup, get_world_size, init_distributed
from utils.errors import ArgumentParser, UserError, exit_on_user_error
from utils.knn import extract_features
from utils.lars import LARS
from utils.runtime import amp_dtype, make_grad_scaler, seed_everything
from utils.schedule import cosine_per_epoch
from utils.syncbn import convert_sync_batchnorm


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_dir_arg(p)
    add_data_path_arg(add_data_args(p, batch_size=4096, dataset=None))
    g = p.add_argument_group("model")
    g.add_argument("-a", "--arch", default=None, choices=PROBE_ARCHS,
                   help="backbone; read off --pretrained when left out (then it must match); needed for a random init")
    g.add_argument("--pretrained", "--pretrained-weights", dest="pretrained", default="",
                   help="backbone checkpoint: ours (main_moco.py, main_pretrain.py, main_finetune.py) or the "
                        "reference's (Asym-Siam, APS); empty: a randomly initialised backbone")
    g.add_argument("--patch-size", type=int, default=None, help="ViT patch size (checked against the checkpoint)")
    g.add_argument("--head-bn", action="store_true", help="affine-free BN before the linear layer (MAE's probe)")
    g.add_argument("--chunk-size", type=int, default=0,
                   help="run the frozen backbone on chunks of this many images (memory; same result); 0 = whole batch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=90, help="training epochs")
    g.add_argument("--lr", type=float, default=0.1, help="lr per 256 images (scaled by batch / 256)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--lars", action="store_true", help="LARS (trust ratio on the weight matrix) around SGD")
    g.add_argument("--trust-coefficient", type=float, default=0.001, help="LARS trust coefficient")
    g.add_argument("--cache-features", action="store_true",
                   help="extract the features of the centre-cropped images once and train on them (fast; not the "
                        "reference protocol, which augments every epoch)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs and at the end")
    g.add_argument("-e", "--evaluate", action="store_true",
                   help="only evaluate --resume (default <output-dir>/checkpoint.pth) on the test set")
    g = p.add_argument_group("reference launcher flags (accepted, ignored: use torchrun)")
    for flag in ("--dist-url", "--dist-backend", "--world-size", "--rank", "--gpu"):
        g.add_argument(flag, default=None, help="ignored")
    g.add_argument("--multiprocessing-distributed", action="store_true", help="ignored")
    add_runtime_args(p)
    return p


def eval_loader(args, preset, device, img_size):
    test_set = build_dataset(args.dataset, args.data_root, train=False, transform=lincls_transforms(preset, img_size)[1],
                             download=args.download)
    return build_eval_loader(test_set, min(256, max(1, per_rank_batch_size(args.batch_size))), args.num_workers, device)


def evaluate_only(args, preset, device, amp, logger, given_img_size):
    path = find_resume_path(args.resume, args.output_dir)
    if path is None:
        raise UserError(f"--evaluate needs a trained classifier: pass --resume PATH (none in {args.output_dir})")
    ckpt = load_training_checkpoint(path)
    if "backbone" not in ckpt.get("model_config", {}):
        raise UserError(f"{path} is not a main_lincls.py checkpoint; pass the checkpoint.pth of a linear run")
    probe = build_probe(ckpt["model_config"]).to(device)
    load_strict(probe, ckpt["model"], path)
    img_size = given_img_size or ckpt["args"]["img_size"]
    metrics = evaluate_classifier(probe, eval_loader(args, preset, device, img_size), device, amp)
    logger.info(f"{path}: test top-1 {metrics['acc1']:.2f}% top-5 {metrics['acc5']:.2f}%")
    return {f"test_{k}": v for k, v in metrics.items()}


def cached_features(probe, dataset, args, device, amp):
    loader = build_eval_loader(dataset, min(256, max(1, per_rank_batch_size(args.batch_size))), args.num_workers, device)
    feats, labels = extract_features(probe.backbone, loader, device, amp, normalize=False)
    return TensorDataset(feats.cpu(), labels.cpu())


@exit_on_user_error
def main(args):
    device = init_distributed(args.device)
    resolve_data_dir(args)
    given_img_size, given_patch = args.img_size, args.patch_size
    preset = apply_preset(args)
    if args.chunk_size < 0:
        raise UserError(f"--chunk-size {args.chunk_size} must be >= 0 (0: the whole batch at once)")
    seed_everything(args.seed)
    logger = start_run(args)
    amp = amp_dtype(args.amp, device)
    if args.evaluate:
        return evaluate_only(args, preset, device, amp, logger, given_img_size)

    source = args.pretrained or None
    args.img_size = given_img_size or backbone_img_size(source) or preset.img_size
    train_tf, eval_tf = lincls_transforms(preset, args.img_size)
    on_device = not args.cache_features and use_device_path(args)     # cached features need no augmentation
    train_set = build_dataset(args.dataset, args.data_root, train=True, transform=None if on_device else train_tf,
                              download=args.download)
    num_classes = num_classes_of(train_set)
    backbone, fc, backbone_cfg = backbone_and_fc(source, num_classes, args.arch,
                                                 given_patch if source else args.patch_size, args.img_size)
    probe = LinearProbe(backbone, fc, args.head_bn, args.chunk_size).to(device)
    test_loader = eval_loader(args, preset, device, args.img_size)
    if args.cache_features:  # the backbone runs once over centre crops; the head trains on the features
        train_set = cached_features(probe, build_dataset(args.dataset, args.data_root, train=True,
                                                         transform=eval_tf), args, device, amp)
        test_loader = build_eval_loader(cached_features(probe, test_loader.dataset, args, device, amp),
                                        min(256, max(1, per_rank_batch_size(args.batch_size))), 0, device)
    if on_device:
        loader = device_loader(train_set, args, device, lincls_device_view(preset, args.img_size))
    else:
        loader = build_train_loader(train_set, args.batch_size, 0 if args.cache_features else args.num_workers,
                                    args.seed, device)
    if get_world_size() > 1:  # --head-bn: statistics over the global batch, as with one process
        probe.head = convert_sync_batchnorm(probe.head, device)
    trained = probe.head if args.cache_features else probe
    model = trained
    if get_world_size() > 1:
        model = DistributedDataParallel(trained, device_ids=[device] if device.type == "cuda" else None)

    lr = args.lr * args.batch_size / 256
    params = list(probe.head.parameters())
    optimizer = (LARS(params, lr, args.momentum, args.weight_decay, args.trust_coefficient) if args.lars else
                 torch.optim.SGD(params, lr, momentum=args.momentum, weight_decay=args.weight_decay))
    guard = BackboneGuard(probe.backbone)
    criterion = torch.nn.CrossEntropyLoss()
    logger.info(f"linear probe on {backbone_cfg['arch']} ({args.pretrained or 'random init'}), {num_classes} "
                f"classes, {len(train_set)} training images at {args.img_size} px, {'LARS' if args.lars else 'SGD'} "
                f"lr {lr:.3g}{', cached features' if args.cache_features else ''}, "
                f"data path {'device' if on_device else 'cpu workers'}")

    def train_steps(batch, rng):
        guard.snapshot()                       # before the first optimizer step of this process
        inputs, target = batch
        yield criterion(model(inputs), target), {}

    def evaluate(epoch):
        return {f"test_{k}": v for k, v in evaluate_classifier(trained, test_loader, device, amp).items()}

    trainer = Trainer(
        args=args, module=probe, model=model, optimizer=optimizer, scaler=make_grad_scaler(device, amp),
        loader=loader, train_steps=train_steps, steps_per_batch=1, lr_at=lambda e: cosine_per_epoch(e, args.epochs, lr),
        epochs=args.epochs, device=device, amp=amp, evaluate=evaluate, eval_every=args.eval_every,
        model_config=dict(backbone=backbone_cfg, num_classes=num_classes, head_bn=args.head_bn),
        after_epoch=lambda epoch: guard.check())
    metrics = trainer.fit()
    if "test_acc1" in metrics:
        logger.info(f"final test top-1 {metrics['test_acc1']:.2f}% (top-5 {metrics['test_acc5']:.2f}%)")
    cleanup()
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
