"""On a GPU only (bench.gpu_report runs them; deselected elsewhere): the device path, the sampler and the steps
under torch.cuda's sync debug mode at "error", and the same parameters for a seed on the GPU as on the CPU."""
import pytest
import torch

from augment.batched import batched_pipeline
from augment.recipes import aps_pair, finetune_view, lincls_view, moco_views
from data.datasets import get_preset
from bench.gpu_checks import sync_errors
from utils.rng import BatchRandom

pytestmark = pytest.mark.cuda
PRESET = get_preset("cifar10")
RECIPES = {"aps": lambda: aps_pair(PRESET, 32), "finetune": lambda: finetune_view(PRESET, 32),
           "lincls": lambda: lincls_view(PRESET, 32),
           "moco": lambda: moco_views(PRESET, 32, num_key_views=2, num_minis=2, mini_size=16, asym_aug=True,
                                      scalemix=True)}


def images(device, n=16):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8).to(device)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pipelines_make_no_host_sync_on_cuda(name):
    pipe, x = batched_pipeline(RECIPES[name]()), images("cuda")
    pipe(x, BatchRandom("cpu", 0, 1).reseed(0))                     # first call: pinned buffers, constants
    torch.cuda.synchronize()
    with sync_errors():
        for batch in range(3):
            pipe(x, BatchRandom("cpu", 0, 1).reseed(0, 0, batch))
    torch.cuda.synchronize()


def test_aps_step_makes_no_host_sync_on_cuda(tiny_aps):
    from models.aps import aps_training_steps
    model = tiny_aps().cuda()
    batch = batched_pipeline(aps_pair(PRESET, 16))(images("cuda"), BatchRandom("cpu", 0, 1).reseed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for step in range(2):                                            # the second under the sync check
        with sync_errors():
            for loss, _ in aps_training_steps(model, batch, 4, 0.25, 2, 2.0, BatchRandom("cuda", 0, 1).reseed(step)):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_seed_gives_the_same_boxes_and_views_on_cuda_as_on_the_cpu(name):
    outs = [batched_pipeline(RECIPES[name]())(images(d), BatchRandom("cpu", 0, 1).reseed(4)) for d in ("cpu", "cuda")]
    cpu, gpu = ([o] if torch.is_tensor(o) else [o[k] for k in sorted(o)] for o in outs)
    for a, b in zip(cpu, gpu):
        b = b.cpu()
        if a.dtype in (torch.bool, torch.long) or a.shape[-1] == 4 and a.dim() == 2:   # flips, boxes: exactly
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().mean() < 1e-3
