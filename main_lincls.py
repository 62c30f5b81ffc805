"""Linear classification on a frozen backbone (docs/REFERENCE.md#linear-probe): MoCo ResNets, APS ViTs, or a random
init.

The backbone stays in eval mode and gets no gradient; only a new linear layer (N(0, 0.01), bias 0) trains,
with SGD or LARS (--lars), cosine per epoch. Launch many processes with torchrun; the reference's launcher
flags are accepted and ignored.
"""
from functools import partial

import torch

from augment.recipes import eval_view, lincls_view
from data import add_data_args, build_eval_loader, per_rank_batch_size
from data.device_loaders import TensorLoader
from data.pipeline import eval_loader
from methods.classify import LinearProbing, evaluate_saved, saved_checkpoint
from methods.run import Run
from models.linear import PROBE_ARCHS, BackboneGuard, LinearProbe, backbone_and_fc, backbone_img_size, build_probe
from models.loading import open_checkpoint
from models.norm import convert_sync_batchnorm
from utils.dist import get_world_size
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.knn import feature_dataset
from utils.run import VIT_IDENTITY, add_runtime_args, check_per_process
from utils.optim import add_lars_args, add_sgd_args, sgd_from_args
from utils.schedule import cosine_per_epoch
from models.registry import is_registry_name
from utils.flags import count, input_weights


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_args(p, batch_size=4096, dataset=None, data_dir=True, subset="the training set")
    g = p.add_argument_group("model")
    g.add_argument("-a", "--arch", default=None, choices=PROBE_ARCHS,
                   help="backbone; read off --pretrained when left out (then it must match); needed for a random init")
    g.add_argument("--pretrained", "--pretrained-weights", dest="pretrained", default="",
                   type=input_weights(empty="a random init", registry=is_registry_name),
                   help="backbone checkpoint: ours (main_moco.py, main_pretrain.py, main_finetune.py) or the "
                        "reference's (Asym-Siam, APS)")
    g.add_argument("--patch-size", type=count(), default=None, help="ViT patch size (checked against the checkpoint)")
    g.add_argument("--head-bn", action="store_true", help="affine-free BN before the linear layer (MAE's probe)")
    g.add_argument("--chunk-size", type=count(zero="the whole batch"), default=0,
                   help="run the frozen backbone on chunks of this many images (memory; same result); 0 = whole batch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--nepoch", dest="epochs", type=count(), default=90, help="training epochs")
    add_sgd_args(g, lr=0.1, weight_decay=0.0)
    add_lars_args(g)
    g.add_argument("--cache-features", action="store_true",
                   help="extract the features of the centre-cropped images once and train on them (fast; not the "
                        "reference protocol, which augments every epoch)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=count(zero="never"), default=1, help="evaluate every N epochs and at the end")
    g.add_argument("-e", "--evaluate", action="store_true",
                   help="only evaluate --resume (default <output-dir>/checkpoint.pth) on the test set")
    add_runtime_args(p, reference_launcher=True)
    return p


@exit_on_user_error
def main(args):
    given_img_size, given_patch = args.img_size, args.patch_size
    run = Run(args)
    device, preset = run.device, run.preset
    check_per_process(args.batch_size, 2 if args.head_bn else 1, "--head-bn's batch norm")
    amp = run.begin().amp
    eval_bs = min(256, max(1, per_rank_batch_size(args.batch_size)))
    if args.evaluate:
        path, ckpt = saved_checkpoint(args, "--evaluate", "a trained classifier")
        if "backbone" not in ckpt.get("model_config", {}):
            raise UserError(f"{path} is not a main_lincls.py checkpoint; pass the checkpoint.pth of a linear run")
        test_view = eval_view(preset, given_img_size or ckpt["args"]["img_size"])
        return evaluate_saved(build_probe(ckpt["model_config"]), ckpt["model"], path,
                              eval_loader(args, test_view, device, eval_bs), device, amp)

    source = open_checkpoint(args.pretrained) if args.pretrained else None      # read from disk once
    args.img_size = given_img_size or backbone_img_size(source) or preset.img_size
    data = run.training_data(lincls_view(preset, args.img_size),  # cached features need no augmentation
                             on_device=False if args.cache_features else None, few_labels=True)
    backbone, fc, backbone_cfg = backbone_and_fc(source, data.num_classes, args.arch,
                                                 given_patch if source else args.patch_size, args.img_size)
    probe = run.place(LinearProbe(backbone, fc, args.head_bn, args.chunk_size))
    test_view = eval_view(preset, args.img_size)
    test_loader, loader = eval_loader(args, test_view, device, eval_bs), data.loader
    if args.cache_features:  # the backbone runs once over centre crops; the head trains on the features
        bank = eval_loader(args, test_view, device, eval_bs, train=True, indices=data.subset)
        train_features = feature_dataset(probe.backbone, bank, device, amp)
        loader = TensorLoader(train_features, args.batch_size, args.seed, device)  # on the device, no workers
        test_loader = build_eval_loader(feature_dataset(probe.backbone, test_loader, device, amp), eval_bs, 0, device)
    if get_world_size() > 1:  # --head-bn: statistics over the global batch, as with one process
        probe.head = convert_sync_batchnorm(probe.head, device)
    trained = probe.head if args.cache_features else probe

    lr, optimizer = sgd_from_args(args, "lars" if args.lars else "sgd")
    method = LinearProbing(probe, run.parallel(trained), torch.nn.CrossEntropyLoss(),
                           partial(cosine_per_epoch, epochs=args.epochs, base=lr), {"test": test_loader}, device, amp,
                           evaluated=trained, guard=BackboneGuard(probe.backbone), records=data.records,
                           model_config=dict(backbone=backbone_cfg, num_classes=data.num_classes, head_bn=args.head_bn))
    what = (f"linear probe on {backbone_cfg['arch']} ({args.pretrained or 'random init'}), {data.num_classes} "
            f"classes at {args.img_size} px, {'LARS' if args.lars else 'SGD'}"
            f"{', cached features' if args.cache_features else ''}")
    return run.train(method, optimizer, what, lr, eval_every=args.eval_every, identity=VIT_IDENTITY, loader=loader)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
