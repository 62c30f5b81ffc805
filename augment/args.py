"""Flags for the APS view pipeline (SPEC A1); defaults are the reference values."""


def add_aps_augment_args(parser):
    g = parser.add_argument_group("augmentation (each view)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.15, 1.0), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range")
    g.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop aspect-ratio range")
    g.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, nargs=4, default=(0.4, 0.4, 0.4, 0.1),
                   metavar=("B", "C", "S", "H"), help="ColorJitter brightness, contrast, saturation, hue")
    g.add_argument("--color-jitter-prob", type=float, default=0.8, help="probability of applying ColorJitter")
    g.add_argument("--grayscale-prob", type=float, default=0.2, help="RandomGrayscale probability")
    return g


def aps_augment_kwargs(args) -> dict:
    return dict(scale=tuple(args.crop_scale), ratio=tuple(args.crop_ratio), flip_p=args.flip_prob,
                jitter=tuple(args.color_jitter), jitter_p=args.color_jitter_prob, gray_p=args.grayscale_prob)
