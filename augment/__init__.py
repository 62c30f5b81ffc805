"""Augmentation: each recipe described once (recipes), realised for PIL in loader workers (pil) and in batches on
the training device (batched), over pure tensor ops (ops) and RandAugment's batched policy (randaugment)."""
