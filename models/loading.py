"""Backbones from checkpoints: one reader (open_checkpoint), a table of formats, pure state-dict conversion,
strict checks.

open_checkpoint(source) reads a path, a registry name or a loaded dict once and returns a Checkpoint: its FORMATS
row, its backbone in our keys, the head keys left out, a trained classifier head, the config saved with it. The
loaders (load_backbone, resnet_from, load_classifier, load_fine_tuned, describe_weights) are thin functions of it
and take a Checkpoint as well, so a command reads each file from disk once. Format-specific logic lives in the
FORMATS rows; a file whose keys fit two rows is refused rather than guessed.

A checkpoint this repo writes describes itself (utils.checkpoint.backbone_record: its method, backbone family,
the backbone's key prefix, its heads, its config), and is read from that record by described_format, with no row
here: a new method's checkpoints need nothing in this file. The rows below are for files from outside, and for
our own checkpoints written before they carried the record (2026-12-04), which still load.

Formats (each row names the key prefixes its files must have):
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
  from outside (models/outside.py): torchvision-resnet, timm-vit-model (MAE, DeiT), moco-v3-vit/-resnet,
                dino-vit/-resnet, exported-vit/-resnet (hub folders and .safetensors files); a file from outside has
                its layout (q/k/v biases, a class position, average pooling, timm's epsilon) read off its keys
ViT formats give an APS ViT (cls feature); ResNet formats give a torchvision ResNet with fc = Identity.
Only `torch.load(weights_only=True)` is ever used (whole-module pickles through models.pickled's allowlist of
inert stand-ins): nothing in a file can run code.
"""
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

from models import outside
from models.pickled import read_module_tree
from models.registry import is_registry_name, resolve
from models.resnet import create_resnet
from models.vit import ARCHS, create_vit
from utils.checkpoint import RECORD, PickledObjects, load_file, load_strict
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


def keys_of(ckpt: dict) -> dict:
    """The state dict of a loaded file: a module tree's (models.pickled; the reference's pretraining projector
    head, ViTEncoderProjHead, under its prefix base_encoder., docs/REFERENCE.md#aps-checkpoint), else the file's own
    keys."""
    if TREE not in ckpt:
        return ckpt
    if ckpt[TREE].endswith(".ViTEncoderProjHead"):
        return {"base_encoder." + k: v for k, v in ckpt["state"].items()}
    return ckpt["state"]



def _resnet_trunk(state: dict, prefix: str):
    """encoder_q without its fc (the projector): (torchvision ResNet trunk state, dropped keys, no head, no config)."""
    inside, _ = split_prefix(state, prefix)
    trunk = {k: v for k, v in inside.items() if not k.startswith("fc.")}
    return trunk, sorted(prefix + k for k in inside if k.startswith("fc.")), {}, None


def _ours_aps(ckpt):
    backbone, rest = split_prefix(ckpt["model"], "encoder.")
    return backbone, sorted(rest), {}, ckpt.get("model_config")


def _ours_vit(ckpt):
    head = {k: v for k, v in ckpt["model"].items() if k.startswith("head.")}
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    return state, sorted(head), head, ckpt.get("model_config")


def _reference_aps(ckpt):
    backbone, dropped = convert_reference_aps(keys_of(ckpt))
    return backbone, dropped, {}, None


def _reference_classifier(ckpt):
    backbone, fc = convert_reference_vit(ckpt["state"], "reference fine-tuned APS")
    if set(fc) != {"fc.weight", "fc.bias"}:
        raise UserError(f"a reference fine-tuned APS ViT has fc.weight and fc.bias, not {', '.join(sorted(fc))}")
    return backbone, sorted(fc), {"head.weight": fc["fc.weight"], "head.bias": fc["fc.bias"]}, None


def _tree_state(ckpt, classes: tuple) -> dict:
    """A module tree's state when its class is one of `classes` (models.pickled), else nothing."""
    return ckpt["state"] if ckpt.get(TREE, "").endswith(classes) else {}


