"""load_backbone: our checkpoints, the reference APS format (docs/REFERENCE.md#aps-checkpoint), strict checks, hostile
files."""
import os
import pickle

import pytest
import torch

from models import APS, create_vit, load_backbone
from models.loading import detect_format
from utils.checkpoint import load_file
from utils.errors import UserError

TINY = dict(depth=2, embed_dim=32, num_heads=2)


def features(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_reference_format_gives_the_same_features(tmp_path, tiny_aps, reference_state):
    model = tiny_aps()
    sd = reference_state(model)
    assert sd["base_encoder.pos_embedding"].shape == (16, 1, 32)
    path = tmp_path / "ref.pth"
    torch.save(sd, path)
    assert detect_format(sd) == "reference-aps"
    backbone = load_backbone(str(path), num_heads=2)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(features(backbone, x), features(model.encoder, x), atol=1e-6)


def test_our_checkpoint_gives_the_same_features(tmp_path, tiny_aps):
    model = tiny_aps()
    cfg = dict(arch="vit-tiny", img_size=16, patch_size=4, **TINY)
    path = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict(), "model_config": cfg, "args": {}, "epoch": 1, "optimizer": {}}, path)
    backbone = load_backbone(str(path), arch="vit-tiny", patch_size=4)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(features(backbone, x), features(model.encoder, x), atol=1e-6)


def test_standard_width_is_inferred_and_wrong_flags_are_named(tmp_path, reference_state):
    torch.manual_seed(0)
    model = APS(create_vit("vit-tiny", img_size=16, patch_size=4, depth=1), 16, 8, 16)
    path = tmp_path / "ref.pth"
    torch.save(reference_state(model), path)
    backbone = load_backbone(str(path))
    assert backbone.embed_dim == 192 and backbone.blocks[0].attn.num_heads == 3 and len(backbone.blocks) == 1
    with pytest.raises(UserError, match="pass --arch vit-tiny"):
        load_backbone(str(path), arch="vit-small")
    with pytest.raises(UserError, match="pass --patch-size 4"):
        load_backbone(str(path), patch_size=2)


def test_strict_keys(tmp_path, tiny_aps, reference_state):
    sd = reference_state(tiny_aps())
    extra = dict(sd, **{"base_encoder.something.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="unexpected keys.*something"):
        load_backbone(extra, num_heads=2)
    missing = {k: v for k, v in sd.items() if k != "base_encoder.transformer.1.mlp.fc2.weight"}
    with pytest.raises(UserError, match="missing: blocks.1.mlp.fc2.weight"):
        load_backbone(missing, num_heads=2)
    bad_pos = dict(sd, **{"base_encoder.pos_embedding": torch.zeros(1, 16, 32)})
    with pytest.raises(UserError, match=r"\(L, 1, D\)"):
        load_backbone(bad_pos, num_heads=2)
    with pytest.raises(UserError, match="not a checkpoint format we know"):
        load_backbone({"foo": torch.zeros(1)})


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_hostile_and_broken_files_are_refused(tmp_path, monkeypatch, tiny_aps, reference_state):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    with pytest.raises(UserError, match="refuse"):
        load_backbone(str(evil))
    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(UserError):
        load_backbone(str(raw))
    module_file = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), module_file)  # a pickled whole module, like the reference fine-tune files
    with pytest.raises(UserError, match="refuse"):
        load_backbone(str(module_file))
    assert not (tmp_path / "PWNED").exists()

    good = tmp_path / "good.pth"
    torch.save(reference_state(tiny_aps()), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(UserError, match="unreadable"):
        load_backbone(str(truncated))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError):
        load_backbone(str(text))
    with pytest.raises(UserError, match="does not exist"):
        load_backbone(str(tmp_path / "nope.pth"))
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(UserError, match="not a dict"):
        load_file(str(tensor_file))


def test_one_reader_reads_each_file_once_per_command(tmp_path, tiny_aps, monkeypatch):
    import main_lincls
    import models.loading as L
    from tools import weights as weights_tool
    model = tiny_aps()
    cfg = dict(arch="vit-tiny", img_size=16, patch_size=4, **TINY)
    path = tmp_path / "ours.pth"
    torch.save({"model": model.state_dict(), "model_config": cfg, "args": {}, "epoch": 1, "optimizer": {}}, path)
    reads = []
    monkeypatch.setattr(L, "load_file", lambda p, what: reads.append(p) or load_file(p, what))
    weights_tool.convert(str(path), str(tmp_path / "plain.pth"))          # describe, then convert: one read
    assert reads == [str(path)]
    reads.clear()
    main_lincls.main(main_lincls.get_args_parser().parse_args(
        ["--pretrained", str(path), "--dataset", "digits", "--num-workers", "0", "--batch-size", "32", "--dry-run",
         "--device", "cpu", "--output-dir", str(tmp_path / "probe")]))    # its image size, then its backbone
    assert reads == [str(path)]


