"""`starcoder plan`: will a layout fit, and which layout is fastest, before a job starts.

`plan_layout(cfg)` gives the per-GPU memory of the config's own layout, term by term;
`rank_layouts(cfg, nodes)` tries every TP x PP x DP split of the GPUs and orders those that fit by
a roofline step time. The formulas are in docs/plan.md; the activation terms are checked against
saved-tensor measurements in tests/planning.
"""

from starcoder.planning.memory import Plan, activation_tensors, plan_layout
from starcoder.planning.parameters import parameters_per_rank
from starcoder.planning.roofline import Hardware, rank_layouts, step_time

__all__ = ["Plan", "Hardware", "activation_tensors", "parameters_per_rank", "plan_layout",
           "rank_layouts", "step_time"]