@dataclass(frozen=True)
class Format:
    """A checkpoint layout we read. keys(loaded) is the dict its keys sit in ({} or None: not there); a file is of
    this format when that dict has a key starting with each of `needs`; convert(loaded) -> (backbone state in our
    keys, the head keys left out, a trained classifier head as {head.weight, head.bias} or {}, the model config
    saved with it or None). family: 'vit' or 'resnet'; ours: written by this repo's scripts."""
    name: str
    family: str
    keys: Callable[[dict], dict]
    needs: tuple
    convert: Callable[[dict], tuple]
    ours: bool = False
    hints: Optional[Callable[[dict], dict]] = None     # create_vit arguments the file's keys do not hold (heads)

    def fits(self, loaded: dict) -> bool:
        keys = self.keys(loaded)
        return isinstance(keys, dict) and all(any(isinstance(k, str) and k.startswith(p) for k in keys)
                                              for p in self.needs)


def _model(c):
    return c.get("model") if isinstance(c.get("model"), dict) else None


FORMATS = (
    Format("ours-aps", "vit", _model, ("encoder.", "projector.", "predictor."), _ours_aps, ours=True),
    Format("ours-vit", "vit", lambda c: _model(c) if "model_config" in c else None,
           ("pos_embed", "patch_embed.", "blocks."), _ours_vit, ours=True),
    Format("reference-aps", "vit", lambda c: keys_of(c) if TREE not in c or _tree_state(
        c, (".ViTEncoderPredHead", ".ViTEncoderProjHead")) else None, ("base_encoder.",), _reference_aps),
    Format("reference-aps-classifier", "vit", lambda c: _tree_state(c, ("module.model.Vit",)),
           ("fc.weight", "pos_embedding", "transformer."), _reference_classifier),
    Format("timm-vit", "vit", lambda c: None if TREE in c else outside.plain(c),
           ("pos_embed", "patch_embed.proj.weight", "blocks."), lambda c: (c, [], {}, None)),
    # files from outside (models/outside.py)
    Format("timm-vit-model", "vit", lambda c: _model(c) if "model_config" not in c and RECORD not in c else None,
           ("pos_embed", "patch_embed.proj.weight", "blocks."), outside.timm_vit_model),
    Format("torchvision-resnet", "resnet", outside.plain, ("conv1.weight", "bn1.", "layer1.", "layer4."),
           lambda c: outside.torchvision_resnet(c)),
    Format("moco-v3-vit", "vit", lambda c: c.get("state_dict"), ("module.base_encoder.pos_embed",),
           outside.moco_v3_vit, hints=outside.moco_v3_hints),
    Format("moco-v3-resnet", "resnet", lambda c: c.get("state_dict"), ("module.base_encoder.conv1.",),
           outside.moco_v3_resnet),
    Format("dino-vit", "vit", lambda c: c.get("teacher"), ("backbone.pos_embed",), outside.dino_teacher),
    Format("dino-resnet", "resnet", lambda c: c.get("teacher"), ("backbone.conv1.",), outside.dino_teacher),
    Format("exported-vit", "vit", outside.exported_state, ("pos_embed", "patch_embed.proj.weight"), outside.exported,
           hints=outside.exported_hints),
    Format("exported-resnet", "resnet", outside.exported_state, ("conv1.weight", "layer1."), outside.exported),
    Format("ours-moco", "resnet", _model, ("encoder_q.", "encoder_k.", "queue"),
           lambda c: _resnet_trunk(c["model"], "encoder_q."), ours=True),
    Format("reference-moco", "resnet", lambda c: c.get("state_dict"), ("module.encoder_q.",),   # (any MoCo v1/v2)
           lambda c: _resnet_trunk(c["state_dict"], "module.encoder_q.")),
)


