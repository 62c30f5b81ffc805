"""What a GPU would show, checked on the CPU: the device path, the sampler, each method's step and the evaluation
make no host syncs (run with their data on `meta`, under tests/conftest.py's DeviceGuard); every random number
is drawn on the CPU, so a seed gives the same parameters whatever device the images are on; every loss keeps
fp32 under autocast."""
import contextlib
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import augment.batched as batched
import utils.rng as rng_module
from augment.recipes import aps_pair, finetune_view, lincls_view, moco_views
from data.datasets import get_preset
from data.device_loaders import DeviceLoader, TensorLoader
from utils.rng import BatchRandom, counter_normal
from utils.transfer import to_device

META = torch.device("meta")
PRESET = get_preset("cifar10")
RECIPES = {
    "aps": lambda: aps_pair(PRESET, 16),
    "moco-all-switches": lambda: moco_views(PRESET, 16, num_key_views=2, num_minis=2, mini_size=8, asym_aug=True,
                                            scalemix=True),
    "moco-v2": lambda: moco_views(PRESET, 16),
    "finetune": lambda: finetune_view(PRESET, 16),                   # RandAugment and random erasing
    "lincls": lambda: lincls_view(PRESET, 16),
}


def images(n=4, device="cpu", size=16):
    return (torch.arange(n * 3 * size * size) % 251).to(torch.uint8).view(n, 3, size, size).to(device)


def no_trouble(guard):
    assert guard.syncs == [], "host syncs:\n" + "\n".join(guard.syncs)
    assert guard.device_draws == [], "draws on a device's generator:\n" + "\n".join(guard.device_draws)


# ---------------------------------------------------------------- the guard itself catches each class of defect
@pytest.mark.parametrize("defect", ["python-data", "item", "tolist", "bool", "mask-index", "nonzero", "copy",
                                    "draw", "draw-like", "draw-in-place"])
def test_the_guard_catches_each_class_of_defect(device_guard, defect):
    x = torch.ones(4, device=META)
    host = torch.ones(4)
    plant = {"python-data": lambda: torch.tensor([1.0, 2.0], device=META),
             "item": lambda: x.sum().item(),
             "tolist": lambda: x.tolist(),
             "bool": lambda: bool(x.sum() > 0),
             "mask-index": lambda: x[x > 0],
             "nonzero": lambda: torch.nonzero(x),
             "copy": lambda: host.to(META),
             "draw": lambda: torch.rand(3, device=META),
             "draw-like": lambda: torch.rand_like(x),
             "draw-in-place": lambda: x.uniform_()}[defect]
    try:
        plant()
    except (RuntimeError, NotImplementedError):   # meta cannot compute it either: what counts is that it was seen
        pass
    assert guard_found(device_guard), f"the guard missed {defect}"


def guard_found(guard) -> bool:
    return bool(guard.syncs or guard.device_draws)


def test_the_guard_lets_pinned_transfers_and_host_draws_through(device_guard):
    draws = torch.rand(3, generator=torch.Generator().manual_seed(0))
    moved = to_device(draws, META)
    (moved * 2 + torch.zeros(3, device=META)).sum()
    assert moved.device == META
    no_trouble(device_guard)


# ---------------------------------------------------------------- the device path
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_batched_pipelines_make_no_host_sync_and_no_device_draw(device_guard, name):
    pipe = batched.batched_pipeline(RECIPES[name]())
    x = images(device=META)
    device_guard.reset()
    for batch in range(2):
        out = pipe(x, BatchRandom("cpu", 0, 1).reseed(0, 0, batch))
    no_trouble(device_guard)
    first = out["view1"] if name == "aps" else out["query"] if name.startswith("moco") else out
    assert first.device == META


def test_images_of_different_sizes_make_no_host_sync(device_guard):
    """The folder path: a list of decoded images, cropped image by image with boxes read on the host."""
    pipe = batched.batched_pipeline(RECIPES["lincls"]())
    sizes = [(20, 24), (16, 16), (31, 18), (17, 40)]
    x = [torch.zeros(3, h, w, dtype=torch.uint8, device=META) for h, w in sizes]
    device_guard.reset()
    out = pipe(x, BatchRandom("cpu", 0, 1).reseed(3))
    assert out.shape == (4, 3, 16, 16) and out.device == META
    no_trouble(device_guard)


