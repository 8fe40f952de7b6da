"""Planning a denoising step's memory before it runs.

`trace` records the op graph of a step from the model description itself (planned kernels on the
meta device); `symbolic` turns one trace per graph structure into size expressions; `offsets` holds
the offset algorithms, pure functions from buffer lifetimes to offsets (as in TFLite's memory
planner and XLA's heap simulator), the lower bound and the overlap validator; `step_plan` makes and
caches one plan per step shape; `search` is lazy chunking: the fewest chunks that fit a budget.
"""
