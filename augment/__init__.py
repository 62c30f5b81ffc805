"""Augmentation pipelines. Views that the samplers need to locate carry their crop box and flip flag."""
from augment.args import add_aps_augment_args, aps_augment_kwargs
from augment.transforms import (BoxedView, TwoViews, aps_view_transform, eval_transform, finetune_transforms,
                                lincls_transforms, normalize_for)

__all__ = ["add_aps_augment_args", "aps_augment_kwargs", "BoxedView", "TwoViews", "aps_view_transform",
           "eval_transform", "finetune_transforms", "lincls_transforms", "normalize_for"]