class TinySet:
    def __init__(self, n=8):
        self.data = np.asarray(images(n).permute(0, 2, 3, 1))
        self.targets = list(range(n))


def test_device_loader_makes_no_host_sync(device_guard):
    loader = DeviceLoader(TinySet(), 4, seed=0, device=META, augment=batched.batched_pipeline(RECIPES["aps"]()),
                          rank=0, world=1)
    device_guard.reset()
    batches = list(loader)
    assert len(batches) == 2 and batches[0][1].device == META
    no_trouble(device_guard)


def recorded_parameters(monkeypatch, name, device, seed=5):
    """The host dicts of parameters the pipeline moves to the images' device, for one batch."""
    seen = []
    real = batched.tree_to_device

    def record(tree, dev):
        # (random erasing's noise is made on the images' device from a host-drawn key: test_erasing_noise_...)
        seen.append({k: v.clone() for k, v in tree.items() if torch.is_tensor(v) and k != "erase_values"})
        return real(tree, dev)

    monkeypatch.setattr(batched, "tree_to_device", record)
    batched.batched_pipeline(RECIPES[name]())(images(device=device), BatchRandom("cpu", 0, 1).reseed(seed))
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_seed_draws_the_same_parameters_whatever_the_images_device(monkeypatch, name):
    on_cpu = recorded_parameters(monkeypatch, name, "cpu")
    on_meta = recorded_parameters(monkeypatch, name, META)
    assert len(on_cpu) == len(on_meta) > 0
    for a, b in zip(on_cpu, on_meta):
        assert a.keys() == b.keys() and "boxes" in a
        for k in a:
            assert torch.equal(a[k], b[k]), k
    other_seed = recorded_parameters(monkeypatch, name, "cpu", seed=6)
    assert not torch.equal(on_cpu[0]["boxes"], other_seed[0]["boxes"])


def test_erasing_noise_is_counter_based_the_same_for_any_split_and_normal():
    key = 123456789
    whole = counter_normal(key, 0, 4, (3, 8, 8), torch.device("cpu"))
    second_half = counter_normal(key, 2, 2, (3, 8, 8), torch.device("cpu"))       # rank 1 of 2
    assert torch.equal(whole[2:], second_half)
    assert not torch.equal(whole, counter_normal(key + 1, 0, 4, (3, 8, 8), torch.device("cpu")))
    big = counter_normal(7, 0, 64, (3, 32, 32), torch.device("cpu")).flatten()
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
    # within 1 % of the standard normal's quantiles (2.5 %, 50 %, 97.5 %)
    q = torch.quantile(big[:100000], torch.tensor([0.025, 0.5, 0.975]))
    assert torch.allclose(q, torch.tensor([-1.96, 0.0, 1.96]), atol=0.03)
    assert counter_normal(7, 0, 2, (4,), META).device == META


# ---------------------------------------------------------------- the sampler and the methods' steps
@contextlib.contextmanager
def record_draws(monkeypatch):
    """The host tensors of every BatchRandom draw inside the block (the numbers, before they move)."""
    seen = []
    real = rng_module.to_device

    def record(t, device):
        seen.append(t.clone())
        return real(t, device)

    with monkeypatch.context() as m:
        m.setattr(rng_module, "to_device", record)
        yield seen


def boxes_on(device):
    g = torch.Generator().manual_seed(0)
    size = torch.randint(6, 17, (4, 2), generator=g).float()
    box = torch.cat([torch.zeros(4, 2), size], 1)
    return box.to(device), (torch.arange(4) % 2 == 0).to(device)


