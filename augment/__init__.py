"""Augmentation pipelines. Views that the samplers need to locate carry their crop box and flip flag."""
from augment.transforms import (BoxedView, TwoViews, aps_view_transform, eval_transform, normalize_for)

__all__ = ["BoxedView", "TwoViews", "aps_view_transform", "eval_transform", "normalize_for"]
