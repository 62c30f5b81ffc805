"""Released weights: a registry, verified downloads into a cache, conversion to plain backbone files.

    python -m utils.weights list                       # every known weight, and whether it is downloaded
    python -m utils.weights list --remote aps          # the files of the APS hub repo (hub API)
    python -m utils.weights download asym-siam/multicrop-r50-100ep [--dest DIR]
    python -m utils.weights download aps:pretrain/<file>
    python -m utils.weights convert IN OUT              # a plain timm/torchvision backbone state dict

Downloads go to <dest>/<file>.part, resume from there (HTTP Range), are verified (the published md5 prefix for
Asym-Siam; the hub's sha256 for APS) and only then renamed into place: nothing unverified is ever loaded.
The cache is $ASYM_SSL_WEIGHTS, else $TORCH_HOME/hub/checkpoints/asym-ssl (torch.hub's folder).
"""
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from http.client import HTTPException
from urllib.error import HTTPError, URLError
from urllib.parse import quote
from urllib.request import Request, urlopen

from utils.errors import ArgumentParser, UserError, exit_on_user_error

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


_C3 = "ImageNet linear top-1 (paper, SPEC C3)"
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
                            "`python -m utils.weights list --remote aps`")
        return os.path.join(dest, "aps", *path.split("/"))
    return os.path.join(dest, "asym-siam", REGISTRY[name].file)


# ------------------------------------------------------------------ checksums
def file_digest(path: str, algorithm: str, git_blob: bool = False) -> str:
    h = hashlib.new(algorithm)
    if git_blob:  # a git blob id: sha1 of "blob <size>\0" + content (the hub's id of small files)
        h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str, md5_prefix: str = None, sha256: str = None, git_sha1: str = None):
    """None if `path` matches the expected digest, else what is wrong."""
    for algo, want, blob in (("md5", md5_prefix, False), ("sha256", sha256, False), ("sha1", git_sha1, True)):
        if want:
            have = file_digest(path, algo, blob)
            if not have.startswith(want.lower()):
                return f"{algo} {have[:max(len(want), 12)]}... does not match the published {want}"
    return None


