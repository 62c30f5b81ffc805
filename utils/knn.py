"""Weighted k-nearest-neighbour monitor (as in DINO's eval_knn), on L2-normalised features."""
import time

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from utils.dist import all_gather_uneven
from utils.failpoints import failpoint
from utils.log import get_logger
from utils.runtime import autocast
from utils.transfer import to_device
from utils.flags import count, positive, text


PROGRESS_SECONDS = 30


@torch.no_grad()
def extract_features(model, loader, device, amp=None, normalize=True, print_freq: int = 0):
    """Features (L2-normalised unless normalize=False) and labels of this rank's shard of `loader`, gathered
    over ranks in shard order. print_freq > 0: a progress line every print_freq batches, at least every 30 s and
    at the end."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    start = last = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        with autocast(device, amp):
            f = model(to_device(images, device))  # f: [B, D]
        feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())
        labels.append(to_device(target, device))
        now = time.perf_counter()
        if print_freq and (i + 1 == len(loader) or (i + 1) % print_freq == 0 or now - last >= PROGRESS_SECONDS):
            rate = (i + 1) * loader.batch_size / max(now - start, 1e-9)
            get_logger().info(f"features [{i + 1}/{len(loader)}] {rate:.1f} img/s (this process)")
            last = now
    model.train(was_training)
    dim = feats[0].shape[1] if feats else 0
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    return all_gather_uneven(f), all_gather_uneven(y)


def feature_dataset(model, loader, device, amp=None) -> TensorDataset:
    """The features (not normalised) and labels of `loader`'s images, on the CPU: a dataset to train a head on."""
    feats, labels = extract_features(model, loader, device, amp, normalize=False)
    return TensorDataset(feats.cpu(), labels.cpu())


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, num_classes, k=20, temperature=0.07, chunk=512):
    """Top-1 and top-5 accuracy (%) of a similarity-weighted vote among the k nearest train features.

    Each neighbour votes for its label with weight exp(cos / T). k is capped at the train-set size,
    top-5 at the number of classes, so tiny sets are fine.
    """
    k = min(k, train_f.shape[0])
    top5_k = min(5, num_classes)
    correct = torch.zeros(2, dtype=torch.long, device=test_f.device)        # top-1, top-5 hits: read once
    for start in range(0, test_f.shape[0], chunk):
        q, y = test_f[start:start + chunk], test_y[start:start + chunk]
        sim, idx = (q @ train_f.T).topk(k, dim=1)                   # sim, idx: [b, k]
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        weights = ((sim - sim[:, :1]) / temperature).exp()            # exp(cos / T), scaled to avoid overflow
        votes.scatter_add_(1, train_y[idx], weights)                    # votes: [b, C]
        pred = votes.topk(top5_k, dim=1).indices                     # pred: [b, top5_k]
        hit = pred == y[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
    correct1, correct5 = correct.tolist()
    n = max(test_f.shape[0], 1)
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def knn_evaluate(model, train_loader, test_loader, num_classes, device, amp=None, k=20, temperature=0.07):
    """kNN top-1/top-5 of `model`'s features: train-set features as the memory bank, test set as queries."""
    train_f, train_y = extract_features(model, train_loader, device, amp)
    failpoint("knn")
    test_f, test_y = extract_features(model, test_loader, device, amp)
    top1, top5 = knn_classify(train_f, train_y, test_f, test_y, num_classes, k, temperature)
    return {"knn_top1": top1, "knn_top5": top5}


def add_knn_args(parser, datasets=()):
    """The kNN monitor's flags; datasets: the names --knn-data accepts."""
    g = parser.add_argument_group("kNN monitor")
    g.add_argument("--knn-every", type=count(zero="never"), default=10,
                   help="weighted kNN top-1 on the test set every N epochs and at the end (0: never)")
    g.add_argument("--knn-k", type=count(), default=20, help="neighbours (capped at the train-set size)")
    g.add_argument("--knn-t", type=positive(), default=0.07, help="temperature of the exp(cos / T) vote weights")
    g.add_argument("--knn-data", type=text(f"DATASET or DATASET:ROOT, DATASET one of {', '.join(datasets)}",
                                           check=lambda v: knn_data_problem(v, datasets)), default=None,
                   metavar="DATASET[:ROOT]",
                   help="the labelled set the kNN monitor uses (default: the training set, when it has labels), "
                        "e.g. imagefolder:/data/imagenet-100, cifar10:./dataset/cifar10, digits")
    return g


def knn_data_problem(value: str, datasets=()) -> str:
    name, _, root = value.partition(":")
    if not name or (":" in value and not root):
        return "is not DATASET or DATASET:ROOT (e.g. imagefolder:/data/imagenet-100)"
    if datasets and name not in datasets:
        return f"names no dataset we know ({name!r}; one of {', '.join(datasets)})"
    return ""


def knn_monitor(backbone, train_loader, test_loader, num_classes: int, device, amp=None, k: int = 20,
                temperature: float = 0.07):
    """evaluate(epoch) -> kNN metrics of `backbone`: the features of train_loader's images are the memory bank,
    test_loader's the queries (deterministic views, sharded: each rank embeds its part, the features are
    gathered)."""
    return lambda epoch: knn_evaluate(backbone, train_loader, test_loader, num_classes, device, amp, k, temperature)


def knn_summary(metrics: dict, start: dict = None) -> str:
    """A pretraining run's closing line from its last kNN metrics (and those before its first epoch); '' without."""
    if "knn_top1" not in metrics:
        return ""
    line = f"final kNN top-1 {metrics['knn_top1']:.2f}% (top-5 {metrics['knn_top5']:.2f}%)"
    if start and "knn_top1" in start:
        line += f"; kNN top-1 at start {start['knn_top1']:.2f} %, at the end {metrics['knn_top1']:.2f} %"
    return line
