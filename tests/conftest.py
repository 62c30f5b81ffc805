"""Shared test setup: the project root on sys.path, two threads, and the fixtures several test files use (the
tiny model flags, a folder of JPEGs, tiny APS and MoCo checkpoints, a toy Trainer, torchrun)."""
import contextlib
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(2)

# the tiny model every test trains: depth 2, width 32 (the reference's layout otherwise, docs/REFERENCE.md#aps-model)
TINY = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
        "--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim", "32"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end runs (CI runs them too)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (bench.gpu_report runs them on the device machine)")
    # torchvision 0.29's decoders still work; their deprecation (for TorchCodec) is noted in docs/SPEED.md
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    """Without a CUDA device the CUDA-marked tests are deselected (not skipped): bench.gpu_report runs them."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("cuda")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


@pytest.fixture(autouse=True)
def fresh_logger():
    """A script's logger writes to the stdout of the test that set it up; the next test starts without it."""
    yield
    logging.getLogger("asym").handlers.clear()


@pytest.fixture
def tiny_flags():
    return list(TINY)


@pytest.fixture
def make_folder():
    """make_folder(root, classes=2, per_class=6, size=(40, 48)): an ImageNet-style folder (train/ and val/, one
    sub-folder per class) of random JPEGs."""
    from PIL import Image

    def make(root, classes=2, per_class=6, size=(40, 48)):
        g = torch.Generator().manual_seed(0)
        for split in ("train", "val"):
            for c in range(classes):
                d = root / split / f"class{c}"
                d.mkdir(parents=True)
                for i in range(per_class):
                    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
                    Image.fromarray(arr).save(d / f"{i}.jpg")
    return make


@pytest.fixture
def tiny_aps():
    """tiny_aps(): an APS model (ViT depth 2, width 32, patch 4 at 16 px; small heads), seed 0."""
    from models import APS, create_vit

    def make():
        torch.manual_seed(0)
        return APS(create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2), 24, 8, 20)
    return make


@pytest.fixture
def reference_state():
    """reference_state(aps_model): its state dict in the reference's key layout, written out by hand from
    docs/REFERENCE.md#aps-checkpoint."""
    def convert(model) -> dict:
        enc = model.encoder
        sd = {
            "base_encoder.cls_token": enc.cls_token.detach().clone(),
            "base_encoder.pos_embedding": enc.pos_embed.detach()[0].unsqueeze(1).clone(),  # (L, 1, D)
            "base_encoder.patchify.weight": enc.patch_embed.proj.weight.detach().clone(),
            "base_encoder.patchify.bias": enc.patch_embed.proj.bias.detach().clone(),
            "base_encoder.layer_norm.weight": enc.norm.weight.detach().clone(),
            "base_encoder.layer_norm.bias": enc.norm.bias.detach().clone(),
        }
        for i, blk in enumerate(enc.blocks):
            parts = {"norm1": blk.norm1, "attn.proj": blk.attn.proj, "norm2": blk.norm2, "mlp.fc1": blk.mlp.fc1,
                     "mlp.fc2": blk.mlp.fc2}
            for name, mod in parts.items():
                sd[f"base_encoder.transformer.{i}.{name}.weight"] = mod.weight.detach().clone()
                sd[f"base_encoder.transformer.{i}.{name}.bias"] = mod.bias.detach().clone()
            sd[f"base_encoder.transformer.{i}.attn.qkv.weight"] = blk.attn.qkv.weight.detach().clone()
        for k, v in model.projector.state_dict().items():
            sd[f"base_encoder.fc.{k}"] = v.clone()
        for k, v in model.predictor.state_dict().items():
            sd[f"predictor.{k}"] = v.clone()
        return sd
    return convert


@pytest.fixture
def moco_checkpoints():
    """moco_checkpoints(folder): a tiny ResNet-18 MoCo model saved in our format (ours.pth) and in the
    reference's (ref.pth, docs/REFERENCE.md#moco-checkpoint); returns the model."""
    from models.moco import MoCo
    from models.resnet import create_resnet, moco_projector

    def make(folder):
        torch.manual_seed(3)
        enc = create_resnet("resnet18", cifar_stem=True)
        enc.fc = moco_projector(enc.feature_dim, 32, 8)
        moco = MoCo(enc, dim=8, queue_size=16)
        with torch.no_grad():                                         # BN statistics that are not the defaults
            for m in moco.encoder_q.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        torch.save({"model": moco.state_dict(), "args": {}, "epoch": 1, "optimizer": {}}, folder / "ours.pth")
        torch.save({"epoch": 100, "arch": "resnet18", "optimizer": {},
                    "state_dict": {f"module.{k}": v for k, v in moco.state_dict().items()}}, folder / "ref.pth")
        return moco
    return make


