"""The released weights, as data: one row per file (name, arch, file, checksum, reported accuracy), and the
verified local copy of a registry name (downloaded into the cache on first use, see utils.download).

    asym-siam/<variant>-r50-100ep   the six Asym-Siam ResNet-50s (docs/REFERENCE.md#released-weights), md5 checked
    aps:<folder>/<file>             a file of the hub repo visresearch/APS, sha256 (or git blob id) checked

The cache is $ASYM_SSL_WEIGHTS, else $TORCH_HOME/hub/checkpoints/asym-ssl (torch.hub's folder);
`python -m tools.weights` lists, downloads and converts them.
"""
import os
from dataclasses import dataclass
from urllib.parse import quote

from utils.download import fetch, get_json_pages, verify
from utils.errors import UserError

ASYM_SIAM_URL = "https://dl.fbaipublicfiles.com/asym-siam/"
HUB_ENDPOINT = "https://huggingface.co"
APS_REPO = "visresearch/APS"
APS_PREFIX = "aps:"


@dataclass(frozen=True)
class Weight:
    name: str
    arch: str
    file: str
    md5_prefix: str
    accuracy: str
    source: str = "asym-siam"
    size: int = None   # bytes, when known


_C3 = "ImageNet linear top-1 (paper, docs/REFERENCE.md#results)"
REGISTRY = {w.name: w for w in (
    Weight("asym-siam/baseline-r50-100ep", "resnet50", "checkpoint_baseline_100ep.pth", "e82ede", f"65.8 {_C3}"),
    Weight("asym-siam/multicrop-r50-100ep", "resnet50", "checkpoint_multicrop_100ep.pth", "892916", f"69.9 {_C3}"),
    Weight("asym-siam/scalemix-r50-100ep", "resnet50", "checkpoint_scalemix_100ep.pth", "3f5d79", f"67.6 {_C3}"),
    Weight("asym-siam/asymaug-r50-100ep", "resnet50", "checkpoint_aug_100ep.pth", "d94e24", f"67.2 {_C3}"),
    Weight("asym-siam/asymbn-r50-100ep", "resnet50", "checkpoint_asym_bn_100ep.pth", "2bf912", f"66.3 {_C3}"),
    Weight("asym-siam/meanenc-r50-100ep", "resnet50", "checkpoint_mean_enc_100ep.pth", "599801", f"67.7 {_C3}"),
)}


def weights_dir() -> str:
    if os.environ.get("ASYM_SSL_WEIGHTS"):
        return os.environ["ASYM_SSL_WEIGHTS"]
    import torch.hub
    return os.path.join(torch.hub.get_dir(), "checkpoints", "asym-ssl")


def asym_siam_url(w: Weight) -> str:
    return os.environ.get("ASYM_SIAM_URL", ASYM_SIAM_URL).rstrip("/") + "/" + w.file


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", HUB_ENDPOINT).rstrip("/")


def is_registry_name(name: str) -> bool:
    return name in REGISTRY or name.startswith(APS_PREFIX)


def cache_path(name: str, dest: str = None) -> str:
    dest = dest or weights_dir()
    if name.startswith(APS_PREFIX):
        path = name[len(APS_PREFIX):].strip("/")
        if not path or ".." in path.split("/"):
            raise UserError(f"{name!r} names no file; use aps:<folder>/<file> as listed by "
                            "`python -m tools.weights list --remote aps`")
        return os.path.join(dest, "aps", *path.split("/"))
    return os.path.join(dest, "asym-siam", REGISTRY[name].file)


def aps_listing(timeout: float = 30.0):
    """The files of the APS hub repo: [{path, size, sha256 (LFS files) or None, blob_id}], through the hub's
    tree API (GET /api/models/<repo>/tree/main?recursive=true), one request per page."""
    url = f"{hub_endpoint()}/api/models/{APS_REPO}/tree/main?recursive=true"
    return [dict(path=e["path"], size=e.get("size"), sha256=(e.get("lfs") or {}).get("oid"), blob_id=e.get("oid"))
            for e in get_json_pages(url, timeout) if e.get("type") == "file"]


def download(name: str, dest: str = None, timeout: float = 30.0) -> str:
    """The verified local file of registry `name`, downloading it first if needed."""
    if not name.startswith(APS_PREFIX) and name not in REGISTRY:
        raise UserError(f"unknown weights {name!r}; see `python -m tools.weights list`")
    path = cache_path(name, dest)
    if os.path.isfile(path):
        return path
    if name.startswith(APS_PREFIX):
        want = name[len(APS_PREFIX):].strip("/")
        entry = next((e for e in aps_listing(timeout) if e["path"] == want), None)
        if entry is None:
            raise UserError(f"{APS_REPO} has no file {want!r}; see `python -m tools.weights list --remote aps`")
        url = f"{hub_endpoint()}/{APS_REPO}/resolve/main/{quote(want)}"
        if entry["sha256"]:
            return fetch(url, path, lambda p: verify(p, sha256=entry["sha256"]), timeout, label=name)
        return fetch(url, path, lambda p: verify(p, git_sha1=entry["blob_id"]), timeout, label=name)
    w = REGISTRY[name]
    return fetch(asym_siam_url(w), path, lambda p: verify(p, md5_prefix=w.md5_prefix), timeout, label=name)


def resolve(name_or_path: str) -> str:
    """A path stays a path; a registry name becomes its verified cached file (downloaded when missing)."""
    if os.path.exists(name_or_path) or not is_registry_name(name_or_path):
        return name_or_path
    return download(name_or_path)