def _described(ckpt):
    """A checkpoint that describes itself (utils.checkpoint.backbone_record): the backbone under its prefix, the
    heads it names left out, its classifier kept when it has one, its config."""
    rec, model = ckpt[RECORD], ckpt["model"]
    heads, prefix, classifier = tuple(rec["heads"]), rec["prefix"], rec.get("classifier")
    state = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix) and not k.startswith(heads)}
    dropped = sorted(k for k in model if heads and k.startswith(heads))
    head = {"head." + k[len(classifier):]: v for k, v in model.items() if k.startswith(classifier)} if classifier else {}
    return state, dropped, head, rec.get("config") or None


def described_format(loaded: dict, name: str) -> Optional[Format]:
    """The Format a checkpoint's own record (RECORD) gives, None without one; a record that is not one of ours
    (missing fields, an unknown family) is one line."""
    rec = loaded.get(RECORD) if isinstance(loaded, dict) else None
    if rec is None:
        return None
    ok = (isinstance(rec, dict) and rec.get("family") in ("vit", "resnet") and isinstance(rec.get("prefix"), str)
          and isinstance(rec.get("heads"), list) and all(isinstance(h, str) and h for h in rec["heads"])
          and isinstance(rec.get("classifier"), (str, type(None))) and isinstance(rec.get("config"), (dict, type(None)))
          and isinstance(_model(loaded), dict))
    if not ok:
        raise UserError(f"{name} has a {RECORD} that is not one this code writes (family vit or resnet, a key "
                        "prefix, head prefixes); re-save it with this repo, or drop the record to read it by its keys")
    fmt = str(rec.get("format") or f"ours-{rec.get('method', 'method')}")
    return Format(fmt, rec["family"], _model, (), _described, ours=True)


def format_of(loaded: dict, name: str = "checkpoint") -> Format:
    """The format a checkpoint's own record gives (described_format), else the one FORMATS row `loaded` fits; a
    file that fits none, or several, is refused with one line."""
    described = described_format(loaded, name)
    if described is not None:
        return described
    fits = [f for f in FORMATS if f.fits(loaded)]
    if len(fits) > 1:
        raise UserError(f"{name} fits more than one checkpoint layout ({', '.join(f.name for f in fits)}); rather "
                        "than guess, convert it to one (`python -m tools.weights convert`) or load its state dict")
    if fits:
        return fits[0]
    keys = ", ".join(list(map(str, loaded))[:4])
    if TREE in loaded:
        keys = f"a pickled {loaded[TREE]} with " + ", ".join(list(loaded["state"])[:4])
    raise UserError(f"{name} is not a checkpoint format we know (first keys: {keys}); pass a main_pretrain.py "
                    "checkpoint or a reference APS pretraining file")


def detect_format(loaded: dict, name: str = "checkpoint") -> str:
    return format_of(loaded, name).name


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



def load_weights(source):
    """(name, loaded dict) of a path, a registry name (downloaded and verified first, see models.registry) or an
    already loaded dict. Loading is torch.load(weights_only=True) only: a whole pickled module (the reference's
    fine-tuned files) is read by models.pickled, which imports and calls nothing the file names."""
    if not isinstance(source, str):
        return "checkpoint", source
    if not os.path.exists(source) and not is_registry_name(source):
        raise UserError(f"weights {source} does not exist and is not a registry name; check the path, or see "
                        "`python -m tools.weights list`")
    path = resolve(source)
    if os.path.isdir(path):
        return source, outside.read_hub_folder(path)
    if path.endswith(".safetensors"):
        return source, outside.read_safetensors(path)
    try:
        return source, load_file(path, "weights")
    except PickledObjects:
        return source, read_module_tree(path, "weights")


