"""The APS Vision Transformer (docs/REFERENCE.md#aps-model), a timm VisionTransformer with a forward on kept patches.

Layout: conv patch embedding, learned positional embedding for the L patches only (the cls token
gets none: timm's `no_embed_class=True`), pre-norm blocks with qkv without bias, LayerNorm eps 1e-5,
no drop path by default, a final LayerNorm; the feature is the cls output.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

from utils.errors import UserError
from utils.flags import count

ARCHS = {
    "vit-tiny": dict(embed_dim=192, num_heads=3),
    "vit-small": dict(embed_dim=384, num_heads=6),
    "vit-base": dict(embed_dim=768, num_heads=12),
}


class APSViT(VisionTransformer):
    """forward(x) -> cls feature [B, D]; forward_kept(x, idx) runs the blocks on cls + the kept patches."""

    def __init__(self, norm_eps: float = 1e-5, final_norm_eps: float = None, **kwargs):
        """norm_eps: the blocks' LayerNorm epsilon (the reference: 1e-5); final_norm_eps: the final norm's (default the
        same). Other values only to reproduce a file built otherwise (a module tree records them)."""
        cfg = dict(depth=12, mlp_ratio=4.0, qkv_bias=False, class_token=True, no_embed_class=True,
                   global_pool="token", num_classes=0, norm_layer=partial(nn.LayerNorm, eps=norm_eps),
                   drop_path_rate=0.0, init_values=None)
        cfg.update(kwargs)
        super().__init__(**cfg)
        self.norm.eps = norm_eps if final_norm_eps is None else final_norm_eps
        trunc_normal_(self.cls_token, std=0.02)  # timm uses std 1e-6; the reference uses 0.02
        self.grid = self.patch_embed.grid_size[0]
        self.patch = self.patch_embed.patch_size[0]

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        """timm's forward (features, token pooling, head); the last block runs for the cls token only, the one
        output token pooling reads (cls_block). Other pooling, masks or checkpointing: timm's own forward."""
        if (attn_mask is not None or is_causal or self.global_pool != "token" or self.attn_pool is not None
                or self.grad_checkpointing):
            causal = {"is_causal": True} if is_causal else {}         # (timm before 1.0.23 has no is_causal)
            return super().forward(x, attn_mask=attn_mask, **causal)
        h = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))    # [B, 1+L, D]
        h = cls_block(self.blocks[-1], self.blocks[:-1](h))                          # [B, 1, D]
        return self.forward_head(self.norm(h))

    def embed_kept(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Patch + positional embedding of the kept cells only (equal to embedding all, then gathering)."""
        B, C, H, W = x.shape                                              # x: [B, C, H, W]
        P, G, D = self.patch, self.grid, self.embed_dim
        if H != G * P or W != G * P:
            raise ValueError(f"expected {G * P}x{G * P} images, got {H}x{W}")
        patches = x.reshape(B, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5)   # [B, G, G, C, P, P]
        patches = patches.reshape(B, G * G, C * P * P)                    # [B, L, C*P*P]
        kept = patches.gather(1, idx[..., None].expand(-1, -1, C * P * P))  # [B, n, C*P*P]
        proj = self.patch_embed.proj
        tokens = F.linear(kept, proj.weight.flatten(1), proj.bias)         # [B, n, D]
        pos = self.pos_embed.expand(B, -1, -1).gather(1, idx[..., None].expand(-1, -1, D))  # [B, n, D]
        return self.patch_embed.norm(tokens) + pos

    def forward_kept(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """cls feature computed from cls + the patches at flat indices idx: [B, n] (in that order). The last
        block runs for the cls token only (cls_block): nothing reads its other outputs."""
        tokens = self.embed_kept(x, idx)                                  # [B, n, D]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)              # [B, 1, D]
        h = self.norm_pre(self.pos_drop(torch.cat([cls, tokens], dim=1)))  # [B, 1+n, D]
        h = cls_block(self.blocks[-1], self.blocks[:-1](h))              # [B, 1, D]
        return self.norm(h)[:, 0]                                         # [B, D]


def attn_width(attn) -> int:
    """The width of an attention's queries (timm's attn_dim from 1.0.23 on; before it, a third of the qkv
    projection's outputs)."""
    return getattr(attn, "attn_dim", None) or attn.qkv.out_features // 3


def cls_block(block, h: torch.Tensor) -> torch.Tensor:
    """block(h)[:, :1] for a timm pre-norm Block, computed for the first token only: its query attends to
    every token's key and value, then the projection, the residuals and the MLP run on that one token
    (in the last block, 1/(1+n) of the work after the key/value projection)."""
    attn = block.attn
    if getattr(attn, "gate", None) is not None:                           # a layout this shortcut doesn't know
        return block(h)[:, :1]
    B, T, _ = h.shape
    A, heads = attn_width(attn), attn.num_heads
    y = block.norm1(h)
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(y[:, :1], w[:A], None if b is None else b[:A])                       # [B, 1, A]
    kv = F.linear(y, w[A:], None if b is None else b[A:])                             # [B, T, 2A]
    q = attn.q_norm(q.view(B, 1, heads, -1).transpose(1, 2))                          # [B, h, 1, hd]
    k, v = kv.view(B, T, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)               # [B, h, T, hd]
    o = F.scaled_dot_product_attention(q, attn.k_norm(k), v,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, 1, A))))
    x = h[:, :1] + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@torch.no_grad()
