"""MoCo v2 pretraining of a ResNet with the Asym-Siam asymmetries (docs/REFERENCE.md#moco).

The baseline and all five switches: MultiCrop, ScaleMix, AsymAug, AsymBN and MeanEnc. Launch many processes with torchrun; the
reference's --dist-url/--multiprocessing-distributed/--world-size/--rank flags are accepted and ignored.
"""
from augment.recipes import add_moco_view_args, moco_views_from_args
from data import PRESETS, add_data_args
from methods.moco import MoCoPretraining
from methods.run import Run, add_init_weights_arg
from models.moco import build_moco, check_queue, synchronise_key_projector
from models.resnet import ResNetTrunk, add_resnet_args, resolve_cifar_stem
from utils.config import ArgumentParser
from utils.dist import get_world_size
from utils.errors import UserError, exit_on_user_error
from utils.flags import count, momentum, positive
from utils.knn import add_knn_args
from utils.optim import add_sgd_args, sgd_from_args
from utils.run import add_runtime_args, check_ordered, check_per_process


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_args(p, batch_size=256, dataset=None, data_dir=True, subset="the kNN memory bank")
    g = add_resnet_args(p)
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
    add_init_weights_arg(g)
    add_moco_view_args(p)
    add_knn_args(p, sorted(PRESETS))
    add_runtime_args(p, reference_launcher=True)
    return p


@exit_on_user_error
def main(args):
    run = Run(args)
    resolve_cifar_stem(args)
    check_queue(args.moco_k, args.batch_size)
    check_ordered(args, "mini_crop_scale")
    check_per_process(args.batch_size, 2, "the projector's batch norm")
    world = get_world_size()
    bn_splits = args.bn_splits if world == 1 else 1  # many processes: real shuffle-BN across ranks
    if bn_splits > 1 and (args.batch_size % bn_splits or args.batch_size // bn_splits < 2):
        raise UserError(f"--batch-size {args.batch_size} does not split into --bn-splits {bn_splits} chunks of "
                        "2 or more; change one of them (--bn-splits 1 turns split BN off)")
    recipe = moco_views_from_args(args, run.preset)
    run.begin()
    run.training_data(recipe)

    module = build_moco(args.arch, args.cifar_stem, bn_splits, args.mlp_hidden_dim, args.moco_dim, args.moco_k,
                        args.moco_m, args.moco_t, run.device)
    if args.enable_asym_bn:
        if world == 1:
            run.logger.warning("--enable-asym-bn does nothing with one process (there is nothing to synchronise)")
        else:  # the target (key) projector's BN only, over groups of --syncbn-group-size ranks
            synchronise_key_projector(module, run.device, args.syncbn_group_size)
    if run.init_weights(module.encoder_q, whole=module, fresh=("queue",)):
        module.encoder_k.load_state_dict(module.encoder_q.state_dict())    # the key encoder starts as the query one
    lr, optimizer = sgd_from_args(args)
    knn = run.knn(ResNetTrunk(module.encoder_q))
    method = MoCoPretraining(module, run.parallel(module), lr, args.epochs, knn,
                             dict(arch=args.arch, cifar_stem=args.cifar_stem, mlp_hidden_dim=args.mlp_hidden_dim,
                                  moco_dim=args.moco_dim))
    what = f"MoCo v2 {args.arch}{' (CIFAR stem)' if args.cifar_stem else ''} at {args.img_size} px, queue {args.moco_k}"
    return run.train(method, optimizer, what, lr, {
        "split BN": bn_splits, "multicrop": args.enable_multicrop, "scalemix": args.enable_scalemix,
        "asym-aug": args.enable_asymm_aug, "asym-bn": args.enable_asym_bn and world > 1,
        "mean-enc": args.enable_mean_encoding}, identity=("dataset", "arch", "img_size"),
        known_ranges={"moco_t": (0.01, 1.0)})     # MoCo's 0.07-0.2, with room


if __name__ == "__main__":
    main(get_args_parser().parse_args())
