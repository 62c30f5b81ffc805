"""MoCo v2 pretraining of a ResNet with the Asym-Siam asymmetries (docs/REFERENCE.md#moco).

The baseline and all five switches: MultiCrop, ScaleMix, AsymAug, AsymBN and MeanEnc. Launch many processes with torchrun; the
reference's --dist-url/--multiprocessing-distributed/--world-size/--rank flags are accepted and ignored.
"""
from augment.recipes import add_moco_view_args, moco_views_from_args
from data import PRESETS, add_data_args, apply_preset
from data.pipeline import knn_setup, training_data
from engine import Trainer, TrainSettings
from methods.moco import MoCoPretraining
from models.moco import build_moco, check_queue, synchronise_key_projector
from models.resnet import RESNETS, ResNetTrunk
from utils.dist import data_parallel, get_world_size, init_distributed
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.knn import add_knn_args
from utils.report import RunReporter
from utils.run import add_runtime_args, check_ordered, check_per_process, describe_run, start_run
from utils.optim import add_sgd_args, sgd_from_args
from utils.runtime import amp_dtype, seed_everything
from utils.flags import count, momentum, positive


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_args(p, batch_size=256, dataset=None, data_dir=True, subset="the kNN memory bank")
    g = p.add_argument_group("model")
    g.add_argument("-a", "--arch", default="resnet50", choices=RESNETS, help="torchvision ResNet")
    g.add_argument("--cifar-stem", default=None, action="store_true",
                   help="3x3 stride-1 first conv, no max-pool (default: on for 32 px datasets)")
    g.add_argument("--mlp-hidden-dim", type=count(), default=2048, help="projector hidden width")
    g.add_argument("--moco-dim", type=count(), default=128, help="key dimension")
    g.add_argument("--moco-k", type=count(), default=65536, help="queue size (a multiple of the global batch)")
    g.add_argument("--moco-m", type=momentum(), default=0.999, help="key-encoder momentum")
    g.add_argument("--moco-t", type=positive(), default=0.2, help="softmax temperature")
    g.add_argument("--bn-splits", type=count(), default=8,
                   help="one process: BN statistics per chunk of the batch (stand-in for shuffle-BN); 1 = off")
    g.add_argument("--enable-asym-bn", action="store_true",
                   help="AsymBN: synchronise the target projector's BN over groups of processes")
    g.add_argument("--syncbn-group-size", type=count(), default=8,
                   help="processes per AsymBN group (divides the world)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", "--nepoch", dest="epochs", type=count(), default=100, help="pretraining epochs")
    add_sgd_args(g, lr=0.03, weight_decay=1e-4)
    add_moco_view_args(p)
    add_knn_args(p, sorted(PRESETS))
    add_runtime_args(p, reference_launcher=True)
    return p


@exit_on_user_error
def main(args):
    device = init_distributed(args.device, args.deterministic)
    preset = apply_preset(args)
    args.cifar_stem = args.img_size <= 64 if args.cifar_stem is None else args.cifar_stem
    check_queue(args.moco_k, args.batch_size)
    check_ordered(args, "mini_crop_scale")
    check_per_process(args.batch_size, 2, "the projector's batch norm")
    world = get_world_size()
    bn_splits = args.bn_splits if world == 1 else 1  # many processes: real shuffle-BN across ranks
    if bn_splits > 1 and (args.batch_size % bn_splits or args.batch_size // bn_splits < 2):
        raise UserError(f"--batch-size {args.batch_size} does not split into --bn-splits {bn_splits} chunks of "
                        "2 or more; change one of them (--bn-splits 1 turns split BN off)")
    recipe = moco_views_from_args(args, preset)
    seed_everything(args.seed)
    logger = start_run(args)
    data = training_data(args, recipe, device)

    module = build_moco(args.arch, args.cifar_stem, bn_splits, args.mlp_hidden_dim, args.moco_dim, args.moco_k,
                        args.moco_m, args.moco_t, device)
    if args.enable_asym_bn:
        if world == 1:
            logger.warning("--enable-asym-bn does nothing with one process (there is nothing to synchronise)")
        else:  # the target (key) projector's BN only, over groups of --syncbn-group-size ranks
            synchronise_key_projector(module, device, args.syncbn_group_size)
    lr, optimizer = sgd_from_args(args)
    amp = amp_dtype(args.amp, device)
    what = f"MoCo v2 {args.arch}{' (CIFAR stem)' if args.cifar_stem else ''} at {args.img_size} px, queue {args.moco_k}"
    description = describe_run(what, data, lr, device, amp, {
        "split BN": bn_splits, "multicrop": args.enable_multicrop, "scalemix": args.enable_scalemix,
        "asym-aug": args.enable_asymm_aug, "asym-bn": args.enable_asym_bn and world > 1,
        "mean-enc": args.enable_mean_encoding})
    knn, notes = knn_setup(args, preset, device, ResNetTrunk(module.encoder_q), amp, data)
    method = MoCoPretraining(module, data_parallel(module, device), lr, args.epochs, knn,
                             dict(arch=args.arch, cifar_stem=args.cifar_stem, mlp_hidden_dim=args.mlp_hidden_dim,
                                  moco_dim=args.moco_dim))
    settings = TrainSettings.from_args(args, args.knn_every, description, notes,
                                       identity=("dataset", "arch", "img_size"),
                                       known_ranges={"moco_t": (0.01, 1.0)})     # MoCo's 0.07-0.2, with room
    trainer = Trainer(method, optimizer, data.loader, settings, device, amp, RunReporter(args.output_dir))
    return trainer.finish(trainer.fit())


if __name__ == "__main__":
    main(get_args_parser().parse_args())