def test_the_sampler_makes_no_host_sync_and_draws_on_the_host(monkeypatch, device_guard):
    from samplers.aps import sample_aps
    draws = {}
    for device in ("cpu", META):
        box, flip = boxes_on(device)
        device_guard.reset()
        with record_draws(monkeypatch) as seen:
            idx1, idx2 = sample_aps(box, flip, box.flip(0), flip, 4, 0.25, 2, 2.0, BatchRandom(device, 0, 1).reseed(9))
        assert idx1.shape == (4, 2, 4) and idx2.device.type == torch.device(device).type
        no_trouble(device_guard)
        draws[str(device)] = seen
    assert len(draws["cpu"]) == len(draws["meta"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(draws["cpu"], draws["meta"]))


def step_through(method, batch, rng, optimizer):
    """Every optimizer step of one loaded batch: forward, backward, step (what the Trainer does per step)."""
    for loss, _ in method.training_steps(batch, rng):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_aps_step_makes_no_host_sync(device_guard, tiny_aps):
    from methods.aps import APSPretraining
    model = tiny_aps().to(META)
    batch = batched.batched_pipeline(RECIPES["aps"]())(images(device=META), BatchRandom("cpu", 0, 1).reseed(0))
    method = APSPretraining(model, model, grid=4, ratio=0.25, steps_per_batch=2, power=2.0, lr=1e-3,
                            warmup_epochs=1, epochs=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device_guard.reset()
    step_through(method, (batch, None), BatchRandom(META, 0, 1).reseed(0, 0, 0, 2), opt)
    no_trouble(device_guard)


def test_moco_step_with_every_switch_makes_no_host_sync_and_draws_on_the_host(monkeypatch, device_guard):
    from methods.moco import MoCoPretraining
    from models.moco import build_moco
    recipe = RECIPES["moco-all-switches"]()
    draws = {}
    for device in ("cpu", META):
        torch.manual_seed(0)
        module = build_moco("resnet18", cifar_stem=True, bn_splits=2, hidden_dim=32, dim=8, queue_size=16,
                            device=torch.device(device))
        views = batched.batched_pipeline(recipe)(images(device=device), BatchRandom("cpu", 0, 1).reseed(0))
        method = MoCoPretraining(module, module, lr=0.1, epochs=1)
        opt = torch.optim.SGD(module.encoder_q.parameters(), lr=0.1, momentum=0.9)
        device_guard.reset()
        with record_draws(monkeypatch) as seen:
            step_through(method, (views, None), BatchRandom(device, 0, 1).reseed(0, 0, 0, 2), opt)
        no_trouble(device_guard)
        draws[str(device)] = seen
    assert len(draws["cpu"]) == len(draws["meta"]) == 4             # ScaleMix's lambda and centre, the permutation
    assert all(torch.equal(a, b) for a, b in zip(draws["cpu"], draws["meta"]))


def test_finetuning_step_with_mixup_and_smoothing_makes_no_host_sync(device_guard):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from methods.classify import FineTuning
    from models.vit import create_vit
    model = create_vit("vit-tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                       num_classes=10).to(META)
    x = batched.batched_pipeline(RECIPES["finetune"]())(images(device=META), BatchRandom("cpu", 0, 1).reseed(0))
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    method = FineTuning(model, model, SoftTargetCrossEntropy(), lambda e: 1e-3, {}, META, None, mixup)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device_guard.reset()
    for seed in (0, 1):                                       # mixup one batch, cutmix the other (np's draws)
        np.random.seed(seed)
        step_through(method, (x, torch.arange(4, device=META)), None, opt)
    no_trouble(device_guard)


def test_linear_probe_step_and_cached_feature_loader_make_no_host_sync(device_guard):
    from methods.classify import LinearProbing
    from models.linear import BackboneGuard, LinearProbe
    from models.resnet import create_resnet
    from torch.utils.data import TensorDataset
    probe = LinearProbe(create_resnet("resnet18", cifar_stem=True), nn.Linear(512, 10), head_bn=True).to(META)
    features = TensorLoader(TensorDataset(torch.randn(8, 512), torch.arange(8)), 4, seed=0, device=META,
                            rank=0, world=1)
    x = batched.batched_pipeline(RECIPES["lincls"]())(images(device=META), BatchRandom("cpu", 0, 1).reseed(0))
    guard = types.SimpleNamespace(snapshot=lambda: None)
    method = LinearProbing(probe, probe, nn.CrossEntropyLoss(), lambda e: 0.1, {}, META, None, guard=guard)
    opt = torch.optim.SGD(probe.head.parameters(), lr=0.1)
    device_guard.reset()
    step_through(method, (x, torch.arange(4, device=META)), None, opt)
    head = LinearProbing(probe.head, probe.head, nn.CrossEntropyLoss(), lambda e: 0.1, {}, META, None, guard=guard)
    for batch in features:
        step_through(head, batch, None, opt)
    no_trouble(device_guard)
    assert isinstance(BackboneGuard, type)


# ---------------------------------------------------------------- evaluation: syncs per pass, not per batch
def meta_loader(batches, n=4, size=16):
    return [(torch.zeros(n, 3, size, size), torch.zeros(n, dtype=torch.long)) for _ in range(batches)]


def syncs_of(guard, fn):
    guard.reset()
    fn()
    return len(guard.syncs)


def test_classifier_evaluation_syncs_once_per_pass_not_per_batch(device_guard):
    from utils.accuracy import evaluate_classifier
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).to(META)
    one = syncs_of(device_guard, lambda: evaluate_classifier(model, meta_loader(1), META))
    three = syncs_of(device_guard, lambda: evaluate_classifier(model, meta_loader(3), META))
    assert one == three <= 1, device_guard.syncs


def test_knn_evaluation_syncs_once_per_pass_not_per_batch(device_guard):
    from utils.knn import extract_features, knn_classify
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8)).to(META)

    def knn(batches):
        f, y = extract_features(model, meta_loader(batches), META)
        knn_classify(f, y, f, y, num_classes=10, k=3, chunk=4)       # one chunk per batch

    one = syncs_of(device_guard, lambda: knn(1))
    three = syncs_of(device_guard, lambda: knn(3))
    assert one == three <= 1, device_guard.syncs