@dataclass
class Checkpoint:
    """A weights file opened once (open_checkpoint): its format row, its backbone in our keys, the head keys left
    out, its trained classifier head (or {}), the model config saved with it; and the configs to build it."""
    name: str
    format: Format
    loaded: dict
    state: dict
    dropped: list
    head: dict
    saved: Optional[dict]

    @property
    def family(self) -> str:
        return self.format.family

    @property
    def num_classes(self) -> Optional[int]:
        return self.head["head.weight"].shape[0] if self.head else None

    def vit_config(self, arch: str = None, patch_size: int = None, img_size: int = None, given: dict = None) -> dict:
        """create_vit config of its ViT, checked against the flags given (one line naming the flag to fix); given:
        --depth / --embed-dim / --num-heads."""
        if self.family != "vit":
            raise UserError(f"{self.name} holds a ResNet ({self.format.name}); this needs a ViT checkpoint (APS)")
        hints = tree_hints(self.loaded, self.name)
        if not self.format.ours and not self.saved:     # a file from outside: its layout, read off its keys
            known = self.format.hints(self.loaded) if self.format.hints else {}
            hints = {**outside.vit_hints(self.state), **known, **hints}
        return checked_vit_config(self.name, self.state, self.saved, arch, patch_size, img_size, hints, given)

    def resnet_config(self, arch: str = None) -> dict:
        """create_resnet's arch and stem, read off the trunk and checked against -a."""
        if self.family != "resnet":
            raise UserError(f"{self.name} holds a ViT; pass -a {'/'.join(ARCHS)} (or leave -a out)")
        cfg = infer_resnet_config(self.state, self.name)
        if arch is not None and arch != cfg["arch"]:
            raise UserError(f"{self.name} holds a {cfg['arch']}, not {arch}; pass -a {cfg['arch']}")
        return cfg

    def report(self):
        """Log what loading left out (the heads), once per load."""
        if self.dropped:
            heads = sorted({head_name(k) for k in self.dropped})
            get_logger().info(f"loaded {self.name} ({self.format.name}); dropped {len(self.dropped)} head keys "
                              f"({', '.join(heads)})")


def open_checkpoint(source, name: str = None) -> Checkpoint:
    """A Checkpoint of a path, a registry name, a loaded dict or a Checkpoint (returned as it is): read from disk
    once, its format found (exactly one row of FORMATS), its state converted."""
    if isinstance(source, Checkpoint):
        return source
    opened, loaded = load_weights(source)
    name = name or opened
    fmt = format_of(loaded, name)
    state, dropped, head, saved = fmt.convert(loaded)
    return Checkpoint(name, fmt, loaded, state, dropped, head, saved)


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
                       img_size: int = None, hints: dict = None, given: dict = None) -> dict:
    """create_vit config of a timm ViT state dict (or its saved config), checked against the flags given (one line
    naming the flag to fix). hints: what a module tree recorded (tree_hints); given: the --depth / --embed-dim /
    --num-heads passed. Any width, depth and head count is read: a file of a non-standard width is built as the
    nearest layout with its own width, depth and heads (vit_label describes it)."""
    cfg = {k: v for k, v in infer_vit_config(state, saved).items() if k not in ("num_classes", "drop_path_rate")}
    hints, given = dict(hints or {}), {k: v for k, v in (given or {}).items() if v is not None}
    num_heads = hints.pop("num_heads", None)
    if num_heads and not saved and num_heads != (cfg.get("num_heads") or ARCHS[cfg["arch"]]["num_heads"]):
        cfg["num_heads"] = num_heads
    cfg.update(hints)
    width = cfg.get("embed_dim") or ARCHS[cfg["arch"]]["embed_dim"]
    depth = cfg.get("depth", 12)
    recorded_heads = num_heads or (saved or {}).get("num_heads")
    for flag, want, have in (("--embed-dim", given.get("embed_dim"), width), ("--depth", given.get("depth"), depth),
                             ("--num-heads", given.get("num_heads"), recorded_heads)):
        if want is not None and have is not None and want != have:
            raise UserError(f"{name} holds a ViT with {flag} {have}, not {want}; pass {flag} {have} (or leave it out)")
    if given.get("num_heads") and not recorded_heads:           # a state dict does not hold its head count
        if width % given["num_heads"]:
            raise UserError(f"--num-heads {given['num_heads']} does not divide {name}'s width {width}; pass a divisor")
        cfg["num_heads"] = given["num_heads"]
    sized = next((a for a, c in ARCHS.items() if c["embed_dim"] == width), None)   # the standard size of its width
    base = cfg["arch"] or sized                      # the layout it was saved as (or its width's standard size)
    if arch is not None and arch != base and given.get("embed_dim") != width:
        hint = f"pass --arch {base}" if base else f"pass --embed-dim {width} to describe it"
        raise UserError(f"{name} holds a ViT of width {width} ({sized or 'custom'}), not {arch}; {hint}")
    for flag, want, have in (("--patch-size", patch_size, cfg["patch_size"]), ("--img-size", img_size, cfg["img_size"])):
        if want is not None and want != have:
            raise UserError(f"{name} was trained with {flag} {have}, not {want}; pass {flag} {have}")
    cfg["arch"] = cfg["arch"] or arch or "vit-small"     # the layout it is built from; its own sizes override it
    return cfg