@pytest.fixture
def make_trainer():
    """make_trainer(folder, steps_fn, K, epochs, lr_log, reporter=None, **settings) -> (Trainer, optimizer): a
    Linear(2, 1) over 5 batches of 2, K steps per batch from steps_fn(model, batch); the lr schedule logs each epoch
    it is asked for in lr_log."""
    from torch.utils.data import DataLoader, TensorDataset

    from engine import Method, Trainer, TrainSettings

    class Toy(Method):
        def __init__(self, model, steps_fn, steps_per_batch, epochs, lr_log):
            super().__init__(model)
            self.steps_fn, self.steps_per_batch, self.epochs, self.lr_log = steps_fn, steps_per_batch, epochs, lr_log

        def training_steps(self, batch, rng):
            return self.steps_fn(self.model, batch)

        def lr_at(self, e):
            self.lr_log.append(e)
            return 0.1 * (1 - e / self.epochs)

    def make(folder, steps_fn, K, epochs, lr_log, reporter=None, **settings):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        data = TensorDataset(torch.randn(10, 2), torch.zeros(10))
        loader = DataLoader(data, batch_size=2, shuffle=False)
        settings = TrainSettings(output_dir=str(folder), epochs=epochs, batch_size=2, print_freq=1, **settings)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return Trainer(Toy(model, steps_fn, K, epochs, lr_log), opt, loader, settings, torch.device("cpu"), None,
                       reporter), opt
    return make


@pytest.fixture
def torchrun():
    """torchrun(port, script, *args): `script args` under torchrun with 2 CPU processes (gloo), output captured."""
    def run(port: int, script: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               script, *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    return run


@contextlib.contextmanager
def reference_classes():
    """The reference's model module, `module.model`, registered for the block's duration only (torch.save pickles
    classes by their module path): Vit, the fine-tuned classifier layout of the reference (cls_token (1, 1, D),
    pos_embedding (L, 1, D), patchify, transformer = timm Blocks, layer_norm, fc on the cls token)."""
    from timm.models.vision_transformer import Block

    class Vit(nn.Module):
        def __init__(self, img_size=32, patch=2, dim=32, depth=2, heads=2, classes=10):
            super().__init__()
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embedding = nn.Parameter(torch.randn((img_size // patch) ** 2, 1, dim) * 0.02)
            self.patchify = nn.Conv2d(3, dim, patch, patch)
            self.transformer = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=False) for _ in range(depth)])
            self.layer_norm = nn.LayerNorm(dim)
            self.fc = nn.Linear(dim, classes)

        def forward(self, x):
            t = self.patchify(x).flatten(2).permute(2, 0, 1) + self.pos_embedding            # [L, B, D]
            t = torch.cat([self.cls_token.expand(-1, x.shape[0], -1), t]).transpose(0, 1)   # [B, 1 + L, D]
            return self.fc(self.layer_norm(self.transformer(t))[:, 0])

    package, module = types.ModuleType("module"), types.ModuleType("module.model")
    Vit.__module__, Vit.__qualname__ = "module.model", "Vit"
    module.Vit, package.model = Vit, module
    saved = {k: sys.modules.get(k) for k in ("module", "module.model")}
    sys.modules.update({"module": package, "module.model": module})
    try:
        yield module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture
def reference_classifier():
    """reference_classifier(path, img_size=32, patch=2, classes=10, dim=32, heads=2, **attrs) -> the model: a
    genuine torch.save(module) of the reference's fine-tuned Vit (depth 2), written with the
    reference's module registered and readable only without it (it is gone again when this returns). attrs
    are set on the model before saving (to smuggle things in)."""
    def make(path, img_size=32, patch=2, classes=10, dim=32, heads=2, **attrs):
        with reference_classes() as module:
            torch.manual_seed(0)
            model = module.Vit(img_size, patch, dim, 2, heads, classes)
            for k, v in attrs.items():
                setattr(model, k, v)
            torch.save(model, path)
        return model.eval()
    return make


# ---------------------------------------------------------------- the device guard
@pytest.fixture
def device_guard():
    """A device_guard.DeviceGuard, installed for the test (every patch undone after it)."""
    from device_guard import DeviceGuard
    guard = DeviceGuard().install()
    yield guard
    guard.uninstall()