# ---------------------------------------------------------------- fp32 losses under autocast
def fp32_vs_bf16(loss_fn, *inputs):
    """(loss, grads) of loss_fn(*inputs) in fp32 and under CPU bf16 autocast; max relative difference."""
    results = []
    for amp in (False, True):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves if t.grad is not None]))
    (l32, g32), (l16, g16) = results
    assert len(g32) == len(g16) > 0
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()  # noqa: E731
    return max([rel(l16, l32)] + [rel(a, b) for a, b in zip(g16, g32)])


def normalized(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_aps_loss_is_fp32_under_autocast():
    from models.aps import contrastive_loss
    assert fp32_vs_bf16(lambda p, z: contrastive_loss(p, z, 0.1)[0], torch.randn(16, 8), torch.randn(16, 8)) <= 1e-6


def test_moco_loss_with_minis_and_scalemix_is_fp32_under_autocast():
    from models.moco import MoCo, moco_inputs, shuffle_permutation

    class Fp32Encoder(nn.Module):
        """Features made outside autocast: only the loss sees it."""
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 8)

        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                return self.fc(x.float().mean(dim=(2, 3)))

    def loss_of(query, query_mix, keys, minis):
        torch.manual_seed(0)
        moco = MoCo(Fp32Encoder(), dim=8, queue_size=64, temperature=0.2)
        views = {"query": query, "query_mix": query_mix, "keys": keys, "mini_queries": minis}
        rng = BatchRandom("cpu", 0, 1).reseed(4)
        q, k, m = moco_inputs(views, rng)
        return moco(q, k, m, perm=shuffle_permutation(k, rng))[0]

    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g),
              torch.randn(8, 2, 3, 8, 8, generator=g), torch.randn(8, 2, 3, 4, 4, generator=g))
    assert fp32_vs_bf16(loss_of, *inputs) <= 1e-6


@pytest.mark.parametrize("kind", ["mixup", "smoothing"])
def test_classification_loss_is_fp32_under_autocast(kind):
    from timm.loss import SoftTargetCrossEntropy
    from methods.classify import classification_loss
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(2)) * 3
    if kind == "mixup":
        target = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(3)), dim=1)
        criterion = SoftTargetCrossEntropy()
    else:
        target = torch.arange(8) % 10
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert fp32_vs_bf16(lambda z, t: classification_loss(criterion, z, t), logits, target) <= 1e-6


