"""The ViT layout, forward on kept indices, heads and the APS loss against hand-written versions."""
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from models import APS, ARCHS, create_vit
from models.aps import contrastive_loss

TINY = dict(depth=2, embed_dim=32, num_heads=2)


def tiny_vit(**kw):
    torch.manual_seed(0)
    return create_vit("vit-tiny", img_size=16, patch_size=4, **{**TINY, **kw}).eval()


def test_forward_on_kept_indices_equals_hand_built_tokens():
    model = tiny_vit()
    x = torch.randn(3, 3, 16, 16)
    idx = torch.stack([torch.randperm(16)[:5] for _ in range(3)])              # [B, n]
    # by hand: conv patch embedding of the whole image, positions, gather in the sampled order, cls first
    with torch.no_grad():
        full = model.patch_embed.proj(x).flatten(2).transpose(1, 2)              # [B, L, D]
        full = full + model.pos_embed
        kept = torch.stack([full[b, idx[b]] for b in range(3)])                  # [B, n, D]
        h = torch.cat([model.cls_token.expand(3, -1, -1), kept], dim=1)          # cls: no positional embedding
        for blk in model.blocks:
            h = blk(h)
        expected = model.norm(h)[:, 0]
        got = model.forward_kept(x, idx)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_cls_only_last_block_gives_the_full_blocks_output_and_gradients(qkv_bias):
    model = tiny_vit(qkv_bias=qkv_bias).train()
    x = torch.randn(3, 3, 16, 16)
    idx = torch.stack([torch.randperm(16)[:6] for _ in range(3)])
    got = model.forward_kept(x, idx)
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()), allow_unused=True)
    tokens = model.embed_kept(x, idx)                                            # every block on every token
    h = torch.cat([model.cls_token.expand(3, -1, -1), tokens], dim=1)
    expected = model.norm(model.blocks(h))[:, 0]
    ref = torch.autograd.grad(expected.square().sum(), list(model.parameters()), allow_unused=True)
    assert torch.allclose(got, expected, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref):
        if b is None:
            assert a is None, name
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def test_forward_equals_timms_forward_with_drop_path_and_a_head():
    from timm.models.vision_transformer import VisionTransformer
    model = tiny_vit(drop_path_rate=0.2, num_classes=5).train()
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(7)
    got = model(x)                                                              # cls-only last block
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    torch.manual_seed(7)                                                        # the same drop-path draws
    expected = VisionTransformer.forward(model, x)                              # every block on every token
    ref = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    assert got.shape == (4, 5) and torch.allclose(got, expected, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    model.set_grad_checkpointing(True)                                          # falls back to timm's path
    torch.manual_seed(7)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_all_indices_in_order_equal_the_plain_forward():
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    idx = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        assert torch.allclose(model.forward_kept(x, idx), model(x), atol=1e-5)


def test_layout_follows_spec_a3():
    model = create_vit("vit-small", img_size=32, patch_size=2)
    assert model.pos_embed.shape == (1, 256, 384)          # patches only, no slot for cls
    assert model.cls_token.shape == (1, 1, 384)
    assert len(model.blocks) == 12
    blk = model.blocks[0]
    assert blk.attn.qkv.bias is None and blk.attn.num_heads == 6
    assert blk.mlp.fc1.out_features == 4 * 384
    assert isinstance(blk.norm1, nn.LayerNorm) and blk.norm1.eps == 1e-5 and model.norm.eps == 1e-5
    assert isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.ls1, nn.Identity)
    assert model.patch_embed.proj.kernel_size == (2, 2) and model.patch_embed.proj.stride == (2, 2)
    assert 0.015 < model.cls_token.std().item() < 0.025   # trunc normal 0.02, not timm's 1e-6


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", ["patch2_32", "patch16_224"])
def test_registered_with_timm(arch, variant):
    name = f"aps_{arch.replace('-', '_')}_{variant}"
    assert name in timm.list_models("aps_*")
    model = timm.create_model(name, depth=1)  # depth 1 keeps the test fast; widths are the arch's
    assert model.embed_dim == ARCHS[arch]["embed_dim"]
    assert model.blocks[0].attn.num_heads == ARCHS[arch]["num_heads"]
    assert model.patch == (2 if variant == "patch2_32" else 16)


def test_heads_layout():
    model = APS(tiny_vit(), 24, 8, 20)
    for head in (model.projector, model.predictor):
        with_params = [i for i, m in enumerate(head) if any(True for _ in m.parameters())]
        assert with_params == [0, 1, 3, 4, 6]             # 7 is BN(affine=False): buffers only
        assert isinstance(head[7], nn.BatchNorm1d) and not head[7].affine
        assert all(head[i].bias is None for i in (0, 3, 6))
    assert model.projector[0].in_features == 32 and model.projector[6].out_features == 8
    assert model.predictor[0].in_features == 8 and model.predictor[0].out_features == 20


def reference_ctr(p, z, temperature):
    """CE of cosine logits with the diagonal as the positives, in float64 numpy, by hand."""
    p, z = p.double().numpy(), z.double().numpy()
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(p)):
        logits = [float(p[i] @ z[j]) / temperature for j in range(len(z))]
        m = max(logits)
        total += -(logits[i] - m - math.log(sum(math.exp(v - m) for v in logits)))
    return total / len(p)


def test_contrastive_loss_matches_hand_written():
    torch.manual_seed(1)
    p, z = torch.randn(6, 5), torch.randn(6, 5)
    loss, cos = contrastive_loss(p, z, 0.1)
    assert loss.item() == pytest.approx(reference_ctr(p, z, 0.1), rel=1e-5)
    expected_cos = np.mean([float(torch.cosine_similarity(p[i], z[i], dim=0)) for i in range(6)])
    assert cos.item() == pytest.approx(expected_cos, rel=1e-5)


def test_aps_loss_is_symmetric_sum_and_targets_are_stop_gradient():
    torch.manual_seed(2)
    model = APS(tiny_vit(), 24, 8, 20, temperature=0.2).train()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    idx1 = torch.stack([torch.randperm(16)[:4] for _ in range(4)])
    idx2 = torch.stack([torch.randperm(16)[:4] for _ in range(4)])
    loss, stats = model(x1, x2, idx1, idx2)
    with torch.no_grad():
        z1, p1 = model.heads(model.encoder.forward_kept(x1, idx1))   # each view in its own encoder call
        z2, p2 = model.heads(model.encoder.forward_kept(x2, idx2))
    expected = reference_ctr(p1, z2, 0.2) + reference_ctr(p2, z1, 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    missing = [n for n, prm in model.named_parameters() if prm.grad is None or not prm.grad.abs().sum() > 0]
    assert missing == []  # every parameter gets a gradient
    # stop-gradient: the loss through z alone gives no gradient
    z = torch.randn(4, 8, requires_grad=True)
    l, _ = contrastive_loss(torch.randn(4, 8, requires_grad=True), z, 0.1)
    l.backward()
    assert z.grad is None
