import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(2)

# the tiny model every test trains: depth 2, width 32 (SPEC layout otherwise)
TINY = ["--arch", "vit-tiny", "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
        "--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim", "32"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end runs (CI runs them too)")
    # torchvision 0.29's decoders still work; their deprecation (for TorchCodec) is noted in the README
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture
def tiny_flags():
    return list(TINY)
