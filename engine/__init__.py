"""The training loop shared by every script: lr per step, autocast, several optimizer steps per loaded batch,
non-finite detection without host syncs, progress lines, TensorBoard/JSON logs, evaluation, atomic checkpoints and
exact resume.

A script hands the Trainer a `Method` (what it trains: the model, its parameter groups, the steps of one loaded
batch, the lr schedule, the evaluation, the hooks and its checkpoints' record), an `OptimizerSpec` (utils.optim:
which optimiser, built here over the method's groups), `TrainSettings` (the runtime flags, and what the script says
about its own flags: which ones a resumed run must share, which one sets the lr) and a `Reporter` (what the run
leaves for people: utils.report.RunReporter draws curves.png and writes report.md).
`Method.training_steps(batch, rng)` yields (loss, stats) once per optimizer step (APS: one per sampling round; the
other methods: one per batch). rng is a utils.rng.BatchRandom reseeded per global batch from (seed, epoch, batch):
per-sample randomness drawn from it (APS's patch sampling, ScaleMix, shuffle-BN's permutation) is the same for any
number of processes. Every epoch also reseeds the global RNGs from (seed, epoch, rank) (dropout, drop path), and a
mid-epoch checkpoint saves them.

The parts, each in its own file:
- engine/contracts.py: Method, Reporter, TrainSettings (what a script gives);
- engine/trainer.py: the Trainer's epoch loop and its step loop (set lr, forward, backward, step, log);
- engine/state.py: checkpoints, resume and preemption;
- engine/guard.py: the non-finite policy (stop at the first, or --skip-nonfinite N);
- engine/progress.py: an epoch's figures and progress lines;
- engine/hooks.py: the callbacks tests and tools install (the step context, the step failpoint, the epoch's end).
"""
from engine.contracts import Method, Reporter, TrainSettings
from engine.guard import NO_STEP, NonFiniteGuard, NonFiniteLoss
from engine.hooks import Callback, installed
from engine.state import BEST, RunState, all_rng_states
from engine.trainer import STEP_STREAM, Trainer, epoch_seed

__all__ = ["Method", "Reporter", "TrainSettings", "NO_STEP", "NonFiniteGuard", "NonFiniteLoss", "Callback",
           "installed", "BEST", "RunState", "all_rng_states", "STEP_STREAM", "Trainer", "epoch_seed"]
