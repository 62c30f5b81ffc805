"""APS pretraining of a ViT: asymmetric patch sampling + contrastive loss (docs/REFERENCE.md#aps-pretraining)."""
from augment.recipes import add_aps_view_args, aps_pair_from_args
from data import PRESETS, add_data_args
from methods.aps import APSPretraining
from methods.run import Run, add_init_weights_arg
from models import APS, create_vit
from models.vit import add_vit_args, check_vit_flags, vit_overrides
from samplers.aps import kept_per_view
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.knn import add_knn_args
from utils.run import VIT_IDENTITY, add_runtime_args, check_ordered, check_per_process
from utils.optim import add_adamw_args, adamw_from_args
from utils.flags import count, fraction, nonnegative, positive

BASE_LR = {"vit-tiny": 1e-3, "vit-small": 5e-4, "vit-base": 5e-4}


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_args(p, batch_size=512, subset="the kNN memory bank")
    g = add_vit_args(p)
    g.add_argument("--proj-hidden-dim", type=count(), default=512, help="projector hidden width")
    g.add_argument("--proj-dim", type=count(), default=128, help="projector output width")
    g.add_argument("--pred-hidden-dim", type=count(), default=512, help="predictor hidden width")
    g = p.add_argument_group("APS")
    g.add_argument("--sampling-ratio", type=fraction(), default=0.25, help="fraction of patches kept per view")
    g.add_argument("--nsampling", type=count(), default=4, help="sampling rounds (= optimizer steps) per batch")
    g.add_argument("--power", type=nonnegative(), default=3.0,
                   help="view-2 cells drawn with probability ~ uncovered^power")
    g.add_argument("--temperature", type=positive(), default=0.1, help="contrastive temperature T")
    g = p.add_argument_group("optimisation")
    g.add_argument("--nepoch", "--epochs", dest="epochs", type=count(), default=1600, help="pretraining epochs E")
    g.add_argument("--warmup-epochs", type=nonnegative(), default=20, help="linear warmup epochs")
    g.add_argument("--base-lr", type=positive(), default=None,
                   help="lr per 256 images (default 1e-3 tiny, 5e-4 small/base); lr = base * batch / 256")
    add_adamw_args(g, weight_decay=0.05, decay_on="on all parameters", betas=True)
    add_init_weights_arg(g)
    add_aps_view_args(p)
    add_knn_args(p, sorted(PRESETS))
    add_runtime_args(p)
    return p


def validate(args):
    """The cross-flag rules, before any work (each flag's own domain is its type)."""
    check_ordered(args, "crop_scale", "crop_ratio")
    if args.color_jitter[3] > 0.5:
        raise UserError(f"--color-jitter hue {args.color_jitter[3]:g} must lie in [0, 0.5] (a hue shift wraps around)")
    check_vit_flags(args.arch, args.img_size, args.patch_size, args.embed_dim, args.num_heads)
    check_per_process(args.batch_size, 2, "the heads' batch norm")
    grid = args.img_size // args.patch_size
    try:
        kept_per_view(grid * grid, args.sampling_ratio, args.nsampling)
    except ValueError as e:
        raise UserError(f"{e} (flags --sampling-ratio/--nsampling, {grid}x{grid} patches)") from e


@exit_on_user_error
def main(args):
    run = Run(args)
    args.base_lr = args.base_lr or BASE_LR[args.arch]
    validate(args)
    run.begin()
    data = run.training_data(aps_pair_from_args(args, run.preset))

    model_config = dict(arch=args.arch, img_size=args.img_size, patch_size=args.patch_size, **vit_overrides(args))
    encoder = create_vit(**model_config)
    module = run.place(APS(encoder, args.proj_hidden_dim, args.proj_dim, args.pred_hidden_dim, args.temperature),
                       sync_bn=True)
    run.init_weights(module.encoder, whole=module)
    lr = args.base_lr * args.batch_size / 256
    optimizer = adamw_from_args(args, lr)
    knn = run.knn(module.encoder)
    method = APSPretraining(module, run.parallel(module), encoder.grid, args.sampling_ratio, args.nsampling,
                            args.power, lr, args.warmup_epochs, args.epochs, knn, model_config)
    what = f"{args.arch}/{args.patch_size} at {args.img_size} px, {len(data.loader)} batches x {args.nsampling} steps"
    return run.train(method, optimizer, what + " per epoch", lr, identity=VIT_IDENTITY, lr_flag="--base-lr",
                     known_ranges={"temperature": (0.01, 1.0)})  # T ~ 0.05-0.5


if __name__ == "__main__":
    main(get_args_parser().parse_args())