def vit_label(cfg: dict) -> str:
    """'vit-small' for a standard size, else 'custom: width W, depth L, heads H' (what a log or report says)."""
    base = ARCHS[cfg["arch"]]
    width, depth = cfg.get("embed_dim", base["embed_dim"]), cfg.get("depth", 12)
    heads = cfg.get("num_heads", base["num_heads"])
    if (width, depth, heads) == (base["embed_dim"], 12, base["num_heads"]):
        return cfg["arch"]
    return f"custom: width {width}, depth {depth}, heads {heads}"


def head_name(key: str) -> str:
    """'module.encoder_q.fc.0.weight' -> 'module.encoder_q.fc', 'predictor.1.bias' -> 'predictor'."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in ("fc", "projector", "predictor", "head"):
            return ".".join(parts[:i + 1])
    return parts[0]


def load_backbone(source, arch: str = None, patch_size: int = None, img_size: int = None, **overrides):
    """A backbone from any checkpoint (a path, a registry name, a loaded dict or a Checkpoint): a ViT whose forward
    gives the cls feature, or for MoCo checkpoints a ResNet whose forward gives the pooled feature.

    arch / patch_size / img_size, when given, must match the file (an error names the right flag).
    `overrides` go to the ViT constructor (e.g. drop_path_rate, or num_heads for non-standard widths).
    """
    ck = open_checkpoint(source)
    if ck.family == "resnet":
        return resnet_from(ck, arch)
    model = create_vit(**{**ck.vit_config(arch, patch_size, img_size), **overrides})
    load_strict(model, ck.state, ck.name)
    ck.report()
    return model


def resnet_from(source, arch: str = None, num_classes: int = 0):
    """A ResNet from a MoCo checkpoint's query encoder without its projector: a feature extractor (fc =
    Identity), or with num_classes a new fc, the missing keys then being exactly {fc.weight, fc.bias}.
    Returns the model (its `config` attribute says how to build it again)."""
    ck = open_checkpoint(source)
    cfg = ck.resnet_config(arch)
    model = create_resnet(cfg["arch"], cfg["cifar_stem"], num_classes=num_classes)
    load_strict(model, ck.state, ck.name, expect_missing={"fc.weight", "fc.bias"} if num_classes else ())
    ck.report()
    model.config = cfg
    return model


def load_fine_tuned(source, arch: str = None, patch_size: int = None, img_size: int = None,
                    num_classes: int = None, given: dict = None):
    """(classifier, config) of a fine-tuned file, head included: a released one (the reference's pickled
    module.model.Vit, read by models.pickled) or one of our main_finetune.py checkpoints (its live weights).
    Arch, patch, image size and classes are read off the file and checked against the flags given."""
    ck = open_checkpoint(source)
    if not ck.head or (ck.format.ours and not ck.saved):
        raise UserError(f"{ck.name} holds {ck.format.name}, not a fine-tuned classifier; pass a fine-tuned file (the "
                        "reference's module.model.Vit) or one of our fine-tuning checkpoints")
    cfg = ck.vit_config(arch, patch_size, img_size, given)
    if num_classes is not None and num_classes != ck.num_classes:
        raise UserError(f"{ck.name} classifies {ck.num_classes} classes, the dataset has {num_classes}; pass the "
                        "--dataset it was fine-tuned on")
    cfg["num_classes"] = ck.num_classes
    model = create_vit(**cfg)
    load_strict(model, {**ck.state, **ck.head}, ck.name)
    return model, cfg


def load_classifier(source, num_classes: int, arch: str = None, patch_size: int = None, img_size: int = None,
                    given: dict = None, **overrides):
    """A ViT with a new Linear(D, num_classes) head on the cls feature, backbone from `source`; given: the
    --depth / --embed-dim / --num-heads passed (checked against the file), overrides: constructor arguments the
    file does not decide (drop_path_rate, or num_heads).

    The missing keys must be exactly the head; anything else missing or unexpected is an error.
    Returns (model, model config).
    """
    ck = open_checkpoint(source)
    cfg = {**ck.vit_config(arch, patch_size, img_size, given), **overrides, "num_classes": num_classes}
    model = create_vit(**cfg)
    head = {k for k in model.state_dict() if k.startswith("head.")}
    load_strict(model, ck.state, ck.name, expect_missing=head)
    ck.report()
    get_logger().info(f"new head: {', '.join(sorted(head))} ({num_classes} classes)")
    return model, cfg


def build_classifier(weights: str, num_classes: int, arch: str, patch_size: int, img_size: int,
                     drop_path_rate: float = 0.0, **overrides):
    """(ViT classifier, its config): the backbone of `weights` (any ViT format above, a path or a registry name)
    with a new head, or, without weights, one trained from scratch (overrides: depth, embed_dim, num_heads).
    arch None: what the file holds (vit-small from scratch)."""
    if weights:
        return load_classifier(weights, num_classes, arch, patch_size, img_size, overrides, drop_path_rate=drop_path_rate)
    cfg = dict(arch=arch or "vit-small", img_size=img_size, patch_size=patch_size, num_classes=num_classes,
               drop_path_rate=drop_path_rate, **overrides)
    return create_vit(**cfg), cfg


def describe_weights(source) -> dict:
    """What a file (a path, a registry name, a loaded dict or a Checkpoint) holds, read as loading would read it
    (nothing is unpickled beyond tensors and the allowlisted module trees): format, family, arch, patch and image
    size (ViTs), stem (ResNets), classes (classifiers; None otherwise) and the parameter count of what loading
    builds."""
    ck = open_checkpoint(source)
    if ck.family == "resnet":
        cfg = ck.resnet_config()
        model = create_resnet(cfg["arch"], cfg["cifar_stem"])
        return dict(format=ck.format.name, family="resnet", arch=cfg["arch"], cifar_stem=cfg["cifar_stem"],
                    num_classes=None, params=sum(p.numel() for p in model.parameters()))
    cfg = ck.vit_config()
    classes = ck.num_classes
    model = create_vit(**{**cfg, "num_classes": classes or 0})
    return dict(format=ck.format.name, family="vit", arch=vit_label(cfg),
                patch_size=cfg["patch_size"], img_size=cfg["img_size"], depth=cfg.get("depth", 12),
                num_heads=cfg.get("num_heads") or ARCHS[cfg["arch"]]["num_heads"], num_classes=classes,
                params=sum(p.numel() for p in model.parameters()))


def classifier_state(source):
    """(our classifier's state dict, its config) of a fine-tuned file (load_fine_tuned)."""
    model, cfg = load_fine_tuned(source)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}, cfg
