"""The reward of a path, F(p) = ξ(A^av_p) · ζ(Th_p), with ξ and ζ pluggable by name.

A^av_p is the accuracy averaged over the requests the service answers: Th^l of them on the local model
(A_local), Th^h through the path (A_p).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

from coderay.config import AccuracyFunction, RewardSpec, ThroughputFunction

__all__ = ["ACCURACY_FUNCTIONS", "THROUGHPUT_FUNCTIONS", "average_accuracy", "reward"]

# ξ(a; α): increasing in accuracy a ∈ [0, 1]
ACCURACY_FUNCTIONS: dict[str, Callable[[float, float], float]] = {
    "power": lambda a, alpha: a**alpha,
    "exp": lambda a, alpha: math.exp(alpha * (a - 1.0)),
    "linear": lambda a, alpha: a,
}
# ζ(r; β) of the throughput ratio r = Th_p / Th_local-only: increasing in r
THROUGHPUT_FUNCTIONS: dict[str, Callable[[float, float], float]] = {
    "power": lambda r, beta: r**beta,
    "log": lambda r, beta: 1.0 + beta * math.log(r),
    "linear": lambda r, beta: r,
}
if set(ACCURACY_FUNCTIONS) != set(get_args(AccuracyFunction)) or set(THROUGHPUT_FUNCTIONS) != set(
    get_args(ThroughputFunction)
):
    raise ImportError("coderay.reward and coderay.config disagree on the reward function names")


def average_accuracy(acc_local: float, acc_path: float, th_local: float, th_host: float) -> float:
    total = th_local + th_host
    return acc_path if total <= 0 else (th_local * acc_local + th_host * acc_path) / total


def reward(spec: RewardSpec, acc_avg: float, th_ratio: float, *, acc_local: float | None = None) -> float:
    """F = ξ(A^av) · ζ(Th / Th_local-only); 0 below the optional accuracy floor A_local − δ."""
    if spec.accuracy_floor is not None and acc_local is not None and acc_avg < acc_local - spec.accuracy_floor:
        return 0.0
    if th_ratio <= 0:
        return 0.0
    return max(0.0, ACCURACY_FUNCTIONS[spec.accuracy](acc_avg, spec.alpha)) * max(
        0.0, THROUGHPUT_FUNCTIONS[spec.throughput](th_ratio, spec.beta)
    )
