"""Files from outside this repo, as the one reader (models.loading.open_checkpoint) takes them: the public backbones
people compare against, in the layouts their authors publish, and the exported folders and safetensors files that
tools.weights export writes (timm's hub layout).

Layouts (each converter is a pure function: loaded dict -> (backbone state in our keys, head keys left out, a
trained classifier head {head.weight, head.bias} or {}, the model config saved with it or None)):
  torchvision-resnet  a plain torchvision (or timm) ResNet state dict: conv1.*, bn1.*, layer1-4.*, fc.* (fc left out)
  timm-vit-model      {"model": timm ViT keys}: MAE's pretraining (decoder_* and mask_token left out) and
                      fine-tuned files (fc_norm, global average pooling, head kept), DeiT's files
  moco-v3-vit/-resnet {"state_dict": {module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}}:
                      MoCo v3's checkpoints (the base encoder, its projector head.* / fc.* left out)
  dino-vit/-resnet    a DINO training checkpoint {"teacher": {backbone.*, head.*}, "student": ...}: the teacher's
                      backbone (DINO evaluates the teacher); DINO's released backbones are plain timm-vit /
                      torchvision-resnet files
  exported-vit/-resnet a folder in the hub's layout (model.safetensors + config.json, timm's pretrained config) or
                      one .safetensors file, as tools.weights export writes them (our config rides along and wins)
A plain timm ViT state dict (DINO's backbones, timm's own) is models.loading's timm-vit row; its layout (q/k/v
biases, a position for the class token, average pooling) is read off its keys by vit_hints.
"""
import json
import math
import os

from utils.errors import UserError

EXPORTED = "exported_weights"           # the key of a loaded hub folder or safetensors file: {config, state, path}
HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
OURS_KEY = "asym_ssl"                   # config.json / safetensors metadata: {model_config, family, method, ...}
TIMM_NORM_EPS = 1e-6                    # timm's ViTs (and MAE's, MoCo v3's, DINO's) LayerNorm epsilon
MAE_DECODER = ("decoder_", "mask_token")


# ---------------------------------------------------------------- reading files and folders
def read_safetensors(path: str) -> dict:
    """{EXPORTED: {config, state, path}} of a .safetensors file (our config from its metadata when we wrote it)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                     # a truncated or foreign file fails anywhere inside the parser
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); re-export or "
                        "re-download it") from e
    config = {}
    if OURS_KEY in meta:
        try:
            config = {OURS_KEY: json.loads(meta[OURS_KEY])}
        except ValueError as e:
            raise UserError(f"{path}: its {OURS_KEY} metadata is not JSON ({e}); re-export it") from e
    return {EXPORTED: {"config": config, "state": state, "path": path}}


def read_hub_folder(path: str) -> dict:
    """{EXPORTED: {config, state, path}} of a folder in the hub's layout: model.safetensors (or pytorch_model.bin)
    beside config.json (timm's: architecture, model_args, pretrained_cfg)."""
    cfg_path = os.path.join(path, HUB_CONFIG)
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path} is a folder without {HUB_CONFIG}; pass a checkpoint file, or a folder in the hub's "
                        f"layout ({HUB_WEIGHTS} + {HUB_CONFIG}, as `python -m tools.weights export --format hf` "
                        "writes)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path} is not readable JSON ({e}); re-export the folder") from e
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} holds a {type(config).__name__}, not a JSON object; re-export the folder")
    weights = os.path.join(path, HUB_WEIGHTS)
    if os.path.isfile(weights):
        state = read_safetensors(weights)[EXPORTED]["state"]
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        from utils.checkpoint import load_file
        state = load_file(os.path.join(path, "pytorch_model.bin"), "weights")
    else:
        raise UserError(f"{path} has {HUB_CONFIG} but no {HUB_WEIGHTS} (or pytorch_model.bin); download the weights "
                        "too")
    return {EXPORTED: {"config": config, "state": state, "path": path}}


# ---------------------------------------------------------------- layouts
def exported_state(c):
    return c[EXPORTED].get("state") if isinstance(c.get(EXPORTED), dict) else None