def cls_attention(vit: APSViT, x: torch.Tensor) -> torch.Tensor:
    """The last block's attention of the cls query over the patches: [B, heads, G, G] (each head's weights over
    all 1 + L keys sum to 1; the cls key's own share is left out of the map). DINO's picture."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))       # [B, 1+L, D]
    h = vit.blocks[:-1](h)
    attn = vit.blocks[-1].attn
    B, T, _ = h.shape
    A, heads = attn_width(attn), attn.num_heads
    qkv = F.linear(vit.blocks[-1].norm1(h), attn.qkv.weight, attn.qkv.bias)     # [B, T, 3A]
    q, k, _ = qkv.view(B, T, 3, heads, A // heads).permute(2, 0, 3, 1, 4).unbind(0)   # [B, h, T, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # [B, h, 1, T]
    return weights[:, :, 0, 1:].reshape(B, heads, vit.grid, vit.grid)


def check_patch_grid(img_size: int, patch_size: int) -> int:
    """The grid side G = img_size / patch_size; a one-line error naming both flags when it is not whole."""
    if patch_size <= 0 or img_size % patch_size:
        raise UserError(f"--img-size {img_size} is not a multiple of --patch-size {patch_size}; "
                        "use e.g. patch 2 at 32 px or patch 16 at 224 px")
    return img_size // patch_size


def check_vit_flags(arch: str, img_size: int, patch_size: int, embed_dim: int = None, num_heads: int = None):
    """The ViT flags' cross rules, before any work: the image a whole number of patches, the width a whole number
    of heads (arch None: read off a file later, only what was given is checked)."""
    check_patch_grid(img_size, patch_size)
    width = embed_dim or (ARCHS[arch]["embed_dim"] if arch else None)
    heads = num_heads or (ARCHS[arch]["num_heads"] if arch else None)
    if width and heads and width % heads:
        raise UserError(f"--embed-dim {width} is not divisible by --num-heads {heads}; pick a width that is (64 "
                        "channels per head is usual)")


def create_vit(arch: str = "vit-small", img_size: int = 32, patch_size: int = 2, **overrides) -> APSViT:
    """Build an APS ViT by name; `overrides` (depth, embed_dim, num_heads, drop_path_rate, ...) win."""
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    check_patch_grid(img_size, patch_size)
    return APSViT(img_size=img_size, patch_size=patch_size, **{**ARCHS[arch], **overrides})


def param_groups(module: APSViT, weight_decay: float, layer_decay: float = None):
    """Fine-tuning's AdamW groups (docs/REFERENCE.md#fine-tuning): no decay on ndim <= 1 tensors (norms, biases) and on
    pos_embed / cls_token; with layer decay, each group carries timm's `lr_scale` (layer_decay ** (depth + 1 - layer)).
    """
    no_decay = module.no_weight_decay()
    if layer_decay:
        return param_groups_layer_decay(module, weight_decay, no_decay, layer_decay=layer_decay)
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=no_decay)


def add_vit_args(parser, arch: str = "vit-small", arch_help: str = "ViT size (depth 12)"):
    """The ViT model flags shared by main_pretrain.py and main_finetune.py (an argument group)."""
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default=arch, choices=list(ARCHS), help=arch_help)
    g.add_argument("--patch-size", type=count(), default=None, help="patch size (default: 2 at 32 px, 16 at 224 px)")
    g.add_argument("--depth", type=count(), default=None, help="override the number of blocks (default 12)")
    g.add_argument("--embed-dim", type=count(), default=None, help="override the width (default: the arch's)")
    g.add_argument("--num-heads", type=count(), default=None,
                   help="override the attention heads (default: the arch's; 64 channels per head when reading "
                        "a non-standard width from a file)")
    return g


def vit_overrides(args) -> dict:
    """--depth / --embed-dim / --num-heads that were given, as create_vit keyword arguments."""
    return {k: v for k, v in (("depth", args.depth), ("embed_dim", args.embed_dim), ("num_heads", args.num_heads))
            if v is not None}


def _register(arch: str, patch: int, size: int):
    def fn(pretrained=False, **kwargs):
        if pretrained:
            raise ValueError("pretrained weights load through models.load_backbone, not timm")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory adds these
            kwargs.pop(key, None)
        return create_vit(arch, kwargs.pop("img_size", size), kwargs.pop("patch_size", patch), **kwargs)

    fn.__name__ = f"aps_{arch.replace('-', '_')}_patch{patch}_{size}"
    fn.__qualname__ = fn.__name__
    fn.__module__ = __name__
    return register_model(fn)


for _arch in ARCHS:  # aps_vit_{tiny,small,base}_patch2_32 and _patch16_224
    _register(_arch, 2, 32)
    _register(_arch, 16, 224)


VITDET_PREFIX = "backbone.net."
VITDET_PARTS = ("norm1.", "attn.qkv.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.")


def to_vitdet(state: dict, prefix: str = VITDET_PREFIX) -> dict:
    """A timm-layout ViT state dict (ours, or any the reader gives) -> the names detectron2's ViTDet backbone
    (detectron2/modeling/backbone/vit.py, under `backbone.net.`) loads: patch_embed.proj, pos_embed with a
    position for the class token in front (ViTDet drops it and interpolates the rest from this pre-training grid
    to the detector's input, as it does for MAE's files), blocks.<i>.{norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2}; a zero q/k/v bias where the ViT has none (ViTDet's blocks have one). The class token,
    the final norm and any head are not part of that backbone and are left out. Pure function."""
    out = {}
    pos = state["pos_embed"]
    grid = math.isqrt(pos.shape[1])
    if grid * grid == pos.shape[1]:                         # no class position (ours): a zero one in front
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    out[prefix + "pos_embed"] = pos
    for k in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        out[prefix + k] = state[k]
    for k, v in state.items():
        if k.startswith("blocks.") and k.split(".", 2)[2].startswith(VITDET_PARTS):
            out[prefix + k] = v
            if k.endswith("attn.qkv.weight") and k.replace("weight", "bias") not in state:
                out[prefix + k.replace("weight", "bias")] = torch.zeros(v.shape[0], dtype=v.dtype)
    return out