# ---------------------------------------------------------------- compile, JPEG ordering, --deterministic
def test_the_views_compile_in_the_mode_the_user_chose(monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None, mode=None: modes.append(mode) or fn)
    batched.batched_pipeline(RECIPES["aps"]()).compile("max-autotune")
    batched.batched_pipeline(RECIPES["lincls"]()).compile("default")
    assert modes == ["max-autotune"] * 2 + [None] * 2              # _apply_batch and _finish of each view


def test_moco_forward_draws_nothing_random_when_given_its_permutation(monkeypatch):
    from models.moco import build_moco, shuffle_permutation
    module = build_moco("resnet18", cifar_stem=True, hidden_dim=32, dim=8, queue_size=16)
    keys = torch.zeros(1, 4, 3, 16, 16)
    perm = shuffle_permutation(keys, BatchRandom("cpu", 0, 1).reseed(0))
    drawn, real = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: drawn.append(a) or real(*a, **k))
    module(torch.zeros(4, 3, 16, 16), keys, perm=perm)             # (what torch.compile would have to trace)
    monkeypatch.undo()
    assert drawn == [] and sorted(perm.tolist()) == [0, 1, 2, 3]


def test_gpu_jpeg_decoding_waits_for_the_stream_once_per_batch(monkeypatch, tmp_path, make_folder):
    import data.device_loaders as dl
    from torchvision.datasets import ImageFolder
    calls = []

    class Stream:
        def synchronize(self):
            calls.append("sync")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    dl.order_decoder(torch.device("cuda", 0))
    dl.order_decoder(torch.device("cpu"))
    assert calls == ["sync"]                                     # a stream sync on CUDA only

    make_folder(tmp_path, classes=2, per_class=4)
    ordered = []
    monkeypatch.setattr(dl, "order_decoder", lambda device: ordered.append(device))
    loader = dl.FolderDeviceLoader(ImageFolder(str(tmp_path / "train")), 4, 0, torch.device("cpu"),
                                   batched.batched_pipeline(RECIPES["lincls"]()), num_workers=0, rank=0, world=1,
                                   worker_decode=False)              # JPEG bytes reach decode(), as on a GPU
    assert len(list(loader)) == 2 and ordered == [torch.device("cpu")] * 2


