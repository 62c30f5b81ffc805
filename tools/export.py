"""Weights out of our code (`python -m tools.weights export`): any checkpoint the reader takes (ours, the releases,
the public layouts of models/outside.py) as a .safetensors file in timm's (ViTs) or torchvision's (ResNets) layout,
as a folder in the Hugging Face hub's layout (model.safetensors, config.json with timm's pretrained config, a
README.md model card), or as ONNX (the backbone, or a fine-tuned classifier; a dynamic batch axis; checked against
PyTorch with onnxruntime, an optional extra).

Loading the exports elsewhere (docs/WEIGHTS.md#export):
    timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file="vit.safetensors"), **MODEL_ARGS)
    timm.create_model("local-dir:FOLDER", pretrained=True)                            # the hub folder
    torchvision.models.resnet50().load_state_dict(safetensors.torch.load_file(F), strict=False)  # fc left out
MODEL_ARGS and ARCH are in the folder's config.json (and the file's metadata). Our ViTs normalise with
LayerNorm eps 1e-5 (the APS reference's), timm's with 1e-6, and a JSON config cannot say which; set_norm_eps(model,
config) (or the one line the model card shows) gives timm's model our epsilon, and then our features to 1e-5.
"""
import json
import os
import shutil
import tempfile

import torch

from data.datasets import IMAGENET_MEAN, IMAGENET_STD, PRESETS
from models.loading import load_backbone, load_fine_tuned, open_checkpoint, vit_label
from models.outside import HUB_CONFIG, HUB_WEIGHTS, OURS_KEY, TIMM_NORM_EPS
from models.vit import ARCHS
from utils.errors import UserError

FORMATS = ("safetensors", "hf", "onnx")
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
TIMM_BASE = {"vit-tiny": "vit_tiny_patch16_224", "vit-small": "vit_small_patch16_224",
             "vit-base": "vit_base_patch16_224"}


def vit_model_args(cfg: dict, num_classes: int) -> dict:
    """timm VisionTransformer arguments (JSON) that build our ViT `cfg` (create_vit's) with timm's own code."""
    base = ARCHS[cfg["arch"]]
    return dict(img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                embed_dim=cfg.get("embed_dim", base["embed_dim"]), depth=cfg.get("depth", 12),
                num_heads=cfg.get("num_heads", base["num_heads"]), mlp_ratio=cfg.get("mlp_ratio", 4.0),
                qkv_bias=cfg.get("qkv_bias", False), class_token=True, no_embed_class=cfg.get("no_embed_class", True),
                global_pool=cfg.get("global_pool", "token"), num_classes=num_classes)


def norm_eps_of(cfg: dict) -> dict:
    """The LayerNorm epsilons of our ViT `cfg`: blocks and final norm."""
    eps = cfg.get("norm_eps", 1e-5)
    return {"norm_eps": eps, "final_norm_eps": cfg.get("final_norm_eps") or eps}


