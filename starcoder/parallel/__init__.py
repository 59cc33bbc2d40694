"""Parallelism kept apart from the model: the process grid, Megatron-style tensor- and
sequence-parallel layers, `parallelize(model, grid)`, pipeline stages and schedules, and the
global quantities a trainer needs."""

from starcoder.parallel.dtensor import to_dtensor
from starcoder.parallel.grads import (any_nonfinite, clip_grad_norm_, copy_group, grad_norm,
                                      reduce_replicated_grads)
from starcoder.parallel.grid import Grid, init_grid
from starcoder.parallel.parallelize import materialize, parallelize
from starcoder.parallel.pipeline import Pipeline, reduce_data_parallel_grads, split_model

__all__ = ["Grid", "init_grid", "parallelize", "materialize", "reduce_replicated_grads", "grad_norm",
           "clip_grad_norm_", "any_nonfinite", "copy_group", "to_dtensor",
           "Pipeline", "split_model", "reduce_data_parallel_grads"]