def test_deterministic_sets_reproducible_kernels_and_every_script_takes_it(monkeypatch):
    import importlib
    from utils.runtime import configure_device
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    try:
        configure_device(torch.device("cuda", 0), deterministic=True)
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()         # strict: an op without one stops
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        for kernel in ("flash", "mem_efficient", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(True)
    for script in ("main_pretrain", "main_finetune", "main_moco", "main_lincls"):
        parser = importlib.import_module(script).get_args_parser()
        assert parser.parse_args(["--deterministic"]).deterministic is True
        assert parser.parse_args([]).deterministic is False


# ---------------------------------------------------------------- the multi-process step
def test_the_guard_sees_torch_syncbatchnorms_host_sync_under_two_processes(device_guard):
    """What the multi-process tests below can catch: nn.SyncBatchNorm's function drops the empty ranks' statistics
    by boolean-mask indexing, a host sync in every BN call (why we synchronise with DistBatchNorm instead)."""
    from torch.nn.modules._functions import SyncBatchNorm
    from device_guard import simulated_world
    x = torch.zeros(0, 8, 2, 2, device=META)      # (an empty rank's input: torch has no meta kernel for the stats)
    with simulated_world(2) as group:
        device_guard.reset()
        with pytest.raises(NotImplementedError):  # (nor for gathering them, after the mask: where we stop)
            SyncBatchNorm.apply(x, torch.ones(8, device=META), torch.zeros(8, device=META),
                                torch.zeros(8, device=META), torch.ones(8, device=META), 1e-5, 0.1, group, 2)
    assert any("boolean-mask indexing" in s for s in device_guard.syncs), device_guard.syncs


def test_two_process_steps_make_no_host_sync_with_synchronised_batch_norms(device_guard, tiny_aps):
    """APS with its heads' BN synchronised, MoCo with AsymBN and shuffle-BN over the ranks, the probe's --head-bn:
    each step as rank 0 of 2 makes as many host syncs as with one process, none."""
    from methods.aps import APSPretraining
    from methods.classify import LinearProbing
    from methods.moco import MoCoPretraining
    from models.linear import LinearProbe
    from models.moco import build_moco, synchronise_key_projector
    from models.norm import DistBatchNorm, convert_sync_batchnorm
    from models.resnet import create_resnet
    from device_guard import simulated_world
    with simulated_world(2):
        aps = convert_sync_batchnorm(tiny_aps(), META).to(META)
        moco = build_moco("resnet18", cifar_stem=True, hidden_dim=32, dim=8, queue_size=16, device=META)
        synchronise_key_projector(moco, META, 2)
        probe = LinearProbe(create_resnet("resnet18", cifar_stem=True), nn.Linear(512, 10), head_bn=True)
        probe.head = convert_sync_batchnorm(probe.head, META)
        probe = probe.to(META)
        assert sum(isinstance(m, DistBatchNorm) for m in [*aps.modules(), *moco.modules(), *probe.modules()]) >= 4
        views = {name: batched.batched_pipeline(RECIPES[name]())(images(device=META),
                                                                 BatchRandom("cpu", 0, 1).reseed(0))
                 for name in ("aps", "moco-all-switches", "lincls")}
        steps = [(APSPretraining(aps, aps, grid=4, ratio=0.25, steps_per_batch=2, power=2.0, lr=1e-3,
                                 warmup_epochs=1, epochs=2), (views["aps"], None), aps.parameters()),
                 (MoCoPretraining(moco, moco, lr=0.1, epochs=1), (views["moco-all-switches"], None),
                  moco.encoder_q.parameters()),
                 (LinearProbing(probe, probe, nn.CrossEntropyLoss(), lambda e: 0.1, {}, META, None,
                                guard=types.SimpleNamespace(snapshot=lambda: None)),
                  (views["lincls"], torch.arange(4, device=META)), probe.head.parameters())]
        for method, batch, params in steps:
            device_guard.reset()
            step_through(method, batch, BatchRandom(META, 0, 1).reseed(0, 0, 0, 2), torch.optim.SGD(params, lr=0.1))
            no_trouble(device_guard)


def test_erasing_by_channel_or_constant_moves_a_value_per_channel_not_a_full_size_tensor(monkeypatch):
    """--remode rand|const: the parameters that go to the device hold [N, 3, 1, 1] values (broadcast over the box
    there); the erased pixels are those values (rand) or zero (const)."""
    from augment.recipes import finetune_view
    from data.datasets import get_preset
    for mode in ("rand", "const"):
        view = batched.batched_pipeline(finetune_view(get_preset("cifar10"), 16, randaugment=None, erase_p=1.0,
                                                      erase_mode=mode))
        moved = []
        real = batched.tree_to_device
        monkeypatch.setattr(batched, "tree_to_device", lambda tree, d: moved.append(tree) or real(tree, d))
        x = view(images(), BatchRandom("cpu", 0, 1).reseed(0))
        values = moved[-1]["erase_values"]
        assert values.shape == (4, 3, 1, 1) and values.numel() == 12
        if mode == "const":
            assert torch.count_nonzero(values) == 0
        monkeypatch.setattr(batched, "tree_to_device", real)
        assert x.shape == (4, 3, 16, 16)


def test_cached_features_move_to_the_device_once_without_a_pinned_copy(monkeypatch):
    """The probe's cached features go to the GPU once, by a plain copy: pinning them first would keep a
    page-locked copy of the whole set in torch's host allocator. (No GPU here: a move to 'cuda' is recorded.)"""
    from torch.utils.data import TensorDataset
    pinned, moved = [], []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(tuple(self.shape)) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(tuple(self.shape)) or self
                        if "cuda" in str(a[:1] or k.get("device")) else real_to(self, *a, **k))
    TensorLoader(TensorDataset(torch.randn(8, 5), torch.arange(8)), 4, seed=0, device=torch.device("cuda"),
                 rank=0, world=1)
    assert moved == [(8, 5), (8,)] and pinned == []
