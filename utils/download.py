"""Downloads that can be trusted: resumed over HTTP Range, shown as they go, verified before they are used.

`fetch(url, path, check)` writes `path`.part, resumes it on the next call, runs `check` on the finished part
file and only then renames it into place, so nothing unverified is ever at `path`. `verify` checks an md5
prefix, a sha256 or a git blob id; `get_json_pages` reads a paginated JSON API.
"""
import hashlib
import json
import os
import socket
import sys
import time
from http.client import HTTPException
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from utils.errors import UserError

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


def get_json_pages(url: str, timeout: float):
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
