"""What a backbone learned, in one picture: a 2-D embedding (t-SNE from scikit-learn, or UMAP when umap-learn is
installed and asked for) of the test set's features, coloured by class, with the kNN top-1 in the title. ResNets
(MoCo, Asym-Siam) and ViTs (APS) alike.

    python -m tools.show_features output/quickstart/checkpoint.pth --dataset digits --out features.png
"""
import os

import torch

from augment.pil import pil_pipeline
from augment.recipes import eval_view
from data import PRESETS, build_dataset, build_eval_loader, get_preset
from data.datasets import num_classes_of
from models.loading import describe_weights, load_backbone, open_checkpoint
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.plots import pyplot, save
from utils.knn import extract_features, knn_classify
from models.registry import is_registry_name
from utils.flags import count, folder, input_weights, integer, output_file

METHODS = ("tsne", "umap")


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.show_features")
    p.add_argument("weights", type=input_weights(registry=is_registry_name),
                   help="a backbone checkpoint (path or registry name): ResNet or ViT")
    p.add_argument("--dataset", default="digits", choices=sorted(PRESETS), help="the images embedded")
    p.add_argument("--data-root", type=folder(), default=None, help="dataset folder (see main_pretrain.py --help)")
    p.add_argument("--img-size", type=count(), default=None, help="ResNet input size (default: the dataset's; a ViT's "
                                                              "is read off the file)")
    p.add_argument("--method", default="tsne", choices=METHODS, help="the 2-D embedding (umap needs umap-learn)")
    p.add_argument("--max-points", type=count(low=2), default=2000,
                   help="test images embedded (a random subset beyond)")
    p.add_argument("--knn-k", type=count(), default=20, help="neighbours of the kNN top-1 in the title")
    p.add_argument("--batch-size", type=count(), default=256, help="images per forward pass")
    p.add_argument("--num-workers", type=count(zero="the main process"), default=0, help="loader workers")
    p.add_argument("--seed", type=integer(low=0), default=0, help="the embedding's and the subset's seed")
    p.add_argument("--out", type=output_file(), default="features.png", help="the PNG to write")
    return p


def embed(features, method: str, seed: int):
    """[N, D] -> [N, 2] numpy."""
    x = features.numpy()
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("--method umap needs umap-learn (pip install umap-learn); or use --method tsne") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, len(x) - 1)).fit_transform(x)


def draw(points, labels, classes: int, out: str, title: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20" if classes <= 20 else "hsv", max(classes, 1))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=6, vmin=-0.5, vmax=classes - 0.5)
    if classes <= 20:
        fig.colorbar(scatter, ax=ax, ticks=range(classes), label="class")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    save(fig, out)


@exit_on_user_error
def main(args):
    if args.max_points < 2:
        raise UserError(f"--max-points {args.max_points} must be at least 2")
    ck = open_checkpoint(args.weights)
    info = describe_weights(ck)
    preset = get_preset(args.dataset)
    resnet = info["family"] == "resnet"
    size = args.img_size or preset.img_size if resnet else info["img_size"]
    if args.img_size and not resnet and args.img_size != size:
        raise UserError(f"{args.weights} is a ViT for {size} px, not --img-size {args.img_size}; leave it out")
    backbone, device = load_backbone(ck).eval(), torch.device("cpu")
    view = pil_pipeline(eval_view(preset, size))
    sets = [build_dataset(args.dataset, args.data_root, train=split, transform=view) for split in (True, False)]
    (bank, bank_y), (test, test_y) = (extract_features(backbone, build_eval_loader(d, args.batch_size,
                                                                                     args.num_workers, device), device)
                                      for d in sets)
    classes = num_classes_of(sets[0])
    top1, _ = knn_classify(bank, bank_y, test, test_y, classes, args.knn_k)
    keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.max_points]
    points = embed(test[keep], args.method, args.seed)
    draw(points, test_y[keep].numpy(), classes, args.out,
         f"{os.path.basename(args.weights)} ({info['format']}, {info['arch']})\nkNN top-1 {top1:.1f} % on "
         f"{args.dataset}; {args.method} of {len(keep)} test images")
    print(f"wrote {args.out}: {len(keep)} test images, kNN top-1 {top1:.2f} %")
    return top1


if __name__ == "__main__":
    main(get_args_parser().parse_args())
