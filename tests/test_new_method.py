"""The contract for a new method: its own files only. A throw-away SimSiam (a ResNet, a projector, a predictor at a
fixed lr, a stop-gradient loss) is written into a temporary folder as its model, its method and its script, with
nothing else in the repo edited, and must: train, resume exactly, be probed by main_lincls.py, pass the flag tests
(every flag's domain, each numeric flag's in-domain edges on a dry run) and the host-sync test every script passes
(tests/test_host_sync.py: its own method, model and batch, stepped on `meta`)."""
import textwrap

import pytest
import torch

MODEL = '''
import torch.nn as nn
import torch.nn.functional as F

from models.heads import mlp
from models.resnet import create_resnet
from utils.runtime import no_autocast


class SimSiam(nn.Module):
    def __init__(self, arch, cifar_stem, proj_dim, pred_hidden_dim):
        super().__init__()
        self.encoder = create_resnet(arch, cifar_stem)                 # fc = Identity: the pooled features
        self.projector = mlp([self.encoder.feature_dim, proj_dim, proj_dim], norm=nn.BatchNorm1d)
        self.predictor = mlp([proj_dim, pred_hidden_dim, proj_dim], norm=nn.BatchNorm1d)

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.encoder(x1)), self.projector(self.encoder(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with no_autocast(p1.device):
            cos = lambda p, z: F.cosine_similarity(p.float(), z.detach().float()).mean()
            return -(cos(p1, z2) + cos(p2, z1)) / 2, {}
'''

METHOD = '''
from methods.selfsup import SelfSupervised
from utils.checkpoint import backbone_record


class SimSiamPretraining(SelfSupervised):
    name = "SimSiam"

    def training_steps(self, batch, rng):
        views = batch[0]
        yield self.model(views["view1"], views["view2"])

    def param_groups(self):
        m = self.module
        return [{"params": list(m.encoder.parameters()) + list(m.projector.parameters())},
                {"params": list(m.predictor.parameters()), "fixed_lr": self.lr}]     # SimSiam's fixed-lr predictor

    def backbone_record(self):
        return backbone_record("SimSiam", "resnet", "encoder.", ("projector.", "predictor."), self.model_config)
'''

SCRIPT = '''
"""SimSiam pretraining of a ResNet: the throw-away method of tests/test_new_method.py."""
from dataclasses import replace

from augment.recipes import MOCO_V2_VIEW, Pair
from data import PRESETS, add_data_args
from methods.run import Run
from models.resnet import add_resnet_args, resolve_cifar_stem
from simsiam_method import SimSiamPretraining
from simsiam_model import SimSiam
from utils.config import ArgumentParser
from utils.errors import exit_on_user_error
from utils.flags import count
from utils.knn import add_knn_args
from utils.optim import add_sgd_args, sgd_from_args
from utils.run import add_runtime_args, check_per_process


def get_args_parser():
    p = ArgumentParser(description=__doc__)
    add_data_args(p, batch_size=256, subset="the kNN memory bank")
    g = add_resnet_args(p, arch="resnet18")
    g.add_argument("--proj-dim", type=count(), default=2048, help="projector width")
    g.add_argument("--pred-hidden-dim", type=count(), default=512, help="predictor hidden width")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=count(), default=100, help="epochs")
    add_sgd_args(g, lr=0.05, weight_decay=1e-4)
    add_knn_args(p, sorted(PRESETS))
    add_runtime_args(p)
    return p


@exit_on_user_error
def main(args):
    run = Run(args)
    check_per_process(args.batch_size, 2, "the heads' batch norm")
    run.begin()
    view = replace(MOCO_V2_VIEW, size=args.img_size, mean=run.preset.mean, std=run.preset.std, flip_late=False)
    run.training_data(Pair(view))                                   # two views, no crop boxes
    module = run.place(SimSiam(args.arch, resolve_cifar_stem(args), args.proj_dim, args.pred_hidden_dim),
                       sync_bn=True)
    lr, optimizer = sgd_from_args(args)
    method = SimSiamPretraining(module, run.parallel(module), lr, args.epochs, knn=run.knn(module.encoder),
                                model_config=dict(arch=args.arch, cifar_stem=args.cifar_stem))
    return run.train(method, optimizer, "SimSiam", lr, identity=("dataset", "arch", "img_size"))
'''


