"""How faithful JumpReLU's threshold gradient is at each compute precision (CPU, seconds).

For each recipe (``linear``: bandwidth 0.05; ``log``: 0.001), the threshold gradient of one
member with thresholds in [0.3, 1) is averaged over ``--batches`` batches of standard-normal
rows and compared with plain float32's on the same rows: true bfloat16 compute (the fast
path's ``compute_dtype``), and tf32 / bfloat16 input rounding with float32 products (emulated
by rounding the inputs' mantissas). What ``train.dtype=auto`` picks for ``sae.recipe=log``
on a GPU (tf32) rests on it.

    python scripts/jumprelu_precision.py [--batches 40]
"""

from __future__ import annotations

import argparse

import torch

from sweep import archs, fastpath
from sweep.ensemble import hyper_of, stack

D, F, B = 64, 256, 4096


def rounded(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` rounded to ``bits`` explicit mantissa bits (tf32: 10, bfloat16: 7)."""
    drop = 23 - bits
    i = t.contiguous().view(torch.int32)
    return ((i + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def mean_grad(recipe: str, batches: int, bits: int | None, dtype: torch.dtype | None):
    arch = archs.get("jumprelu").configure(recipe)
    params = arch.init_params(D, F, torch.Generator().manual_seed(0))
    thr = 0.3 + 0.7 * torch.rand(F, generator=torch.Generator().manual_seed(1))
    params[arch.form.param] = thr.log() if recipe == "log" else thr
    if bits is not None:
        params["W_enc"] = rounded(params["W_enc"], bits)
    g, total = torch.Generator().manual_seed(2), torch.zeros(F)
    for _ in range(batches):
        x = torch.randn(B, D, generator=g)
        x = rounded(x, bits) if bits is not None else x
        grads, _, _ = fastpath.grads(
            arch, stack([params]), x, hyper_of([1e-3], [0]), 0, None, compute_dtype=dtype
        )
        total += grads[arch.form.param][0]
    return total / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40)
    n = ap.parse_args().batches
    for recipe in ("linear", "log"):
        ref = mean_grad(recipe, n, None, None)
        for label, bits, dtype in [
            ("bfloat16 compute", None, torch.bfloat16),
            ("bfloat16 inputs, fp32 products", 7, None),
            ("tf32 inputs (emulated)", 10, None),
        ]:
            got = mean_grad(recipe, n, bits, dtype)
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=0)
            rel = (got - ref).norm() / ref.norm()
            print(f"{recipe:6s} {label:32s} cosine {cos:.3f}  relative difference {rel:.3f}")


if __name__ == "__main__":
    main()
