"""Model FLOPs utilisation: the machine's measured matmul peak, and the FLOPs a LoRA step really needs.

Peak: the best sustained rate of large matmuls on the model's own shapes (tokens x hidden x intermediate,
and the LM head), in the training dtype. MFU = model FLOPs of the run / its wall time / that peak. The FLOPs
formula lives in `tunesmith.plan.flops` (its docstring gives it term by term), so `tunesmith plan` and the
benchmarks count the same work.

    python bench/mfu.py [--seconds 1]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from tunesmith.plan.flops import (  # noqa: F401 - re-exported for the benchmarks
    SeqStats,
    Shapes,
    matmul_rate,
    measured_peak,
    mfu,
    model_matmul_shapes,
    training_flops,
)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="time per matmul shape")
    p.add_argument("--model", default=None, help="HF model dir (default: tunesmith's default model)")
    args = p.parse_args(argv)
    from transformers import AutoConfig

    if args.model is None:
        from tunesmith.model.default import default_model_dir

        args.model = str(default_model_dir())
    shapes = Shapes.of(AutoConfig.from_pretrained(args.model))
    print(f"linear weights N = {shapes.n_linear / 1e6:.1f} M, LoRA r16 N_A = {shapes.n_lora(16) / 1e6:.2f} M")
    for dtype in (torch.bfloat16, torch.float32):
        peak = measured_peak(shapes, dtype, args.seconds)
        shown = ", ".join(f"{k}: {v / 1e9:.0f}" for k, v in peak["by_shape"].items())
        print(f"{peak['dtype']:>8}: peak {peak['peak_flops'] / 1e9:.0f} GFLOP/s ({shown})")


if __name__ == "__main__":
    main()
