"""Backbones from checkpoints: format detection, pure state-dict conversion, strict checks.

Formats (detected from the keys, see FORMATS):
  ours-aps      a main_pretrain.py checkpoint: {"model": {encoder.*, projector.*, predictor.*}, "model_config", ...}
  reference-aps the APS authors' pretraining file (docs/REFERENCE.md#aps-checkpoint): base_encoder.* + predictor.*,
                pos_embedding (L, 1, D)
                (a state dict, or a whole pickled ViTEncoderPredHead / ViTEncoderProjHead read by models.pickled)
  reference-aps-classifier  the APS authors' fine-tuned file: a whole pickled module.model.Vit (cls_token,
                pos_embedding, patchify, transformer.<i>, layer_norm, fc = Linear(D, classes)), read by models.pickled
  timm-vit      a plain ViT state dict with timm keys (cls_token, pos_embed, patch_embed.proj.*, blocks.*, norm.*)
  ours-moco     a main_moco.py checkpoint: {"model": {encoder_q.*, encoder_k.*, queue, queue_ptr}, ...}
  reference-moco the Asym-Siam authors' file (docs/REFERENCE.md#moco-checkpoint): {"arch", "state_dict":
                {module.encoder_q.*, ...}}
ViT formats give an APS ViT (cls feature); MoCo formats give a torchvision ResNet with fc = Identity.
Only `torch.load(weights_only=True)` is ever used (whole-module pickles through models.pickled's allowlist of
inert stand-ins): nothing in a file can run code.
"""
import math
import os
import re

from models.pickled import read_module_tree
from models.registry import is_registry_name, resolve
from models.resnet import create_resnet
from models.vit import ARCHS, create_vit
from utils.checkpoint import PickledObjects, load_file, load_strict
from utils.errors import UserError
from utils.log import get_logger

REFERENCE_BLOCK_PARTS = ("norm1.", "attn.qkv.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.")
TREE = "module_tree"   # the key of a file read by models.pickled: {module_tree: class, state, num_heads}


def split_prefix(state: dict, prefix: str):
    """(entries under prefix with it removed, the other entries)."""
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return inside, outside


def convert_reference_vit(state: dict, where: str = "reference APS", prefix: str = ""):
    """The reference's Vit (docs/REFERENCE.md#aps-checkpoint without the base_encoder. prefix, or a fine-tuned
    module.model.Vit) -> (timm ViT state dict, its head keys fc.* as they were). cls_token, pos_embedding (L, 1, D) ->
    (1, L, D), patchify, transformer.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, layer_norm. Pure
    function."""
    backbone, head, unknown = {}, {}, []
    for name, value in state.items():
        m = re.fullmatch(r"transformer\.(\d+)\.(.+)", name)
        if name == "cls_token":
            backbone["cls_token"] = value
        elif name == "pos_embedding":
            if value.dim() != 3 or value.shape[1] != 1:
                raise UserError(f"{where} pos_embedding has shape {tuple(value.shape)}, expected (L, 1, D); "
                                "the file is not an APS checkpoint")
            backbone["pos_embed"] = value.permute(1, 0, 2).contiguous()  # (L, 1, D) -> (1, L, D)
        elif name.startswith("patchify."):
            backbone["patch_embed.proj." + name[len("patchify."):]] = value
        elif name.startswith("layer_norm."):
            backbone["norm." + name[len("layer_norm."):]] = value
        elif name.startswith("fc."):
            head[name] = value
        elif m and m.group(2).startswith(REFERENCE_BLOCK_PARTS):
            backbone[f"blocks.{m.group(1)}.{m.group(2)}"] = value
        else:
            unknown.append(prefix + name)
    if unknown:
        raise UserError(f"unexpected keys in a {where} checkpoint: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}; the file is not an APS checkpoint")
    return backbone, head


def convert_reference_aps(state: dict):
    """Reference APS pretraining state dict (docs/REFERENCE.md#aps-checkpoint) -> (timm ViT state dict, dropped head
    keys). Pure function."""
    encoder = {k[len("base_encoder."):]: v for k, v in state.items() if k.startswith("base_encoder.")}
    others = [k for k in state if not k.startswith(("base_encoder.", "predictor."))]
    if others:
        raise UserError(f"unexpected keys in a reference APS checkpoint: {', '.join(others[:5])}"
                        f"{' ...' if len(others) > 5 else ''}; the file is not an APS pretraining checkpoint")
    backbone, head = convert_reference_vit(encoder, prefix="base_encoder.")
    dropped = sorted(["base_encoder." + k for k in head] + [k for k in state if k.startswith("predictor.")])
    return backbone, dropped


