"""The data flags, one argument group shared by all four scripts."""
import os

from data.datasets import PRESETS, get_preset
from data.files import MAX_PIXELS
from data.subsets import add_subset_args
from utils.errors import UserError
from utils.flags import count, data_root, input_folder, output_folder

DATA_PATHS = ("auto", "cpu", "device")


def add_data_dir_arg(parser):
    """The reference scripts' positional DATA_DIR (an ImageNet-style folder with train/ and val/)."""
    parser.add_argument("data_dir", type=input_folder(), nargs="?", default=None,
                        help="ImageNet-style folder (train/ and val/), as in the reference; same as --data-root "
                             "with --dataset imagefolder")


def resolve_data_dir(args, default_dataset: str = "digits"):
    """DATA_DIR means --dataset imagefolder --data-root DATA_DIR; without either, the embedded default."""
    if args.data_dir:
        if args.data_root and args.data_root != args.data_dir:
            raise UserError(f"DATA_DIR {args.data_dir} and --data-root {args.data_root} disagree; give one")
        args.data_root, args.dataset = args.data_dir, args.dataset or "imagefolder"
    args.dataset = args.dataset or default_dataset


def add_data_args(parser, batch_size: int, dataset: str = "digits", output_dir: str = "./output",
                  data_dir: bool = False, subset: str = None):
    """The data flags; data_dir: also the reference's positional DATA_DIR (resolved by apply_preset); subset: also
    the few-label flags (data.subsets), saying what the subset is for."""
    if data_dir:
        add_data_dir_arg(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=dataset, choices=sorted(PRESETS),
                   help="dataset; 'digits' is embedded (scikit-learn's 8x8 digits upscaled to 32 px) and needs no "
                        "files; 'imagefolder' reads <data-root>/train and <data-root>/val; 'folder' every image "
                        "under <data-root> (no labels: pretraining); 'filelist' a list of image paths")
    g.add_argument("--data-root", type=data_root(), default=None,
                   help="dataset folder (default ./dataset/<dataset>); CIFAR in torchvision's layout, "
                        "MNIST/Fashion-MNIST as the idx files (*-ubyte or *-ubyte.gz); folder: any folder of "
                        "images; filelist: a list file, or a folder with train.txt and val.txt (docs/DATA.md)")
    g.add_argument("--download", action="store_true",
                   help="let torchvision download CIFAR/MNIST/Fashion-MNIST into --data-root if missing")
    g.add_argument("--img-size", type=count(), default=None,
                   help="training resolution (default: the dataset's preset, 32 px small sets, 224 px folders)")
    g.add_argument("--batch-size", type=count(), default=batch_size,
                   help="global batch size, split evenly over the processes")
    g.add_argument("--num-workers", type=count(zero="load in the main process"), default=min(4, os.cpu_count() or 1),
                   help="data-loading worker processes per GPU/process (default 4, or the CPU count if smaller)")
    g.add_argument("--output-dir", type=output_folder(), default=output_dir,
                   help="where checkpoints, log.txt, log.jsonl and tensorboard/ go; a checkpoint there is resumed")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="an image that cannot be read becomes a grey stand-in and its path goes to "
                        "<output-dir>/bad_images.txt (default: the run stops with one line naming it)")
    g.add_argument("--max-image-pixels", type=count(zero="no limit"), default=MAX_PIXELS, metavar="N",
                   help="an image of more pixels (width x height) is refused from its header, before it is decoded "
                        "(a guard against decompression bombs; --skip-bad-images makes it a stand-in); default "
                        "PIL's own limit, about 179 million")
    g.add_argument("--data-path", default="auto", choices=DATA_PATHS,
                   help="device: augment batches on the training device (in-memory datasets live there as "
                        "uint8; image folders: workers read the JPEGs, the GPU decodes them); cpu: PIL "
                        "transforms in worker processes (the reference's way); auto: device for the in-memory "
                        "datasets (digits, MNIST, Fashion-MNIST, CIFAR), cpu for image folders")
    if subset:
        add_subset_args(parser, subset)
    return g


def apply_preset(args):
    """Resolve DATA_DIR (where the script takes one), then fill --img-size (and --patch-size, where the script has
    one) from the dataset's preset; return it."""
    if hasattr(args, "data_dir"):
        resolve_data_dir(args)
    preset = get_preset(args.dataset)
    args.img_size = args.img_size or preset.img_size
    if hasattr(args, "patch_size"):
        args.patch_size = args.patch_size or preset.patch_size
    return preset
