"""Released weights: list the registry, download and verify a file, convert a checkpoint to a plain backbone.

    python -m tools.weights list                       # every known weight, and whether it is downloaded
    python -m tools.weights list --remote aps          # the files of the APS hub repo (hub API)
    python -m tools.weights download asym-siam/multicrop-r50-100ep [--dest DIR]
    python -m tools.weights download aps:pretrain/<file>
    python -m tools.weights convert IN OUT              # a plain state dict: a classifier, or a backbone
    python -m tools.weights inspect IN                  # format, arch, sizes, classes, parameters, sha256
    python -m tools.weights convert --to detectron2 IN out.pkl   # a ResNet-50 for detectron2
    python -m tools.weights convert --to vitdet IN vit.pth       # a ViT for detectron2's ViTDet
    python -m tools.weights export IN OUT.safetensors --format safetensors   # timm / torchvision layout
    python -m tools.weights export IN OUT_FOLDER --format hf      # a hub folder: model.safetensors, config.json, card
    python -m tools.weights export IN OUT.onnx --format onnx      # checked with onnxruntime (requirements-extras.txt)

Downloads go to <dest>/<file>.part, resume from there (HTTP Range), are verified (the published md5 prefix for
Asym-Siam; the hub's sha256 for APS) and only then renamed into place: nothing unverified is ever loaded.
The registry is models/registry.py; the download machinery utils/download.py.
"""
import json
import math
import os
import pickle

from tools.export import FORMATS as EXPORT_FORMATS, export
from models.loading import classifier_state, describe_weights, load_backbone, open_checkpoint
from models.resnet import to_detectron2
from models.vit import VITDET_PREFIX, to_vitdet
from models.registry import (APS_PREFIX, APS_REPO, REGISTRY, aps_listing, asym_siam_url, cache_path, download,
                             hub_endpoint, is_registry_name)
from utils.checkpoint import save_checkpoint
from utils.download import file_digest
from utils.config import ArgumentParser
from utils.errors import UserError, exit_on_user_error
from utils.flags import folder, input_weights, output_file, output_folder, positive, text


TARGETS = ("torchvision", "timm", "detectron2", "vitdet")


def convert(src: str, out: str, to: str = None) -> str:
    """Write `src` (a path or registry name, any format loading reads) as a plain state dict, after a strict
    load: a fine-tuned classifier (the reference's pickled Vit, or ours) as our classifier, head included (timm
    keys); any other file's backbone: torchvision keys for ResNets (no fc), timm keys for ViTs (no head).
    to: 'torchvision' / 'timm' insist on that kind; 'detectron2' writes a ResNet-50 backbone as detectron2 reads
    it (a pickle of numpy arrays under res2..res5 names, BN as FrozenBN statistics), as MoCo's converter does."""
    ck = open_checkpoint(src)                                # read once; every step below takes it
    info = describe_weights(ck)
    resnet = info["family"] == "resnet"
    if to == "detectron2":
        return convert_detectron2(ck, out, info)
    if to == "vitdet":
        return convert_vitdet(ck, out, info)
    if to is not None and (to == "torchvision") != resnet:
        kind = "a ResNet" if resnet else "a ViT"
        raise UserError(f"{src} holds {kind}; --to {to} is for {'ResNets' if to == 'torchvision' else 'ViTs'}: "
                        f"use --to {'torchvision' if resnet else 'timm'}")
    if info["num_classes"]:
        state, cfg = classifier_state(ck)
        save_checkpoint(state, out)
        return (f"wrote {out}: APS ViT classifier ({cfg['num_classes']} classes), {len(state)} tensors; load it into "
                f"models.create_vit(**{json.dumps(cfg, sort_keys=True)})")
    model = load_backbone(ck)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(state, out)
    return f"wrote {out}: {type(model).__name__} backbone, {len(state)} tensors"


def convert_detectron2(ck, out: str, info: dict) -> str:
    src = ck.name
    if info["family"] != "resnet" or info["arch"] != "resnet50" or info["cifar_stem"]:
        held = f"a {info['arch']}" + (" with the CIFAR stem" if info.get("cifar_stem") else "")
        raise UserError(f"{src} holds {held}; the detectron2 export takes a ResNet-50 with the ImageNet stem (a "
                        "main_moco.py -a resnet50 checkpoint at 224 px, or a released Asym-Siam file)")
    model = load_backbone(ck)
    state = to_detectron2({k: v for k, v in model.state_dict().items()})
    payload = {"model": {k: v.detach().cpu().numpy() for k, v in state.items()}, "__author__": "asym-ssl",
               "matching_heuristics": True}
    tmp = out + ".tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"could not write {out}: {e.strerror or e}; choose a writable path") from e
    return f"wrote {out}: ResNet-50 backbone for detectron2, {len(state)} arrays (res2..res5, FrozenBN statistics)"