@pytest.fixture
def simsiam(tmp_path, monkeypatch):
    """The three files of the new method in a folder of their own, importable; nothing in the repo changes."""
    kit = tmp_path / "kit"
    kit.mkdir()
    for name, body in (("simsiam_model", MODEL), ("simsiam_method", METHOD), ("main_simsiam", SCRIPT)):
        (kit / f"{name}.py").write_text(textwrap.dedent(body).lstrip())
    monkeypatch.syspath_prepend(str(kit))
    import main_simsiam
    return main_simsiam


@pytest.mark.slow
def test_a_new_method_in_its_own_files_trains_resumes_and_is_probed(simsiam, tmp_path, make_folder):
    import main_lincls
    from tools.same_runs import compare_checkpoint
    make_folder(tmp_path / "data", classes=2, per_class=8, size=(20, 20))
    flags = ["--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--img-size", "16", "--batch-size",
             "8", "--proj-dim", "16", "--pred-hidden-dim", "8", "--num-workers", "0", "--knn-every", "1"]
    run = lambda *argv: simsiam.main(simsiam.get_args_parser().parse_args(flags + list(argv)))  # noqa: E731
    metrics = run("--epochs", "2", "--save-every", "1", "--output-dir", str(tmp_path / "a"))
    assert "knn_top1" in metrics                                              # its kNN monitor ran
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["backbone_record"]["method"] == "SimSiam"
    lrs = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
    assert lrs[1] == 0.05 * 8 / 256 and lrs[0] < lrs[1]                       # the predictor's lr stayed fixed

    run("--epochs", "2", "--resume", str(tmp_path / "a" / "checkpoint-0001.pth"), "--output-dir", str(tmp_path / "b"))
    assert compare_checkpoint(str(tmp_path / "a" / "checkpoint.pth"), str(tmp_path / "b" / "checkpoint.pth"),
                              ignore=("args", "metrics", "start_metrics")) == []      # resumed exactly

    main_lincls.main(main_lincls.get_args_parser().parse_args([
        "--pretrained", str(tmp_path / "a" / "checkpoint.pth"), "--dataset", "imagefolder", "--data-root",
        str(tmp_path / "data"), "--img-size", "16", "--batch-size", "8", "--epochs", "1", "--num-workers", "0",
        "--cache-features", "--output-dir", str(tmp_path / "probe")]))
    probe = torch.load(tmp_path / "probe" / "checkpoint.pth", weights_only=True)["model"]
    encoder = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(probe["backbone." + k], v) for k, v in encoder.items())


@pytest.mark.slow
def test_a_new_method_passes_the_flag_tests(simsiam, tmp_path, capsys):
    import test_flags
    entries = [("main_simsiam", sub, a) for sub, a in test_flags.flags_of("main_simsiam")[1]]
    assert test_flags.undeclared(entries) == []
    shown = " ".join(simsiam.get_args_parser().format_help().split())
    assert "--proj-dim PROJ_DIM projector width [an integer >= 1]" in shown     # --help shows its domains
    test_flags.test_in_domain_edges_pass_the_check_and_a_dry_run_never_tracebacks("main_simsiam", tmp_path, capsys)


def test_a_new_methods_step_makes_no_host_sync(simsiam, tmp_path, device_guard):
    import test_flags
    from test_host_sync import assert_step_makes_no_host_sync, script_trainer
    trainer = script_trainer(simsiam, ["--dataset", "digits", "--num-workers", "0", "--device", "cpu", "--epochs", "1",
                                       *test_flags.TINY["main_simsiam"], "--output-dir", str(tmp_path)])
    assert type(trainer.method).__name__ == "SimSiamPretraining"
    assert_step_makes_no_host_sync(trainer, device_guard)
