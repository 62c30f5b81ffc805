"""The training methods, one small engine.Method each: what the Trainer trains and how it is evaluated.

aps: APS pretraining (K optimizer steps per batch, one per sampling round); moco: MoCo v2 with the Asym-Siam
switches; classify: fine-tuning (mixup, EMA, held-out selection) and the linear probe (frozen backbone).
"""
