"""Long-job reliability: preemption signals, SIGKILL at any moment, crashes inside a checkpoint write,
skipping non-finite steps."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_pretrain
from engine import NonFiniteLoss
from utils.checkpoint import load_file, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--dataset", "digits", "--img-size", "16", "--batch-size", "128", "--nepoch", "2", "--warmup-epochs", "1",
       "--knn-every", "0", "--print-freq", "100"]


def pretrain(argv):
    return main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


def assert_same_weights(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("data_path, workers", [("device", "0"), ("cpu", "1")])
def test_sigterm_mid_epoch_checkpoints_and_the_rerun_equals_an_uninterrupted_run(
        tmp_path, tiny_flags, monkeypatch, data_path, workers):
    flags = tiny_flags + RUN + ["--data-path", data_path, "--num-workers", workers]
    pretrain(flags + ["--output-dir", str(tmp_path / "ref")])
    reference = load_file(str(tmp_path / "ref" / "checkpoint.pth"))

    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):                      # the scheduler's SIGTERM, 10 steps into epoch 1
        calls["n"] += 1
        if calls["n"] == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "preempted"
    with pytest.raises(SystemExit) as e:
        pretrain(flags + ["--output-dir", str(out)])
    assert e.value.code == 0
    ckpt = load_file(str(out / "checkpoint.pth"))
    assert ckpt["epoch"] == 0 and ckpt["batches_done"] == 3 and ckpt["global_step"] == 12  # K = 4 per batch
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    pretrain(flags + ["--output-dir", str(out)])          # the same command again
    final = load_file(str(out / "checkpoint.pth"))
    assert final["epoch"] == 2 and final["global_step"] == reference["global_step"]
    assert_same_weights(final["model"], reference["model"])
    assert_same_weights(final["optimizer"]["state"][0], reference["optimizer"]["state"][0])


@pytest.mark.slow
def test_sigkill_at_a_random_moment_keeps_a_loadable_checkpoint_and_resume_is_exact(tmp_path, tiny_flags):
    cmd = [sys.executable, "main_pretrain.py", *tiny_flags, *RUN, "--nepoch", "3", "--num-workers", "0",
           "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = subprocess.run(cmd + ["--output-dir", str(tmp_path / "ref")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--output-dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.pth"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:   # the first epoch's checkpoint is being written
        time.sleep(0.01)
    time.sleep(0.05)                                       # somewhere in epoch 2 (or inside its save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_file(str(ckpt))["epoch"] >= 1             # intact, whatever the moment of the kill
    res = subprocess.run(cmd + ["--output-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_weights(load_file(str(ckpt))["model"], load_file(str(tmp_path / "ref" / "checkpoint.pth"))["model"])


def test_a_crash_inside_a_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt                            # the process dies here

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    kept = load_file(path)
    assert kept["epoch"] == 1 and torch.equal(kept["model"]["w"], torch.ones(3))


def nan_at(steps_with_nan):
    counter = {"step": 0}

    def steps(model, batch):
        loss = model(batch[0]).pow(2).mean()
        counter["step"] += 1
        yield (loss * float("nan") if counter["step"] in steps_with_nan else loss), {}
    return steps


def test_skip_nonfinite_skips_up_to_n_steps_then_stops(tmp_path, caplog, make_trainer):
    trainer, _ = make_trainer(tmp_path / "a", nan_at({4, 8}), K=1, epochs=3, lr_log=[], skip_nonfinite=2)
    before = {}

    def remember(step):
        before[step] = trainer.method.module.weight.detach().clone()
    trainer.method.after_step = remember
    trainer.fit()                                          # two bad steps: skipped, the run completes
    assert trainer.guard.skipped == 2 and load_file(str(tmp_path / "a" / "checkpoint.pth"))["epoch"] == 3
    assert 3 not in before and 7 not in before             # skipped steps made no update
    assert "skipped step 3: non-finite loss (1 of --skip-nonfinite 2)" in caplog.text
    trainer, _ = make_trainer(tmp_path / "b", nan_at({4, 8, 9}), K=1, epochs=3, lr_log=[], skip_nonfinite=2)
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 8 \(epoch 2\), more than --skip-nonfinite 2"):
        trainer.fit()


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_on_every_rank_and_the_rerun_is_exact(tmp_path, tiny_flags, torchrun):
    args = ["main_pretrain.py", *tiny_flags, *RUN, "--num-workers", "0", "--device", "cpu", "--print-freq", "1"]
    ref = torchrun(29531, *args, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29531", *args, "--output-dir", str(out)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "log.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "epoch 1/2 [ 2/11]" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)                       # as the scheduler does: torchrun passes it on
    proc.wait(timeout=120)
    ckpt = load_file(str(out / "checkpoint.pth"))
    assert 0 < ckpt["batches_done"] < 11, ckpt["batches_done"]   # stopped inside an epoch (usually the first)
    res = torchrun(29531, *args, "--output-dir", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_weights(load_file(str(out / "checkpoint.pth"))["model"],
                        load_file(str(tmp_path / "ref" / "checkpoint.pth"))["model"])


SOAK = ["--knn-every", "1", "--num-workers", "0", "--device", "cpu"]


def soak(tmp_path, tiny_flags, moments, epochs=3):
    """Kill one tiny run at each of `moments` in turn (failpoints: the process SIGKILLs itself there, or
    'external': a SIGKILL from outside after a random delay; a callable picks the moment from the epochs already
    checkpointed), rerunning the same command after each (it resumes from whatever checkpoint survived); then
    let it finish. It must end with the uninterrupted run's weights, optimizer state and step count, bit for
    bit."""
    cmd = [sys.executable, "main_pretrain.py", *tiny_flags, *RUN, *SOAK, "--nepoch", str(epochs)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ASYM_FAILPOINT", None)
    ref = subprocess.run(cmd + ["--output-dir", str(tmp_path / "ref")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out, rng, killed = tmp_path / "soaked", __import__("random").Random(7), []
    for moment in moments:
        ckpt = out / "checkpoint.pth"
        if callable(moment):
            moment = moment(rng, load_file(str(ckpt))["epoch"] if ckpt.exists() else 0, epochs)
        if moment == "external":
            proc = subprocess.Popen(cmd + ["--output-dir", str(out)], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(3.0, 9.0))                   # past the imports, somewhere in the run
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
        else:
            code = subprocess.run(cmd + ["--output-dir", str(out)], cwd=ROOT, capture_output=True, timeout=600,
                                  env=dict(env, ASYM_FAILPOINT=moment)).returncode
        killed.append((moment, code))
        if ckpt.exists():
            assert load_file(str(out / "checkpoint.pth"))["epoch"] >= 0     # whatever survived is readable
    assert all(code == -signal.SIGKILL for moment, code in killed if moment != "external"), killed
    res = subprocess.run(cmd + ["--output-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got, want = load_file(str(out / "checkpoint.pth")), load_file(str(tmp_path / "ref" / "checkpoint.pth"))
    assert got["epoch"] == want["epoch"] == epochs and got["global_step"] == want["global_step"]
    assert_same_weights(got["model"], want["model"])
    for k, v in want["optimizer"]["state"].items():
        assert all(torch.equal(v[n], got["optimizer"]["state"][k][n]) for n in v), k
    return killed


def random_moment(rng, done: int, epochs: int) -> str:
    """A moment the next process is sure to reach (it has epochs - done to train, 44 steps each, a kNN after
    each and one before training when nothing is checkpointed yet); the last epoch is never let through."""
    left = epochs - done - 1                   # epochs the process may complete (and save) before dying
    return rng.choice([f"step@{rng.randint(1, 44 * (left + 1) - 4)}", f"checkpoint-write@{rng.randint(1, left + 1)}",
                       f"knn@{rng.randint(1, left + 1 + (done == 0))}"])


@pytest.mark.slow
def test_sigkill_soak_at_twenty_seven_moments_resumes_to_the_uninterrupted_weights(tmp_path, tiny_flags):
    # seven chosen moments (the first step; inside the kNN before training and after epoch 1; inside checkpoint
    # writes; mid-epoch; from outside), then twenty random ones; one uninterrupted run to compare with
    chosen = ["step@1", "knn@1", "checkpoint-write@1", "knn@2", "step@30", "checkpoint-write@2", "external"]
    killed = soak(tmp_path, tiny_flags, chosen + [random_moment] * 20, epochs=4)
    assert len(killed) == 27 and {m.split("@")[0] for m, _ in killed[len(chosen):]} == {"step", "checkpoint-write",
                                                                                        "knn"}