def test_a_file_that_fits_two_formats_is_refused_and_a_near_miss_is_not_guessed(tiny_aps):
    from models.loading import open_checkpoint
    from models.resnet import create_resnet
    aps = tiny_aps().state_dict()
    trunk = {f"encoder_q.{k}": v for k, v in create_resnet("resnet18", cifar_stem=True).state_dict().items()}
    moco = {**trunk, **{k.replace("encoder_q.", "encoder_k."): v for k, v in trunk.items()},
            "queue": torch.zeros(8, 16), "queue_ptr": torch.zeros((), dtype=torch.long)}
    assert open_checkpoint({"model": moco}).format.name == "ours-moco"
    with pytest.raises(UserError, match=r"fits more than one checkpoint layout \(ours-aps, ours-moco\)"):
        open_checkpoint({"model": {**aps, **moco}})
    # another method's online encoder that happens to be called encoder_q is not read as a MoCo checkpoint
    with pytest.raises(UserError, match="not a checkpoint format we know"):
        open_checkpoint({"model": trunk})


def test_any_width_depth_and_heads_are_read_described_and_checked_against_the_flags(tmp_path):
    from methods.classify import finetuned_classifier
    from models.loading import describe_weights, load_classifier, open_checkpoint
    torch.manual_seed(0)
    cfg = dict(arch="vit-tiny", img_size=16, patch_size=4, depth=3, embed_dim=48, num_heads=3)
    vit = APS(create_vit(**cfg), 32, 16, 32)
    path = tmp_path / "custom.pth"
    torch.save({"model": vit.state_dict(), "model_config": cfg, "args": {}, "epoch": 1, "optimizer": {}}, path)
    ck = open_checkpoint(str(path))
    assert describe_weights(ck)["arch"] == "custom: width 48, depth 3, heads 3"
    flags = dict(embed_dim=48, depth=3, num_heads=3)
    model, got = load_classifier(ck, 5, arch="vit-tiny", patch_size=4, img_size=16, given=flags)
    assert (got["embed_dim"], got["depth"], got["num_heads"]) == (48, 3, 3) and model.head.out_features == 5
    for flag, value, named in (("embed_dim", 64, "--embed-dim 48"), ("depth", 2, "--depth 3"),
                               ("num_heads", 4, "--num-heads 3")):
        with pytest.raises(UserError, match=f"pass {named}"):
            load_classifier(ck, 5, given={**flags, flag: value})
    with pytest.raises(UserError, match="width 48 \\(custom\\), not vit-small; pass --arch vit-tiny"):
        load_classifier(ck, 5, arch="vit-small")
    plain = tmp_path / "plain.pth"                       # a bare state dict: no saved config, nothing to go by
    torch.save(vit.encoder.state_dict(), plain)
    with pytest.raises(UserError, match="width 48 \\(custom\\), not vit-small; pass --embed-dim 48 to describe it"):
        load_classifier(str(plain), 5, arch="vit-small")
    assert load_classifier(str(plain), 5, arch="vit-small", given=flags)[1]["num_heads"] == 3
    # --eval of a fine-tuned custom classifier, with the flags that describe it
    clf = create_vit(**cfg, num_classes=5)
    tuned = tmp_path / "tuned.pth"
    torch.save({"model": clf.state_dict(), "model_config": {**cfg, "num_classes": 5}, "args": {}, "epoch": 1,
                "optimizer": {}, "extra": {}}, tuned)
    given = dict(arch="vit-tiny", patch_size=4, img_size=16, given=flags)
    model, weights, note = finetuned_classifier(str(tuned), given, 5)
    model.load_state_dict(weights)
    assert note == " (live weights)" and model.embed_dim == 48
    with pytest.raises(UserError, match="pass --depth 3"):
        finetuned_classifier(str(tuned), {**given, "given": {**flags, "depth": 12}}, 5)
