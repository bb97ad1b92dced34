"""`tunesmith plan`: memory, time and cost of a run before it starts (see docs/plan.md).

architecture  the model's dimensions and parameters from its config.json, built on the meta device
memory        what a training step holds, part by part (pure functions, hand-checked in the tests)
flops         model FLOPs of a pass (also used by the benchmarks) and the matmul rate of this machine
data          the run's examples rendered as training renders them, the shape of every micro-batch
devices       this machine, or a device of the price table (memory, published peak, hourly price)
timing        time from executed FLOPs at a calibrated or assumed throughput
core          plan_run / check_fits: the plan, its verdict and the changes that make a run fit
"""

from __future__ import annotations

from .core import Plan, check_fits, plan_run

__all__ = ["Plan", "check_fits", "plan_run"]