def plain(c):
    """A plain state dict (no wrapper of ours or of a known layout)."""
    return None if EXPORTED in c or any(isinstance(v, dict) for v in c.values()) else c


def without(state: dict, prefixes: tuple):
    """(state without the keys under prefixes, those keys sorted)."""
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    return kept, sorted(k for k in state if k.startswith(prefixes))


def under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def torchvision_resnet(state: dict, where: str = ""):
    trunk, dropped = without(state, ("fc.",))
    return trunk, [where + k for k in dropped], {}, None


def timm_vit_model(c):
    """MAE / DeiT: {"model": timm keys}; the decoder left out, a trained head kept."""
    state, dropped = without(c["model"], MAE_DECODER)
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    weight = head.get("head.weight")
    trained = head if weight is not None and weight.dim() == 2 else {}
    return state, dropped + sorted(head), trained, None


def moco_v3_vit(c):
    state, dropped = without(under(c["state_dict"], "module.base_encoder."), ("head.",))
    others = sorted(k for k in c["state_dict"] if not k.startswith("module.base_encoder."))
    return state, ["module.base_encoder." + k for k in dropped] + others, {}, None


def moco_v3_resnet(c):
    trunk, dropped, _, _ = torchvision_resnet(under(c["state_dict"], "module.base_encoder."), "module.base_encoder.")
    others = sorted(k for k in c["state_dict"] if not k.startswith("module.base_encoder."))
    return trunk, dropped + others, {}, None


def dino_teacher(c):
    teacher = {k.removeprefix("module."): v for k, v in c["teacher"].items()}
    backbone = under(teacher, "backbone.")
    if "pos_embed" in backbone:                              # a ViT: DINO's backbone has an empty head (Identity)
        backbone, _ = without(backbone, ("head.",))
    else:
        backbone, _, _, _ = torchvision_resnet(backbone)
    return backbone, sorted("teacher." + k for k in teacher if not k.startswith("backbone.")), {}, None


def exported(c):
    """A folder or file tools.weights export wrote (or any hub-layout timm/torchvision model): the head kept
    when it was trained, our config when we wrote it."""
    e = c[EXPORTED]
    state = dict(e["state"])
    ours = e["config"].get(OURS_KEY) or {}
    head_keys = ("fc.",) if "conv1.weight" in state else ("head.",)
    head = {k: v for k, v in state.items() if k.startswith(head_keys)}
    state, dropped = without(state, head_keys)
    if "conv1.weight" in state:
        return state, dropped, {}, ours.get("model_config")
    return state, dropped, head, ours.get("model_config") or None


def exported_hints(c) -> dict:
    """create_vit arguments of a hub folder's config.json written by someone else (timm's model_args: the head
    count, which a state dict does not hold)."""
    args = (c[EXPORTED].get("config") or {}).get("model_args") or {}
    return {k: args[k] for k in ("num_heads",) if isinstance(args.get(k), int)}


def moco_v3_hints(c) -> dict:
    """MoCo v3's ViT-Small has 12 heads of 32 channels (its vits.py), not timm's 6 of 64."""
    width = c["state_dict"].get("module.base_encoder.cls_token")
    return {"num_heads": 12} if width is not None and width.shape[-1] == 384 else {}


def vit_hints(state: dict) -> dict:
    """What a timm-layout ViT state dict says of its layout beyond its sizes, as create_vit arguments: q/k/v biases,
    a position for the class token (no_embed_class False), average pooling with fc_norm (MAE's fine-tuned files),
    and timm's norm epsilon (1e-6) for a file that is not of our layout (ours: no q/k/v bias, no class position,
    1e-5 as the APS reference). A plain state dict does not record its epsilon; this is the convention of each."""
    hints = {}
    if "blocks.0.attn.qkv.bias" in state:
        hints["qkv_bias"] = True
    n = state["pos_embed"].shape[1] if "pos_embed" in state else 0
    if n and math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1:
        hints["no_embed_class"] = False
    if "fc_norm.weight" in state and "norm.weight" not in state:
        hints["global_pool"] = "avg"
    if hints:
        hints["norm_eps"] = TIMM_NORM_EPS
    return hints