def convert_reference_classifier(state: dict):
    """A fine-tuned module.model.Vit's state -> our classifier's state dict (head.* from fc.*). Pure function."""
    backbone, head = convert_reference_vit(state, "reference fine-tuned APS")
    if set(head) != {"fc.weight", "fc.bias"}:
        raise UserError(f"a reference fine-tuned APS ViT has fc.weight and fc.bias, not {', '.join(sorted(head))}")
    return {**backbone, "head.weight": head["fc.weight"], "head.bias": head["fc.bias"]}


def infer_vit_config(state: dict, known: dict = None) -> dict:
    """create_vit kwargs read off a timm ViT state dict's shapes; `known` (saved config) wins."""
    if known:
        return dict(known)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise UserError(f"not a ViT state dict: no {key}; pass a checkpoint of main_pretrain.py or an APS file")
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    arch = next((a for a, c in ARCHS.items() if c["embed_dim"] == dim), None)
    cfg = dict(arch=arch, img_size=grid * patch, patch_size=patch, depth=depth, mlp_ratio=mlp_ratio)
    if arch is None:  # a non-standard width: heads as in the standard sizes (64 per head) unless told
        cfg.update(embed_dim=dim, num_heads=max(1, dim // 64))
    return cfg


def _ours_aps(ckpt):
    backbone, rest = split_prefix(ckpt["model"], "encoder.")
    return backbone, sorted(rest), ckpt.get("model_config")


def _ours_vit(ckpt):
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    return state, sorted(k for k in ckpt["model"] if k.startswith("head.")), ckpt.get("model_config")


def _reference_aps(ckpt):
    backbone, dropped = convert_reference_aps(keys_of(ckpt))
    return backbone, dropped, None


def _reference_classifier(ckpt):
    backbone, head = convert_reference_vit(ckpt["state"], "reference fine-tuned APS")
    return backbone, sorted(head), None


def keys_of(ckpt: dict) -> dict:
    """The state dict of a loaded file: a module tree's (models.pickled; the reference's pretraining projector
    head, ViTEncoderProjHead, under its prefix base_encoder., docs/REFERENCE.md#aps-checkpoint), else the file's own
    keys."""
    if TREE not in ckpt:
        return ckpt
    if ckpt[TREE].endswith(".ViTEncoderProjHead"):
        return {"base_encoder." + k: v for k, v in ckpt["state"].items()}
    return ckpt["state"]


def _timm_vit(ckpt):
    return ckpt, [], None


# (name, detector over the loaded object, converter -> (backbone state, dropped keys, saved config or None))
def _ours_moco(ckpt):
    return _resnet_trunk(ckpt["model"], "encoder_q.")


def _reference_moco(ckpt):
    return _resnet_trunk(ckpt["state_dict"], "module.encoder_q.")


def _resnet_trunk(state, prefix):
    """encoder_q without its fc (the projector): (torchvision ResNet state, dropped keys, None)."""
    inside, _ = split_prefix(state, prefix)
    trunk = {k: v for k, v in inside.items() if not k.startswith("fc.")}
    return trunk, sorted(prefix + k for k in inside if k.startswith("fc.")), None


RESNET_LAYOUTS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
                  (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
                  (True, (3, 8, 36, 3)): "resnet152"}


def infer_resnet_config(state: dict, source: str) -> dict:
    """arch and stem read off a torchvision ResNet state dict (block counts, bottlenecks, conv1 kernel)."""
    if "conv1.weight" not in state:
        raise UserError(f"{source}: no conv1.weight in the encoder; not a ResNet MoCo checkpoint")
    counts = tuple(1 + max([int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")] or [-1])
                   for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = RESNET_LAYOUTS.get((bottleneck, counts))
    if arch is None:
        raise UserError(f"{source}: a ResNet with blocks {counts} is not a torchvision resnet18/34/50/101/152")
    return dict(arch=arch, cifar_stem=state["conv1.weight"].shape[-1] == 3)


FORMATS = (
    ("reference-aps-classifier", lambda c: c.get(TREE) == "module.model.Vit" and "fc.weight" in c["state"],
     _reference_classifier),
    ("ours-aps", lambda c: isinstance(c.get("model"), dict) and any(k.startswith("encoder.") for k in c["model"]),
     _ours_aps),
    ("ours-vit", lambda c: isinstance(c.get("model"), dict) and "pos_embed" in c["model"], _ours_vit),
    ("reference-aps", lambda c: any(isinstance(k, str) and k.startswith("base_encoder.") for k in keys_of(c)),
     _reference_aps),
    ("timm-vit", lambda c: "pos_embed" in c and "patch_embed.proj.weight" in c, _timm_vit),
    ("ours-moco", lambda c: isinstance(c.get("model"), dict) and any(k.startswith("encoder_q.") for k in c["model"]),
     _ours_moco),
    ("reference-moco", lambda c: isinstance(c.get("state_dict"), dict) and any(
        k.startswith("module.encoder_q.") for k in c["state_dict"]), _reference_moco),
)


def detect_format(ckpt: dict, source: str = "checkpoint") -> str:
    for name, detect, _ in FORMATS:
        if detect(ckpt):
            return name
    keys = ", ".join(list(map(str, ckpt))[:4])
    if TREE in ckpt:
        keys = f"a pickled {ckpt[TREE]} with " + ", ".join(list(ckpt["state"])[:4])
    raise UserError(f"{source} is not a checkpoint format we know (first keys: {keys}); pass a main_pretrain.py "
                    "checkpoint or a reference APS pretraining file")


def open_weights(source):
    """(name, loaded dict) of a path, a registry name (downloaded and verified first, see models.registry) or an
    already loaded dict. Loading is torch.load(weights_only=True) only: a whole pickled module (the reference's
    fine-tuned files) is read by models.pickled, which imports and calls nothing the file names."""
    if not isinstance(source, str):
        return "checkpoint", source
    if not os.path.exists(source) and not is_registry_name(source):
        raise UserError(f"weights {source} does not exist and is not a registry name; check the path, or see "
                        "`python -m tools.weights list`")
    path = resolve(source)
    try:
        return source, load_file(path, "weights")
    except PickledObjects:
        return source, read_module_tree(path, "weights")


def tree_hints(ckpt: dict, name: str) -> dict:
    """What a module tree recorded that a state dict does not hold, as create_vit arguments: num_heads, and the
    norms' epsilons where they differ from the reference's 1e-5 (the blocks' must agree with one another)."""
    if TREE not in ckpt:
        return {}
    hints = {"num_heads": ckpt["num_heads"]} if ckpt.get("num_heads") else {}
    eps = {k.removeprefix("base_encoder."): v for k, v in ckpt.get("eps", {}).items()}
    blocks = {v for k, v in eps.items() if re.fullmatch(r"transformer\.\d+\.norm[12]", k)}
    if len(blocks) > 1:
        raise UserError(f"{name}: its blocks' norms use different epsilons ({sorted(blocks)}); not an APS ViT")
    if blocks and blocks != {1e-5}:
        hints["norm_eps"] = blocks.pop()
    if eps.get("layer_norm", 1e-5) != hints.get("norm_eps", 1e-5):
        hints["final_norm_eps"] = eps["layer_norm"]
    return hints


def checked_vit_config(name: str, state: dict, saved: dict = None, arch: str = None, patch_size: int = None,
                       img_size: int = None, hints: dict = None) -> dict:
    """create_vit config of a timm ViT state dict (or its saved config), checked against the flags given (one line
    naming the flag to fix). hints: what a module tree recorded (tree_hints)."""
    cfg = {k: v for k, v in infer_vit_config(state, saved).items() if k not in ("num_classes", "drop_path_rate")}
    hints = dict(hints or {})
    num_heads = hints.pop("num_heads", None)
    if num_heads and not saved and num_heads != (cfg.get("num_heads") or ARCHS[cfg["arch"]]["num_heads"]):
        cfg["num_heads"] = num_heads
    cfg.update(hints)
    if arch is not None and cfg["arch"] != arch:
        width = cfg.get("embed_dim") or ARCHS[cfg["arch"]]["embed_dim"]
        hint = f"pass --arch {cfg['arch']}" if cfg["arch"] else "it is not a standard size"
        raise UserError(f"{name} holds a ViT of width {width} ({cfg['arch'] or 'custom'}), not {arch}; {hint}")
    for flag, want, have in (("--patch-size", patch_size, cfg["patch_size"]), ("--img-size", img_size, cfg["img_size"])):
        if want is not None and want != have:
            raise UserError(f"{name} was trained with {flag} {have}, not {want}; pass {flag} {have}")
    cfg["arch"] = cfg["arch"] or "vit-small"
    return cfg


def read_backbone(source, arch: str = None, patch_size: int = None, img_size: int = None):
    """(timm ViT state dict, create_vit config, format, dropped keys) of `source`, checked against the flags."""
    name, ckpt = open_weights(source)
    fmt = detect_format(ckpt, name)
    convert = next(c for n, _, c in FORMATS if n == fmt)
    state, dropped, saved = convert(ckpt)
    if fmt in RESNET_FORMATS:
        raise UserError(f"{name} holds a ResNet ({fmt}); this needs a ViT checkpoint (APS)")
    cfg = checked_vit_config(name, state, saved, arch, patch_size, img_size, tree_hints(ckpt, name))
    return state, cfg, fmt, dropped


def load_fine_tuned(source, arch: str = None, patch_size: int = None, img_size: int = None,
                    num_classes: int = None, name: str = None):
    """(classifier, config) of a fine-tuned file, head included: a released one (the reference's pickled
    module.model.Vit, read by models.pickled) or one of our main_finetune.py checkpoints (its live weights).
    Arch, patch, image size and classes are read off the file and checked against the flags given."""
    opened, ckpt = open_weights(source)
    name = name or opened
    fmt = detect_format(ckpt, name)
    if fmt == "reference-aps-classifier":
        state = convert_reference_classifier(ckpt["state"])
        saved = None
    elif fmt == "ours-vit" and "head.weight" in ckpt["model"] and ckpt.get("model_config"):
        state, saved = ckpt["model"], ckpt["model_config"]
    else:
        raise UserError(f"{name} holds {fmt}, not a fine-tuned classifier; pass a fine-tuned file (the reference's "
                        "module.model.Vit) or one of our fine-tuning checkpoints")
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    cfg = checked_vit_config(name, backbone, saved, arch, patch_size, img_size, tree_hints(ckpt, name))
    classes = state["head.weight"].shape[0]
    if num_classes is not None and num_classes != classes:
        raise UserError(f"{name} classifies {classes} classes, the dataset has {num_classes}; pass the --dataset "
                        "it was fine-tuned on")
    cfg["num_classes"] = classes
    model = create_vit(**cfg)
    load_strict(model, state, name)
    return model, cfg


def head_name(key: str) -> str:
    """'module.encoder_q.fc.0.weight' -> 'module.encoder_q.fc', 'predictor.1.bias' -> 'predictor'."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in ("fc", "projector", "predictor", "head"):
            return ".".join(parts[:i + 1])
    return parts[0]


def report_dropped(name: str, fmt: str, dropped):
    if dropped:
        heads = sorted({head_name(k) for k in dropped})
        get_logger().info(f"loaded {name} ({fmt}); dropped {len(dropped)} head keys ({', '.join(heads)})")


def load_backbone(source, arch: str = None, patch_size: int = None, img_size: int = None, **overrides):
    """A backbone from one of FORMATS (a path or an already loaded dict): a ViT whose forward gives the cls
    feature, or for MoCo checkpoints a ResNet whose forward gives the pooled feature.

    arch / patch_size / img_size, when given, must match the file (an error names the right flag).
    `overrides` go to the model constructor (e.g. drop_path_rate, or num_heads for non-standard widths).
    """
    name, ckpt = open_weights(source)
    if detect_format(ckpt, name) in RESNET_FORMATS:
        return load_resnet(ckpt, name, arch)
    state, cfg, fmt, dropped = read_backbone(ckpt, arch, patch_size, img_size)
    model = create_vit(**{**cfg, **overrides})
    load_strict(model, state, name)
    report_dropped(name, fmt, dropped)
    return model


RESNET_FORMATS = ("ours-moco", "reference-moco")


def load_resnet(ckpt: dict, name: str, arch: str = None, num_classes: int = 0):
    """A ResNet from a MoCo checkpoint's query encoder without its projector: a feature extractor (fc =
    Identity), or with num_classes a new fc, the missing keys then being exactly {fc.weight, fc.bias}.
    Returns the model (its `config` attribute says how to build it again)."""
    fmt = detect_format(ckpt, name)
    state, dropped, _ = next(c for n, _, c in FORMATS if n == fmt)(ckpt)
    cfg = infer_resnet_config(state, name)
    if arch is not None and arch != cfg["arch"]:
        raise UserError(f"{name} holds a {cfg['arch']}, not {arch}; pass -a {cfg['arch']}")
    model = create_resnet(cfg["arch"], cfg["cifar_stem"], num_classes=num_classes)
    load_strict(model, state, name, expect_missing={"fc.weight", "fc.bias"} if num_classes else ())
    report_dropped(name, fmt, dropped)
    model.config = cfg
    return model


def load_classifier(source, num_classes: int, arch: str = None, patch_size: int = None, img_size: int = None,
                    **overrides):
    """A ViT with a new Linear(D, num_classes) head on the cls feature, backbone from `source`.

    The missing keys must be exactly the head; anything else missing or unexpected is an error.
    Returns (model, model config).
    """
    name = source if isinstance(source, str) else "checkpoint"
    state, cfg, fmt, dropped = read_backbone(source, arch, patch_size, img_size)
    cfg = {**cfg, **overrides, "num_classes": num_classes}
    model = create_vit(**cfg)
    head = {k for k in model.state_dict() if k.startswith("head.")}
    load_strict(model, state, name, expect_missing=head)
    report_dropped(name, fmt, dropped)
    get_logger().info(f"new head: {', '.join(sorted(head))} ({num_classes} classes)")
    return model, cfg


def build_classifier(weights: str, num_classes: int, arch: str, patch_size: int, img_size: int,
                     drop_path_rate: float = 0.0, **overrides):
    """(ViT classifier, its config): the backbone of `weights` (any ViT format above, a path or a registry name)
    with a new head, or, without weights, one trained from scratch (overrides: depth, embed_dim, num_heads).
    arch None: what the file holds (vit-small from scratch)."""
    if weights:
        extra = {"num_heads": overrides["num_heads"]} if overrides.get("num_heads") else {}
        return load_classifier(weights, num_classes, arch, patch_size, img_size, drop_path_rate=drop_path_rate, **extra)
    cfg = dict(arch=arch or "vit-small", img_size=img_size, patch_size=patch_size, num_classes=num_classes,
               drop_path_rate=drop_path_rate, **overrides)
    return create_vit(**cfg), cfg


CLASSIFIER_FORMATS = ("reference-aps-classifier", "ours-vit")


def describe_weights(source) -> dict:
    """What a file (a path, a registry name or a loaded dict) holds, read as loading would read it (nothing is
    unpickled beyond tensors and the allowlisted module trees): format, arch, patch and image size (ViTs), stem
    (ResNets), classes (classifiers; None otherwise) and the parameter count of what loading builds."""
    name, ckpt = open_weights(source)
    fmt = detect_format(ckpt, name)
    if fmt in RESNET_FORMATS:
        model = load_resnet(ckpt, name)
        return dict(format=fmt, arch=model.config["arch"], cifar_stem=model.config["cifar_stem"], num_classes=None,
                    params=sum(p.numel() for p in model.parameters()))
    state, cfg, _, _ = read_backbone(ckpt)
    classes = None
    if fmt == "reference-aps-classifier":
        classes = ckpt["state"]["fc.weight"].shape[0]
    elif fmt == "ours-vit" and "head.weight" in ckpt["model"]:
        classes = ckpt["model"]["head.weight"].shape[0]
    model = create_vit(**{**cfg, "num_classes": classes or 0})
    custom = "embed_dim" in cfg and cfg["embed_dim"] not in [a["embed_dim"] for a in ARCHS.values()]
    return dict(format=fmt, arch=f"custom (width {cfg['embed_dim']})" if custom else cfg["arch"],
                patch_size=cfg["patch_size"], img_size=cfg["img_size"], depth=cfg.get("depth", 12),
                num_heads=cfg.get("num_heads") or ARCHS[cfg["arch"]]["num_heads"], num_classes=classes,
                params=sum(p.numel() for p in model.parameters()))


def classifier_state(source):
    """(our classifier's state dict, its config) of a fine-tuned file (load_fine_tuned)."""
    model, cfg = load_fine_tuned(source)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}, cfg
