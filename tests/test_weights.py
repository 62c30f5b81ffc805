"""Released weights: registry, verified and resumed downloads, hub listing, conversion, torch.hub.

No test touches the internet: files and the hub API are served from 127.0.0.1.
"""
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn as nn

from models.loading import load_backbone
from models.resnet import ResNetTrunk, create_resnet
from models import registry as W
from tools import weights as tool
from utils import download
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Handler(BaseHTTPRequestHandler):
    """Serves server.files (path -> bytes) with Range support; server.cut_once: paths whose first response
    stops half-way; server.delay: seconds to wait before answering; server.log: (path, Range header)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        srv.log.append((path, self.headers.get("Range")))
        time.sleep(srv.delay)
        if path == "/api/models/visresearch/APS/tree/main":   # pages of 2 entries, GitHub-style Link header
            cursor = int(self.path.split("cursor=")[1]) if "cursor=" in self.path else 0
            body = json.dumps(srv.tree[cursor:cursor + 2]).encode()
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
            if cursor + 2 < len(srv.tree):
                headers["Link"] = f'<{srv.url}{path}?recursive=true&cursor={cursor + 2}>; rel="next"'
            return self._send(200, body, headers)
        if path not in srv.files:
            return self._send(404, b"not found")
        data, start = srv.files[path], 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
        body = data[start:]
        headers = {"Content-Length": str(len(body))}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if path in srv.cut_once:                     # promise everything, send half, hang up
            srv.cut_once.discard(path)
            self.send_response(206 if rng else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(206 if rng else 200, body, headers)

    def _send(self, code, body, headers=None):
        self.send_response(code)
        for k, v in (headers or {"Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.cut_once, srv.delay, srv.log, srv.tree = {}, set(), 0.0, [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    monkeypatch.setenv("ASYM_SIAM_URL", url + "/asym-siam/")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("ASYM_SSL_WEIGHTS", str(tmp_path / "cache"))
    srv.url = url
    yield srv
    srv.shutdown()
    srv.server_close()


def tiny_moco_reference(path):
    """A ResNet-18 MoCo checkpoint in the reference layout (docs/REFERENCE.md#moco-checkpoint); returns its query
    encoder."""
    from models.moco import MoCo
    from models.resnet import moco_projector
    torch.manual_seed(5)
    enc = create_resnet("resnet18", cifar_stem=True)
    enc.fc = moco_projector(enc.feature_dim, 32, 8)
    moco = MoCo(enc, dim=8, queue_size=16)
    torch.save({"epoch": 100, "arch": "resnet18", "optimizer": {},
                "state_dict": {f"module.{k}": v for k, v in moco.state_dict().items()}}, path)
    return moco.encoder_q


def register(monkeypatch, server, tmp_path, name="asym-siam/test-r18", payload=None):
    """Serve a reference checkpoint (or `payload` bytes) under a registry entry with its real md5 prefix."""
    src = tmp_path / "src.pth"
    encoder = tiny_moco_reference(src) if payload is None else None
    data = src.read_bytes() if payload is None else payload
    server.files["/asym-siam/ck.pth"] = data
    w = W.Weight(name, "resnet18", "ck.pth", hashlib.md5(data).hexdigest()[:6], "test")
    monkeypatch.setitem(W.REGISTRY, name, w)
    return w, data, encoder


def run_cli(argv):
    return tool.main(tool.get_args_parser().parse_args(argv))


def test_download_verifies_moves_into_place_and_loads_by_name(monkeypatch, server, tmp_path, capsys):
    w, data, encoder = register(monkeypatch, server, tmp_path)
    run_cli(["download", w.name])
    path = W.cache_path(w.name)
    assert capsys.readouterr().out.strip() == path
    assert open(path, "rb").read() == data and not os.path.exists(path + ".part")
    x = torch.randn(2, 3, 16, 16)
    backbone = load_backbone(w.name).eval()                    # a registry name, like a path
    assert torch.allclose(backbone(x), ResNetTrunk(encoder).eval()(x), atol=1e-5)
    n_requests = len(server.log)
    load_backbone(w.name)                                       # cached: no second download
    assert len(server.log) == n_requests
    run_cli(["list"])
    listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    row = next(r for r in listed if r[0] == w.name)
    assert row[1] == "resnet18" and row[-1] == path
    assert any(r[0] == "asym-siam/multicrop-r50-100ep" and r[-1] == "no" and r[3].startswith("69.9") for r in listed)


def test_a_corrupted_file_is_rejected_and_removed(monkeypatch, server, tmp_path, capsys):
    w, data, _ = register(monkeypatch, server, tmp_path)
    server.files["/asym-siam/ck.pth"] = data[:-10] + b"0123456789"        # same size, other bytes
    with pytest.raises(SystemExit) as e:
        run_cli(["download", w.name])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress lines
    assert e.value.code == 2 and "checksum mismatch" in err and "deleted" in err and err.startswith("error: ")
    path = W.cache_path(w.name)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")


def test_an_interrupted_download_resumes_with_a_range_request(monkeypatch, server, tmp_path):
    w, data, _ = register(monkeypatch, server, tmp_path)
    server.cut_once.add("/asym-siam/ck.pth")
    path = W.cache_path(w.name)
    check = lambda p: download.verify(p, md5_prefix=w.md5_prefix)  # noqa: E731
    with pytest.raises(UserError, match="interrupted at .* run the same command again to resume"):
        download.fetch(W.asym_siam_url(w), path, check, retries=0)
    part = path + ".part"
    assert os.path.getsize(part) == len(data) // 2 and not os.path.exists(path)   # the partial file is kept
    download.fetch(W.asym_siam_url(w), path, check, retries=0)                           # the next run resumes
    assert server.log[-1] == ("/asym-siam/ck.pth", f"bytes={len(data) // 2}-")
    assert open(path, "rb").read() == data
    os.remove(path)
    server.cut_once.add("/asym-siam/ck.pth")                   # with retries, one call gets through
    W.download(w.name)
    assert open(path, "rb").read() == data and server.log[-1][1] is not None


def test_server_errors_and_offline_give_one_line(monkeypatch, server, tmp_path, capsys):
    w, _, _ = register(monkeypatch, server, tmp_path)
    del server.files["/asym-siam/ck.pth"]
    with pytest.raises(SystemExit):
        run_cli(["download", w.name])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress lines
    assert "HTTP 404" in err and W.asym_siam_url(w) in err and "pass the file's path" in err
    server.files["/asym-siam/ck.pth"] = b"x"
    server.delay = 2.0
    with pytest.raises(SystemExit):
        run_cli(["download", w.name, "--timeout", "0.3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress lines
    assert err.startswith("error: cannot reach") and "timed out" in err
    server.delay = 0.0
    monkeypatch.setenv("ASYM_SIAM_URL", "http://127.0.0.1:9/")  # nothing listens there: offline
    with pytest.raises(SystemExit):
        run_cli(["download", w.name])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress lines
    assert err.startswith("error: cannot reach http://127.0.0.1:9/ck.pth") and W.cache_path(w.name) in err


def test_a_pickle_with_a_code_payload_is_refused_without_running_it(monkeypatch, server, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    import io
    buf = io.BytesIO()
    torch.save({"state_dict": Payload()}, buf)
    w, _, _ = register(monkeypatch, server, tmp_path, payload=buf.getvalue())
    with pytest.raises(UserError, match="pickled Python objects"):
        load_backbone(w.name)                                   # downloaded (checksum fine), never unpickled
    assert not marker.exists()


def test_aps_files_are_listed_through_the_hub_api_and_verified(monkeypatch, server, tmp_path,
                                                               capsys, tiny_aps, reference_state):
    aps = tiny_aps()
    torch.save(reference_state(aps), tmp_path / "aps.pth")
    big, small = (tmp_path / "aps.pth").read_bytes(), b"# notes\n"
    server.files["/visresearch/APS/resolve/main/pretrain/tiny.pth"] = big
    server.files["/visresearch/APS/resolve/main/README.md"] = small
    git_id = hashlib.sha1(b"blob %d\0" % len(small) + small).hexdigest()
    server.tree = [
        {"type": "directory", "oid": "0" * 40, "size": 0, "path": "pretrain"},
        {"type": "file", "oid": "1" * 40, "size": len(big), "path": "pretrain/tiny.pth",
         "lfs": {"oid": hashlib.sha256(big).hexdigest(), "size": len(big), "pointerSize": 134}},
        {"type": "file", "oid": git_id, "size": len(small), "path": "README.md"},
    ]
    run_cli(["list", "--remote", "aps"])
    out = capsys.readouterr().out
    assert "aps:pretrain/tiny.pth\t" in out and "aps:README.md\t" in out and "pretrain\t" not in out
    x = torch.randn(2, 3, 16, 16)
    backbone = load_backbone("aps:pretrain/tiny.pth", num_heads=2).eval()  # heads are not in the file
    assert torch.allclose(backbone(x), aps.encoder.eval()(x), atol=1e-5)
    assert open(W.download("aps:README.md"), "rb").read() == small       # git blob id checked
    server.files["/visresearch/APS/resolve/main/pretrain/other.pth"] = big
    server.tree.append({"type": "file", "oid": "2" * 40, "size": len(big), "path": "pretrain/other.pth",
                        "lfs": {"oid": "f" * 64, "size": len(big), "pointerSize": 134}})
    with pytest.raises(UserError, match="checksum mismatch"):
        W.download("aps:pretrain/other.pth")
    with pytest.raises(UserError, match="has no file 'pretrain/none.pth'"):
        W.download("aps:pretrain/none.pth")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="cannot list http://127.0.0.1:9/api/models/visresearch/APS"):
        W.download("aps:pretrain/none.pth")


def test_convert_writes_a_plain_torchvision_state_dict(monkeypatch, server, tmp_path, capsys):
    w, _, encoder = register(monkeypatch, server, tmp_path)
    out = tmp_path / "plain.pth"
    run_cli(["convert", w.name, str(out)])
    assert "wrote" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    plain = create_resnet("resnet18", cifar_stem=True)          # fc = Identity: no fc keys
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(plain.eval()(x), ResNetTrunk(encoder).eval()(x), atol=1e-5)


def test_torch_hub_entry_points(monkeypatch, server, tmp_path, reference_state):
    from models import APS, create_vit
    torch.manual_seed(0)
    aps = APS(create_vit("vit-tiny", img_size=16, patch_size=4, depth=1), 24, 8, 20)   # ViT-Tiny's width
    torch.save(reference_state(aps), tmp_path / "aps.pth")
    vit = torch.hub.load(ROOT, "aps_vit_tiny", source="local", weights=str(tmp_path / "aps.pth"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(vit.eval()(x), aps.encoder.eval()(x), atol=1e-5)
    r50 = torch.hub.load(ROOT, "asym_siam_resnet50", source="local", pretrained=False)
    assert isinstance(r50.fc, nn.Identity) and r50.layer4[0].conv3.out_channels == 2048
    # a released file, stood in for by a ResNet-50 trunk in the reference layout, already in the cache
    name = "asym-siam/multicrop-r50-100ep"
    trunk = create_resnet("resnet50").half()
    path = W.cache_path(name)
    os.makedirs(os.path.dirname(path))
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in trunk.state_dict().items()}}, path)
    model = torch.hub.load(ROOT, "asym_siam_resnet50", source="local", variant="multicrop", pretrained=True)
    assert torch.equal(model.conv1.weight, trunk.conv1.weight.float())
    with pytest.raises(UserError, match="unknown variant 'mocov3'"):
        torch.hub.load(ROOT, "asym_siam_resnet50", source="local", variant="mocov3")