def set_norm_eps(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """Give a timm ViT built from an export's config.json the LayerNorm epsilons of ours (config[OURS_KEY]); other
    models unchanged. Returns the model."""
    eps = (config.get(OURS_KEY) or {}).get("norm_eps")
    if eps:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = eps["final_norm_eps"] if name in ("norm", "fc_norm") else eps["norm_eps"]
    return model


def normalisation(ck) -> dict:
    """mean/std/input size of the data the weights saw: the run's dataset preset (fine-tuned classifiers: the
    statistics fine-tuning used), else ImageNet's."""
    args = ck.loaded.get("args") if isinstance(ck.loaded.get("args"), dict) else {}
    preset = PRESETS.get(args.get("dataset"))
    if preset is None:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    mean, std = preset.finetune_stats if ck.head else (preset.mean, preset.std)
    return {"mean": list(mean), "std": list(std)}


def exported_vit(ck):
    """(state in timm keys, config.json) of a ViT checkpoint: the backbone, and its head when it was trained."""
    if ck.head:
        model, cfg = load_fine_tuned(ck)
        classes = cfg["num_classes"]
    else:
        model, cfg, classes = load_backbone(ck), ck.vit_config(), 0
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    cfg = {k: v for k, v in cfg.items() if k not in ("num_classes", "drop_path_rate")}
    args = vit_model_args(cfg, classes)
    size = [3, cfg["img_size"], cfg["img_size"]]
    pretrained = {"input_size": size, "interpolation": "bicubic", "crop_pct": 1.0 if cfg["img_size"] <= 64 else 0.875,
                  "num_classes": classes, "classifier": "head", "first_conv": "patch_embed.proj",
                  **normalisation(ck)}
    config = {"architecture": TIMM_BASE[cfg["arch"]], "num_classes": classes, "num_features": args["embed_dim"],
              "global_pool": args["global_pool"], "model_args": args, "pretrained_cfg": pretrained,
              OURS_KEY: {"family": "vit", "model_config": cfg, "norm_eps": norm_eps_of(cfg), "label": vit_label(cfg),
                         "source": ck.name, "source_format": ck.format.name}}
    return state, config


def exported_resnet(ck):
    """(state in torchvision keys without fc, config.json) of a ResNet checkpoint's trunk."""
    model = load_backbone(ck)
    cfg = dict(model.config)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    pretrained = {"input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 0.875, "num_classes": 0,
                  "classifier": "fc", "first_conv": "conv1", **normalisation(ck)}
    config = {"architecture": cfg["arch"], "num_classes": 0, "num_features": model.feature_dim, "global_pool": "avg",
              "model_args": {"num_classes": 0}, "pretrained_cfg": pretrained,
              OURS_KEY: {"family": "resnet", "model_config": cfg, "source": ck.name, "source_format": ck.format.name,
                         "note": "CIFAR stem: torchvision's conv1 as Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool "
                                 "as Identity" if cfg["cifar_stem"] else ""}}
    return state, config


def write_safetensors(state: dict, path: str, config: dict):
    """state as a .safetensors file, our config in its metadata (what our reader needs to rebuild it exactly)."""
    from safetensors.torch import save_file
    meta = {"format": "pt", OURS_KEY: json.dumps(config[OURS_KEY], sort_keys=True),
            "timm_config": json.dumps({k: v for k, v in config.items() if k != OURS_KEY}, sort_keys=True)}
    save_file(state, path, metadata=meta)


def run_files(ck) -> dict:
    """report.md and config.yaml beside one of our checkpoints, when they are there ({} otherwise)."""
    src = ck.name if isinstance(ck.name, str) and os.path.isfile(ck.name) else None
    out = {}
    for name in ("report.md", "config.yaml"):
        path = os.path.join(os.path.dirname(os.path.abspath(src)), name) if src else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                out[name] = f.read().strip()
    return out


def model_card(config: dict, files: dict) -> str:
    """README.md of a hub folder: what the model is, how to load it, the run's report and config."""
    ours, args = config[OURS_KEY], config["model_args"]
    lines = ["---", "library_name: timm", "tags: [image-feature-extraction, self-supervised]", "---", "",
             f"# {ours.get('label') or ours['model_config'].get('arch')} from {os.path.basename(str(ours['source']))}",
             "", f"Exported by asym-ssl's `python -m tools.weights export` from `{ours['source']}` "
             f"({ours['source_format']}).", ""]
    if ours["family"] == "vit":
        eps = ours["norm_eps"]
        lines += ["```python", "import timm, torch",
                  'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)',
                  f"for name, m in model.named_modules():      # LayerNorm eps {eps['norm_eps']:g} as trained (timm's "
                  f"default is {TIMM_NORM_EPS:g})",
                  "    if isinstance(m, torch.nn.LayerNorm):",
                  f"        m.eps = {eps['final_norm_eps']!r} if name in ('norm', 'fc_norm') else {eps['norm_eps']!r}",
                  "```", "", f"timm arguments: `{json.dumps(args, sort_keys=True)}`."]
    else:
        lines += ["```python", "import safetensors.torch, torch, torchvision",
                  f"model = torchvision.models.{ours['model_config']['arch']}()", "model.fc = torch.nn.Identity()",
                  f'model.load_state_dict(safetensors.torch.load_file("THIS_FOLDER/{HUB_WEIGHTS}"))', "```"]
        if ours.get("note"):
            lines += ["", ours["note"] + "."]
    pre = config["pretrained_cfg"]
    lines += ["", f"Input: {pre['input_size'][1]} px, mean {pre['mean']}, std {pre['std']}.",
              "Papers: APS (asymmetric patch sampling) and Asym-Siam; the released models' figures are in "
              "asym-ssl's docs/REFERENCE.md."]
    for name, text in files.items():
        lines += ["", f"## The run's {name}", "", "```" if name.endswith(".yaml") else "", text,
                  "```" if name.endswith(".yaml") else ""]
    return "\n".join(lines).rstrip() + "\n"


def onnx_runtime():
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError("--format onnx checks the export with onnxruntime, which is not installed; pip install -r "
                        "requirements-extras.txt (or pip install onnx onnxruntime)") from e
    return onnxruntime


def write_onnx(ck, out: str) -> str:
    """The backbone (features) or, for a fine-tuned classifier, the classifier (logits) as ONNX with a dynamic batch
    axis, checked against PyTorch on a batch of another size (at most ONNX_TOLERANCE apart)."""
    ort = onnx_runtime()
    if ck.family == "vit":
        model = load_fine_tuned(ck)[0] if ck.head else load_backbone(ck)
        size = ck.vit_config()["img_size"]
    else:
        model = load_backbone(ck)
        size = 32 if model.config["cifar_stem"] else 224
    model.eval()
    output = "logits" if ck.head else "features"
    torch.manual_seed(0)
    traced, checked = torch.randn(2, 3, size, size), torch.randn(3, 3, size, size)
    tmp = out + ".tmp"
    try:
        import warnings
        with warnings.catch_warnings():                    # torch's notes on the TorchScript-based exporter
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (traced,), tmp, input_names=["images"], output_names=[output],
                              dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, opset_version=ONNX_OPSET,
                              dynamo=False)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": checked.numpy()})[0])
        with torch.no_grad():
            want = model(checked)
        gap = float((got - want).abs().max())
        if got.shape != want.shape or gap > ONNX_TOLERANCE:
            raise UserError(f"the ONNX export of {ck.name} gives {output} {gap:.2g} away from PyTorch's (more than "
                            f"{ONNX_TOLERANCE:g}); nothing written; report it with `python -m tools.weights inspect`")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return (f"wrote {out}: {ck.family} {output} at {size} px, input 'images' [batch, 3, {size}, {size}], checked "
            f"with onnxruntime on a batch of 3 (max difference {gap:.1e})")


def export(src, out: str, fmt: str) -> str:
    """Write `src` (a path, registry name or hub folder) as `fmt` (safetensors: one file; hf: a folder) at `out`;
    the line to print."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    ck = open_checkpoint(src)
    if fmt == "onnx":
        return write_onnx(ck, out)
    state, config = exported_vit(ck) if ck.family == "vit" else exported_resnet(ck)
    if fmt == "safetensors":
        tmp = out + ".tmp"
        write_safetensors(state, tmp, config)
        os.replace(tmp, out)
        return (f"wrote {out}: {config[OURS_KEY]['family']} {config['architecture']}, {len(state)} tensors "
                f"(timm arguments in its metadata: timm_config)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} exists and is not an empty folder; choose a new folder for the export")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)       # the folder appears whole, or not at all
    try:
        write_safetensors(state, os.path.join(staging, HUB_WEIGHTS), config)
        with open(os.path.join(staging, HUB_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(config, run_files(ck)))
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"wrote {out}/: {HUB_WEIGHTS}, {HUB_CONFIG}, README.md ({config['architecture']}, {len(state)} tensors)"
