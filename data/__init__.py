"""Datasets, their presets (image size, normalisation), loaders and the shared data flags; `data.pipeline` puts a
script's data together (the recipe realised on the CPU or the device path)."""
from data.args import add_data_args, apply_preset
from data.datasets import PRESETS, build_dataset, get_preset
from data.loader import build_eval_loader, build_train_loader, per_rank_batch_size

__all__ = ["add_data_args", "apply_preset", "PRESETS", "build_dataset", "get_preset", "build_eval_loader", "build_train_loader",
           "per_rank_batch_size"]
