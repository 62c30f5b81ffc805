"""What a ViT looks at: the cls token's attention over the patches in the last block, per head and averaged,
overlaid on the images (DINO's picture). Any ViT file we read: ours (pretrained or fine-tuned), the reference's.

    python -m tools.show_attention output/quickstart/checkpoint.pth --dataset digits --out attention.png
    python -m tools.show_attention FILE --images a.png b.jpg --out attention.png
"""
import os

import torch
import torch.nn.functional as F

from augment.pil import pil_pipeline
from augment.recipes import eval_view
from data import PRESETS, build_dataset, get_preset
from data.datasets import IMAGENET_MEAN, IMAGENET_STD, read_image
from models.loading import describe_weights, load_backbone, open_checkpoint
from models.vit import cls_attention
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.plots import pyplot, save
from models.registry import is_registry_name
from utils.flags import count, folder, input_file, input_weights, integer, output_file


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.show_attention")
    p.add_argument("weights", type=input_weights(registry=is_registry_name),
                   help="a ViT checkpoint (path or registry name)")
    p.add_argument("--dataset", default="digits", choices=sorted(PRESETS), help="test images from this dataset")
    p.add_argument("--data-root", type=folder(), default=None, help="dataset folder (see main_pretrain.py --help)")
    p.add_argument("--images", type=input_file(), nargs="+", default=None,
                   help="image files instead of the dataset's test images")
    p.add_argument("--num-images", type=count(), default=4, help="test images shown")
    p.add_argument("--seed", type=integer(low=0), default=0, help="which test images")
    p.add_argument("--out", type=output_file(), default="attention.png", help="the PNG to write")
    return p


def images_of(args, size: int):
    """(normalised images [N, 3, S, S], the view's mean and std): --images or a few test images."""
    if args.images:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        view = pil_pipeline(eval_view(get_preset("imagefolder"), size, mean, std))
        return torch.stack([view(read_image(path)) for path in args.images]), mean, std
    preset = get_preset(args.dataset)
    test = build_dataset(args.dataset, args.data_root, train=False, transform=pil_pipeline(eval_view(preset, size)))
    if args.num_images < 1:
        raise UserError(f"--num-images {args.num_images} must be at least 1")
    picks = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.num_images]
    return torch.stack([test[i][0] for i in picks.tolist()]), preset.mean, preset.std


def draw(images, maps, out: str, title: str):
    """One row per image: the image, then the heads' mean attention and each head's, overlaid."""
    plt = pyplot()
    n, heads = maps.shape[:2]
    cols = 2 + heads
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.4), squeeze=False)
    size = images.shape[-1]
    up = F.interpolate(maps, size=(size, size), mode="nearest")                  # [N, heads, S, S]
    mean = F.interpolate(maps.mean(1, keepdim=True), size=(size, size), mode="nearest")[:, 0]
    for i in range(n):
        img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        panels = [(None, "image"), (mean[i], "mean of heads")] + [(up[i, h], f"head {h}") for h in range(heads)]
        for ax, (overlay, name) in zip(axes[i], panels):
            ax.imshow(img)
            if overlay is not None:
                ax.imshow(overlay.numpy(), cmap="inferno", alpha=0.6)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    save(fig, out)


@exit_on_user_error
def main(args):
    ck = open_checkpoint(args.weights)
    info = describe_weights(ck)
    if info["family"] == "resnet":
        raise UserError(f"{args.weights} holds a ResNet ({info['arch']}); show_attention needs a ViT checkpoint "
                        "(APS pretraining or fine-tuning, ours or the reference's); see tools.show_features for "
                        "ResNets")
    vit = load_backbone(ck).eval()
    x, mean, std = images_of(args, info["img_size"])
    maps = cls_attention(vit, x)                                                # [N, heads, G, G]
    shown = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    draw(shown, maps, args.out, f"{os.path.basename(args.weights)}: cls attention, last block ({maps.shape[1]} heads)")
    print(f"wrote {args.out}: {len(x)} images x {maps.shape[1]} heads, {vit.grid}x{vit.grid} patches")
    return maps


if __name__ == "__main__":
    main(get_args_parser().parse_args())
