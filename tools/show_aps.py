"""A picture of asymmetric patch sampling: a few image pairs, the source with both crop boxes, then each view with
its kept patches lit, and the mean covered fraction of view 2's kept cells (APS, flips ignored as the reference
does, and uniform sampling).

    python -m tools.show_aps --dataset digits --out aps_samples.png
"""
from dataclasses import replace

import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from augment.pil import PILView
from augment.recipes import APS_VIEW
from data import PRESETS, build_dataset, get_preset
from samplers.aps import coverage_stats, covered_fraction_of, random_boxes, sample_aps
from utils.config import ArgumentParser
from utils.errors import exit_on_user_error
from utils.flags import count, folder, fraction, integer, nonnegative, output_file


def show(args):
    """Write a PNG: per pair, the source with both crop boxes, then each view with its kept patches lit."""
    preset = get_preset(args.dataset)
    size = args.img_size or preset.img_size
    patch = args.patch_size or preset.patch_size
    grid = size // patch
    torch.manual_seed(args.seed)
    dataset = build_dataset(args.dataset, args.data_root, train=True)
    # the APS view's crop and flip, without its colour ops and normalisation (the picture shows the pixels)
    view = PILView(replace(APS_VIEW, size=size, jitter_p=0.0, gray_p=0.0, mean=(0.0,) * 3, std=(1.0,) * 3))
    picks = torch.randperm(len(dataset))[:args.num_pairs].tolist()
    sources, views, boxes, flips = [], [], [], []
    for i in picks:
        img, _ = dataset[i]
        sources.append(img)
        (x1, b1, f1), (x2, b2, f2) = view(img), view(img)
        views.append((x1, x2))
        boxes.append((b1, b2))
        flips.append((f1, f2))
    box1, box2 = torch.stack([b[0] for b in boxes]), torch.stack([b[1] for b in boxes])
    flip1, flip2 = torch.stack([f[0] for f in flips]), torch.stack([f[1] for f in flips])
    idx1, idx2 = sample_aps(box1, flip1, box2, flip2, grid, args.sampling_ratio, 1, args.power)
    cov = covered_fraction_of(idx1, idx2, box1, flip1, box2, flip2, grid)[:, 0]

    tile = args.tile
    top_margin = 44
    canvas = Image.new("RGB", (3 * tile + 20, top_margin + len(picks) * (tile + 20)), "white")
    draw = ImageDraw.Draw(canvas)
    stats = coverage_stats(*random_boxes(512, size), grid, args.sampling_ratio, args.nsampling, args.power)
    draw.text((4, 4), "covered fraction of view-2 kept cells (512 pairs):", fill="black")
    draw.text((4, 20), "APS {aps:.3f} | flip ignored {aps_flip_ignored:.3f} | uniform {uniform:.3f}".format(**stats),
              fill="black")
    for row, src in enumerate(sources):
        y = top_margin + row * (tile + 20)
        s = tile / src.width
        canvas.paste(src.resize((tile, tile), Image.NEAREST), (0, y))
        for (b, colour) in zip(boxes[row], ("red", "blue")):
            top, left, h, w = b.tolist()
            draw.rectangle([left * s, y + top * s, (left + w) * s - 1, y + (top + h) * s - 1], outline=colour)
        draw.text((2, y + tile + 3), "source: 1 red, 2 blue", fill="black")
        for col, (x, idx) in enumerate(zip(views[row], (idx1[row, 0], idx2[row, 0]))):
            lit = torch.full((grid * grid,), 0.25)
            lit[idx] = 1.0
            lit = lit.view(1, 1, grid, grid)
            mask = torch.nn.functional.interpolate(lit, size=(size, size), mode="nearest")[0]
            img = T.ToPILImage()((x * mask).clamp(0, 1)).resize((tile, tile), Image.NEAREST)
            x0 = (col + 1) * (tile + 10)
            canvas.paste(img, (x0, y))
            flip = " (flip)" if flips[row][col] else ""
            label = f"view 1{flip}" if col == 0 else f"view 2{flip}: {cov[row]:.2f} seen"
            draw.text((x0 + 2, y + tile + 3), label, fill="black")
    canvas.save(args.out)
    print(f"wrote {args.out}: {len(picks)} pairs, grid {grid}x{grid}, ratio {args.sampling_ratio}; "
          "covered fraction of view-2 kept cells: APS {aps:.3f}, flip ignored {aps_flip_ignored:.3f}, "
          "uniform {uniform:.3f}".format(**stats))



def get_args_parser():
    p = ArgumentParser(description="Visualise asymmetric patch sampling (writes a PNG).",
                       prog="python -m tools.show_aps")
    p.add_argument("--show", action="store_true", help="accepted for the old `samplers.aps --show` (always drawn)")
    p.add_argument("--dataset", default="digits", choices=sorted(PRESETS), help="where the images come from")
    p.add_argument("--data-root", type=folder(), default=None, help="dataset folder (see main_pretrain.py --help)")
    p.add_argument("--img-size", type=count(), default=None, help="view size (default: dataset preset)")
    p.add_argument("--patch-size", type=count(), default=None, help="patch size (default: dataset preset)")
    p.add_argument("--sampling-ratio", type=fraction(), default=0.25, help="fraction of patches kept per view")
    p.add_argument("--nsampling", type=count(), default=4, help="sampling rounds (for the coverage figures)")
    p.add_argument("--power", type=nonnegative(), default=3.0, help="exponent on the uncovered fraction")
    p.add_argument("--num-pairs", type=count(), default=4, help="image pairs drawn")
    p.add_argument("--tile", type=count(low=8), default=160, help="pixels per image in the picture")
    p.add_argument("--seed", type=integer(low=0), default=0, help="random seed")
    p.add_argument("--out", type=output_file(), default="aps_samples.png", help="output PNG path")
    return p


@exit_on_user_error
def main(args):
    show(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
