"""Frozen-feature linear segmentation probe (docs/SEGMENTATION.md): a frozen backbone (any checkpoint we read, or a
random init), its last-layer patch tokens (ViT; --layers 4: the last four, concatenated) or last stage (ResNet),
BatchNorm and a 1x1 linear classifier, bilinear upsampling to the label size, cross-entropy with the ignore index;
mIoU and pixel accuracy on the validation split. Launch many processes with torchrun.
"""
from functools import partial

from data.loader import build_eval_loader, build_train_loader, per_rank_batch_size
from data.pipeline import TrainData
from data.datasets import IMAGENET_MEAN, IMAGENET_STD
from data.segmentation import SEG_DATASETS, SHAPES_MEAN, SHAPES_STD, JointTransform, build_seg_dataset
from methods.run import Run
from methods.segment import SegmentationProbing
from models.dense import DenseFeatures, SegProbe, dense_backbone
from models.linear import PROBE_ARCHS, BackboneGuard
from models.loading import open_checkpoint
from models.registry import is_registry_name
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.flags import count, data_root, input_weights, output_folder, positive
from utils.optim import add_adamw_args, adamw_from_args
from utils.run import add_runtime_args, check_per_process
from utils.runtime import seed_everything
from utils.schedule import poly


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--seg-dataset", default="shapes", choices=SEG_DATASETS,
                   help="shapes: embedded and generated (no files); voc, ade20k, folder: the layouts of "
                        "docs/SEGMENTATION.md under --data-root")
    g.add_argument("--data-root", type=data_root(), default=None, help="the dataset's folder")
    g.add_argument("--num-classes", type=count(), default=None, help="classes of --seg-dataset folder (0..N-1)")
    g.add_argument("--img-size", type=count(), default=64, help="crop size for training and evaluation")
    g.add_argument("--batch-size", type=count(), default=16, help="global batch size")
    g.add_argument("--num-workers", type=count(zero="load in the main process"), default=2, help="workers per process")
    g.add_argument("--output-dir", type=output_folder(), default="./output/segprobe", help="checkpoints and logs")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", type=input_weights(empty="a random init", registry=is_registry_name), default="",
                   help="the frozen backbone: any checkpoint we read (ours, a release, timm, torchvision, MAE, MoCo "
                        "v3, DINO, a hub folder)")
    g.add_argument("-a", "--arch", default=None, choices=PROBE_ARCHS, help="backbone of a random init (checked "
                                                                          "against --pretrained)")
    g.add_argument("--patch-size", type=count(), default=None, help="ViT patch size of a random init (default 8)")
    g.add_argument("--random-init", action="store_true",
                   help="the baseline: --pretrained's architecture with fresh random weights (seeded)")
    g.add_argument("--layers", type=count(), default=1, help="ViT: the last N blocks' tokens, concatenated")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--nepoch", dest="epochs", type=count(), default=20, help="training epochs")
    g.add_argument("--lr", type=positive(), default=1e-3, help="AdamW lr per 16 images (scaled by batch / 16)")
    add_adamw_args(g, weight_decay=1e-4, decay_on="on the probe's weights")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=count(zero="never"), default=5, help="evaluate every N epochs and at the end")
    g.add_argument("--eval-scales", type=positive(), nargs="+", default=[1.0], metavar="S",
                   help="multi-scale evaluation: the softmax averaged over the image resized by each (e.g. 0.75 1 "
                        "1.25)")
    add_runtime_args(p)
    return p


@exit_on_user_error
def main(args):
    run = Run(args)
    check_per_process(args.batch_size, 2, "the probe's batch norm")
    source = open_checkpoint(args.pretrained) if args.pretrained else None
    seed_everything(args.seed)                      # a random init's weights are the seed's (begin seeds the rest)
    backbone, cfg = dense_backbone(source, args.arch, args.patch_size, args.img_size, args.random_init)
    features = DenseFeatures(backbone, cfg["family"], args.layers)
    if cfg["family"] == "vit" and args.img_size % features.stride:
        raise UserError(f"--img-size {args.img_size} is not a multiple of the ViT's patch {features.stride}; pass a "
                        "multiple")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.seg_dataset != "shapes" else (SHAPES_MEAN, SHAPES_STD)
    train, classes = build_seg_dataset(args.seg_dataset, args.data_root, True,
                                       JointTransform(args.img_size, mean, std, True), args.num_classes)
    val, _ = build_seg_dataset(args.seg_dataset, args.data_root, False,
                               JointTransform(args.img_size, mean, std, False), args.num_classes)
    run.begin()
    loader = build_train_loader(train, args.batch_size, args.num_workers, args.seed, run.device)
    run.data = TrainData(train, loader, False, classes)
    val_loader = build_eval_loader(val, max(1, per_rank_batch_size(args.batch_size)), args.num_workers, run.device)
    probe = run.place(SegProbe(features, classes), sync_bn=True)
    lr = args.lr * args.batch_size / 16
    optimizer = adamw_from_args(args, lr)
    method = SegmentationProbing(probe, run.parallel(probe), partial(poly, epochs=args.epochs, base=lr), val_loader,
                                 run.device, run.amp, classes, BackboneGuard(probe.features), args.eval_scales,
                                 model_config=dict(backbone=cfg, num_classes=classes, layers=args.layers))
    weights = "random init" if args.random_init or not args.pretrained else args.pretrained
    what = (f"segmentation probe on {cfg['arch']} ({weights}), {args.seg_dataset}, "
            f"{classes} classes at {args.img_size} px, {args.layers} layer(s)")
    return run.train(method, optimizer, what, lr, eval_every=args.eval_every, identity=("seg_dataset", "img_size"))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
