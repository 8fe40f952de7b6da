"""Kernels: the `models.ops.Ops` implementations executors run the model description with."""
