"""Patch samplers. `samplers.aps.sample_aps` is the asymmetric patch sampler of APS."""