def convert_vitdet(ck, out: str, info: dict) -> str:
    """A ViT backbone in the layout detectron2's ViTDet loads ({"model": backbone.net.* tensors}, models.vit.to_vitdet)."""
    if info["family"] != "vit":
        raise UserError(f"{ck.name} holds a ResNet; --to vitdet is for ViTs (a ResNet-50: --to detectron2)")
    state = to_vitdet({k: v.detach().contiguous() for k, v in load_backbone(ck).state_dict().items()})
    save_checkpoint({"model": state, "__author__": "asym-ssl", "matching_heuristics": False}, out)
    grid = math.isqrt(state[VITDET_PREFIX + "pos_embed"].shape[1] - 1)
    eps = ck.vit_config().get("norm_eps", 1e-5)
    return (f"wrote {out}: {info['arch']}/{info['patch_size']} backbone for detectron2's ViTDet, {len(state)} tensors "
            f"(position embedding at its {grid}x{grid} pre-training grid; set pretrain_img_size={info['img_size']}, "
            f"patch_size={info['patch_size']}, norm eps {eps:g})")


def inspect(src: str) -> list:
    """Lines 'key: value' saying what `src` holds (format, arch, sizes, classes, parameters) and its sha256."""
    info = describe_weights(src)
    path = src if os.path.isfile(src) else cache_path(src)
    info["sha256"] = file_digest(path, "sha256")
    return [f"file: {path}"] + [f"{k}: {'none' if v is None else v}" for k, v in info.items()]


def list_lines(dest: str = None):
    rows = [("name", "arch", "source", "reported", "size", "downloaded")]
    for w in REGISTRY.values():
        path = cache_path(w.name, dest)
        size = f"{w.size / 2**20:.0f} MiB" if w.size else "?"
        rows.append((w.name, w.arch, asym_siam_url(w), w.accuracy, size, path if os.path.isfile(path) else "no"))
    rows.append((f"{APS_PREFIX}<folder>/<file>", "vit", f"{hub_endpoint()}/{APS_REPO}", "see the APS README", "?",
                 "`list --remote aps` lists the files"))
    return rows


def get_args_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], prog="python -m tools.weights")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="known weights (or --remote aps: the hub repo's files)")
    ls.add_argument("--remote", choices=["aps"], default=None, help="list the files of a remote repo")
    ls.add_argument("--dest", type=folder(), default=None, help="cache folder to look in (default: see above)")
    dl = sub.add_parser("download", help="fetch and verify one weight")
    dl.add_argument("name", type=text("a registry name (`list`) or aps:<folder>/<file>"),
                    help="what to download")
    dl.add_argument("--dest", type=output_folder(), default=None,
                    help="cache folder (default: $ASYM_SSL_WEIGHTS or torch.hub's)")
    dl.add_argument("--timeout", type=positive(), default=30.0, help="network timeout in seconds")
    cv = sub.add_parser("convert", help="write a checkpoint's backbone (or classifier) as a plain state dict")
    cv.add_argument("src", type=input_weights(registry=is_registry_name), help="checkpoint path or registry name")
    cv.add_argument("out", type=output_file(), help="output file (.pth; .pkl for detectron2)")
    cv.add_argument("--to", choices=TARGETS, default=None,
                    help="torchvision (ResNets) / timm (ViTs): the plain state dict; detectron2: a ResNet-50 "
                         "backbone in detectron2's layout; vitdet: a ViT backbone as detectron2's ViTDet loads it")
    ex = sub.add_parser("export", help="write a checkpoint for other libraries: .safetensors in timm's/torchvision's "
                                       "layout, or a Hugging Face hub folder")
    ex.add_argument("src", type=input_weights(registry=is_registry_name), help="checkpoint path, hub folder or "
                                                                                 "registry name")
    ex.add_argument("out", type=text("a path to write (a .safetensors file, or a new folder for --format hf)"),
                    help="output file or folder")
    ex.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors",
                    help="safetensors: one file (timm/torchvision keys, our config in its metadata); hf: a folder "
                         "in the hub's layout; onnx: the backbone or classifier, a dynamic batch, checked with "
                         "onnxruntime (docs/WEIGHTS.md#export)")
    ins = sub.add_parser("inspect", help="what a file holds (format, arch, sizes, classes, parameters, sha256)")
    ins.add_argument("src", type=input_weights(registry=is_registry_name),
                     help="checkpoint path or registry name (downloaded first)")
    return p


@exit_on_user_error
def main(args):
    if args.command == "list" and args.remote == "aps":
        for e in aps_listing():
            digest = f"sha256 {e['sha256'][:12]}" if e["sha256"] else f"git {e['blob_id'][:12]}"
            print(f"{APS_PREFIX}{e['path']}\t{e['size']}\t{digest}")
    elif args.command == "list":
        for row in list_lines(args.dest):
            print("\t".join(row))
    elif args.command == "download":
        print(download(args.name, args.dest, args.timeout))
    elif args.command == "export":
        print(export(args.src, args.out, args.format))
    elif args.command == "inspect":
        print("\n".join(inspect(args.src)))
    else:
        print(convert(args.src, args.out, args.to))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