# ------------------------------------------------------------------ download
class ByteProgress:
    """'name  42% 12.0/28.6 MiB 3.1 MiB/s' on stderr: redrawn in place on a terminal, every 10 % otherwise."""

    def __init__(self, label: str, total: int, start: int = 0):
        self.label, self.total, self.done, self.start = label, total, start, start
        self.t0, self.tty, self.shown = time.perf_counter(), sys.stderr.isatty(), -1

    def update(self, n: int):
        self.done += n
        pct = int(100 * self.done / self.total) if self.total else -1
        if self.tty or (pct // 10 != self.shown // 10):
            rate = (self.done - self.start) / max(time.perf_counter() - self.t0, 1e-6) / 2**20
            size = f"/{self.total / 2**20:.1f}" if self.total else ""
            head = f"{pct:3d}% " if self.total else ""
            end = "\r" if self.tty else "\n"
            sys.stderr.write(f"{self.label} {head}{self.done / 2**20:.1f}{size} MiB {rate:.1f} MiB/s{end}")
            self.shown = pct

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def _manual(url: str, path: str) -> str:
    return f"download it elsewhere and pass the file's path instead (or put it at {path})"


def fetch(url: str, path: str, check, timeout: float = 30.0, retries: int = 2, label: str = None) -> str:
    """Download `url` to `path` through `path`.part (resumed with HTTP Range), then `check(part)` (None or
    what is wrong); a failed check deletes the part file. Returns `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = path + ".part"
    label = label or os.path.basename(path)
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"User-Agent": "asym-ssl-weights"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urlopen(Request(url, headers=headers), timeout=timeout)
        except HTTPError as e:
            if e.code == 416 and have:               # nothing left to fetch: the part file is complete
                break
            raise UserError(f"HTTP {e.code} ({e.reason}) for {url}; {_manual(url, path)}") from None
        except (URLError, socket.timeout, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot reach {url} ({reason}); {_manual(url, path)}") from None
        with resp:
            if have and resp.status != 206:         # the server ignored the range: start again
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length else 0
            bar = ByteProgress(label, total, have)
            complete = False
            try:
                with open(part, "ab" if have else "wb") as f:
                    while True:
                        block = resp.read(1 << 20)
                        if not block:
                            break
                        f.write(block)
                        bar.update(len(block))
                complete = not total or bar.done >= total
            except (HTTPException, socket.timeout, TimeoutError, ConnectionError):
                complete = False
            finally:
                bar.close()
        if complete:
            break
        if attempt == retries:
            raise UserError(f"download of {url} interrupted at {bar.done} of {total} bytes; run the same command "
                            f"again to resume from {part}")
    problem = check(part)
    if problem:
        os.remove(part)
        raise UserError(f"{label}: checksum mismatch ({problem}); the download was deleted: run the command "
                        "again, and if it fails again the file on the server is not the published one")
    os.replace(part, path)
    return path


def _get_json_pages(url: str, timeout: float):
    """GET a JSON list, following the hub's 'Link: <...>; rel="next"' pagination."""
    items = []
    while url:
        try:
            with urlopen(Request(url, headers={"User-Agent": "asym-ssl-weights"}), timeout=timeout) as resp:
                items += json.loads(resp.read().decode())
                link = resp.headers.get("Link") or ""
        except HTTPError as e:
            raise UserError(f"HTTP {e.code} ({e.reason}) for {url}; check the repo name, or download the file "
                            "from the hub's web page and pass its path") from None
        except (URLError, socket.timeout, TimeoutError, OSError, ValueError) as e:
            raise UserError(f"cannot list {url} ({getattr(e, 'reason', None) or e}); download the file from the "
                            "hub's web page and pass its path") from None
        url = next((part.split(";")[0].strip(" <>") for part in link.split(",") if 'rel="next"' in part), None)
    return items


def aps_listing(timeout: float = 30.0):
    """The files of the APS hub repo: [{path, size, sha256 (LFS files) or None, blob_id}], through the hub's
    tree API (GET /api/models/<repo>/tree/main?recursive=true), one request per page."""
    url = f"{hub_endpoint()}/api/models/{APS_REPO}/tree/main?recursive=true"
    return [dict(path=e["path"], size=e.get("size"), sha256=(e.get("lfs") or {}).get("oid"), blob_id=e.get("oid"))
            for e in _get_json_pages(url, timeout) if e.get("type") == "file"]


def download(name: str, dest: str = None, timeout: float = 30.0) -> str:
    """The verified local file of registry `name`, downloading it first if needed."""
    if not name.startswith(APS_PREFIX) and name not in REGISTRY:
        raise UserError(f"unknown weights {name!r}; see `python -m utils.weights list`")
    path = cache_path(name, dest)
    if os.path.isfile(path):
        return path
    if name.startswith(APS_PREFIX):
        want = name[len(APS_PREFIX):].strip("/")
        entry = next((e for e in aps_listing(timeout) if e["path"] == want), None)
        if entry is None:
            raise UserError(f"{APS_REPO} has no file {want!r}; see `python -m utils.weights list --remote aps`")
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


# ------------------------------------------------------------------ conversion
def convert(src: str, out: str) -> str:
    """Write the backbone of `src` (a path or registry name, any format load_backbone reads) as a plain state
    dict, after a strict load: torchvision keys for ResNets (no fc), timm keys for ViTs (no head)."""
    from models.loading import load_backbone
    from utils.checkpoint import save_checkpoint
    model = load_backbone(src)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(state, out)
    return f"wrote {out}: {type(model).__name__} backbone, {len(state)} tensors"


# ------------------------------------------------------------------ command line
def list_lines(dest: str = None):
    rows = [("name", "arch", "source", "reported", "size", "downloaded")]
    for w in REGISTRY.values():
        path = cache_path(w.name, dest)
        size = f"{w.size / 2**20:.0f} MiB" if w.size else "?"
        rows.append((w.name, w.arch, asym_siam_url(w), w.accuracy, size, path if os.path.isfile(path) else "no"))
    rows.append((f"{APS_PREFIX}<folder>/<file>", "vit", f"{hub_endpoint()}/{APS_REPO}", "see the APS README", "?",
                 "`list --remote aps` lists the files"))
    return rows


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m utils.weights")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="known weights (or --remote aps: the hub repo's files)")
    ls.add_argument("--remote", choices=["aps"], default=None, help="list the files of a remote repo")
    ls.add_argument("--dest", default=None, help="cache folder to look in (default: see above)")
    dl = sub.add_parser("download", help="fetch and verify one weight")
    dl.add_argument("name", help="a registry name or aps:<folder>/<file>")
    dl.add_argument("--dest", default=None, help="cache folder (default: $ASYM_SSL_WEIGHTS or torch.hub's)")
    dl.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    cv = sub.add_parser("convert", help="write a checkpoint's backbone as a plain state dict")
    cv.add_argument("src", help="checkpoint path or registry name")
    cv.add_argument("out", help="output .pth")
    return p


@exit_on_user_error
def main(args):
    if args.command == "list" and args.remote == "aps":
        for e in aps_listing():
            digest = f"sha256 {e['sha256'][:12]}" if e["sha256"] else f"git {e['blob_id'][:12]}"
            print(f"{APS_PREFIX}{e['path']}\t{e['size']}\t{digest}")
    elif args.command == "list":
        for row in list_lines(args.dest):
            print("\t".join(row))
    elif args.command == "download":
        print(download(args.name, args.dest, args.timeout))
    else:
        print(convert(args.src, args.out))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
