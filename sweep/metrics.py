"""How dictionaries are judged: reconstruction, sparsity, feature health, ground truth.

All reconstruction metrics are computed on held-out rows (the store's evaluation window) in
the training space (activations times the store's scale). ``mse`` and ``l1_norm`` are in
that space's units; the ratios (``fvu``, ``explained_variance``, ``cossim``, ``l2_ratio``,
``relative_reconstruction_bias``) and the sparsity/density metrics do not depend on the scale.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from sweep import sae
from sweep.sae import Params
from sweep.sweepdir import METRICS_VERSION

DENSE_THRESHOLD = 0.1
RECOVERED_THRESHOLD = 0.9
COS_EPS = 1e-8
"""Norms below this count as this in ``cossim``: a zero reconstruction of a row has cosine 0
with it. A zero input row has no direction: it is left out of ``cossim``'s mean (SAEBench's
code gets NaN for it, and so for the mean)."""
L2_RATIO_MIN_NORM = 1e-4
"""Input rows with a smaller norm, in the activations' own units, are divided by 1 in
``l2_ratio`` (SAEBench's guard, which sees raw activations)."""


HIST_EDGES = torch.linspace(-8.0, 0.0, 41, dtype=torch.float64)
"""Fixed log10-frequency bin edges (0.2 decades), so all runs' histograms are comparable;
dead features are counted separately."""


def unit_rows(w_FD: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm: (F, D) float32."""
    w = w_FD.float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cos_both(
    a_FD: torch.Tensor, b_GD: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows in; per row of ``a`` the max cosine to ``b`` (F,), and per row of ``b`` to ``a`` (G,).

    Works in row blocks of ``a`` so the (F, G) similarity matrix is never held whole.
    """
    best_a = torch.empty(a_FD.shape[0], device=a_FD.device)
    best_b = torch.full((b_GD.shape[0],), -1.0, device=a_FD.device)
    for at in range(0, a_FD.shape[0], chunk):
        sim = a_FD[at : at + chunk] @ b_GD.T  # (f, D) @ (D, G) -> (f, G)
        # amax, not max(dim=...): the latter also finds indices, ~10x slower on CPU
        best_a[at : at + chunk] = sim.amax(dim=1)
        best_b = torch.maximum(best_b, sim.amax(dim=0))
    return best_a, best_b


def mmcs(a_FD: torch.Tensor, b_GD: torch.Tensor) -> torch.Tensor:
    """Per row of ``a``, the max cosine similarity to any row of ``b``: (F,)."""
    return max_cos_both(unit_rows(a_FD), unit_rows(b_GD))[0]


def density_tensors(freq_F: torch.Tensor) -> dict[str, torch.Tensor]:
    """Frequency (F,), log10 histogram counts (B,) over :data:`HIST_EDGES` (B+1,), dead count."""
    freq = freq_F.detach().double().cpu()
    alive = freq[freq > 0]
    logf = alive.log10().clamp(float(HIST_EDGES[0]), float(HIST_EDGES[-1]))
    counts = (
        torch.histogram(logf, bins=HIST_EDGES).hist.long()
        if alive.numel()
        else torch.zeros(len(HIST_EDGES) - 1, dtype=torch.long)
    )
    return {
        "frequency": freq,
        "log10_hist_counts": counts,
        "log10_hist_edges": HIST_EDGES.clone(),
        "dead_count": torch.tensor([int((freq == 0).sum())]),
    }


def evaluate(params: Params, x_ND: torch.Tensor, **kw: Any) -> dict[str, float]:
    """Final metrics of one SAE on evaluation rows ``x_ND`` (already multiplied by the
    store's ``scale``); ``kw``: :func:`evaluate_with_frequency`'s settings."""
    return evaluate_with_frequency(params, x_ND, **kw)[0]


@torch.no_grad()
def evaluate_with_frequency(
    params: Params,
    x_ND: torch.Tensor,
    batch: int = 4096,
    arch: str = "untied",
    k: int = 0,
    scale: float = 1.0,
    widths: tuple[int, ...] = (),
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`evaluate`'s metrics and each feature's firing frequency on ``x_ND``: (F,) float64.

    Codes are the inference-time codes of architecture ``arch`` (``k`` for TopK; BatchTopK
    and JumpReLU use the thresholds in ``params``). See :func:`evaluate_members`.

    Metrics (``x`` a row, ``x̂`` its reconstruction, ``f`` its codes, ``p_i`` latent ``i``'s
    firing frequency; names after SAEBench's core eval where it has one):

    - ``mse``: mean over rows and dims of (x̂ - x)²; ``fvu``: Σ‖x̂ - x‖² / Σ‖x - mean(x)‖²;
      ``explained_variance``: 1 - fvu (both NaN when the rows do not vary);
      ``explained_variance_legacy``: mean over rows of 1 - ‖x̂ - x‖² / ‖x - mean(x)‖²
      (SAEBench's per-row formula, its paper's figures; reads lower, a row near the mean
      weighs a lot; a row exactly at the mean, where it is undefined, is left out)
    - ``cossim``: mean over the rows that are not zero of cos(x, x̂) (0 where x̂ is zero;
      NaN when every row is zero)
    - ``l2_ratio``: mean over rows of ‖x̂‖ / ‖x‖ (‖x‖ < 1e-4 counted as 1, as SAEBench; in
      raw units, ‖x‖ / ``scale``); ``l2_norm_in`` / ``l2_norm_out``: mean ‖x‖ / ‖x̂‖ over
      rows, in raw units
    - ``relative_reconstruction_bias``: Σ‖x̂‖² / Σ⟨x, x̂⟩ (Gated SAE paper eq. 10: 1 = no
      shrinkage, < 1 = reconstructions shrunk); NaN when Σ⟨x, x̂⟩ = 0
    - ``l0``: mean number of non-zero codes per row; ``l1_norm``: mean ‖f‖₁ per row
      (SAEBench's ``l1``; our ``l1`` is the run's L1 coefficient)
    - ``dead_fraction``: share of latents with p = 0; ``frac_alive``: 1 - dead_fraction
    - ``dense_fraction`` = ``freq_over_10_percent``: share with p > 0.1;
      ``freq_over_1_percent``: share with p > 0.01
    - ``normalized_freq_over_1_percent`` / ``normalized_freq_over_10_percent``: Σ p over the
      latents with p above 1% / 10%, divided by Σ p (0 when nothing fires)
    - ``fvu_level_1`` ... ``fvu_level_n`` (a Matryoshka's, ``widths`` its inner levels' sizes):
      the FVU of each inner level's reconstruction from its first m latents' codes alone (the
      whole dictionary's is ``fvu``)
    """
    return evaluate_members([Judged(params, arch, k, widths)], x_ND, batch, scale)[0]


class Judged(NamedTuple):
    """One dictionary to evaluate: its parameters (on the rows' device), architecture, k, and
    a Matryoshka's inner levels' sizes (each level's FVU is reported: ``fvu_level_<i>``)."""

    params: Params
    arch: str = "untied"
    k: int = 0
    widths: tuple[int, ...] = ()


@torch.no_grad()
def evaluate_members(
    members: list[Judged], x_ND: torch.Tensor, batch: int = 4096, scale: float = 1.0
) -> list[tuple[dict[str, float], torch.Tensor]]:
    """:func:`evaluate_with_frequency` of every member of an ensemble (one dictionary size) in
    ONE pass over the rows (blocks of ``batch``, each block judged by every member in turn),
    the sums kept on the rows' device (float64) and read back once for all members."""
    n, _ = x_ND.shape
    blocks = range(0, n, batch)
    mean_D = _mean(x_ND, blocks, batch)
    n_sums = N_SUMS + max(len(m.widths) for m in members)  # (+ each level's squared error)
    sums = torch.zeros(len(members), n_sums, dtype=torch.float64, device=x_ND.device)
    spread = torch.zeros(3, dtype=torch.float64, device=x_ND.device)  # Σ‖x - mean‖², Σ‖x‖², rows
    fires: list[torch.Tensor | int] = [0] * len(members)
    for at in blocks:
        x = x_ND[at : at + batch]  # (b, D)
        var_b = (x - mean_D).pow(2).sum(dim=1)  # (b,) each row's squared distance to the mean
        spread += torch.stack(
            [var_b.sum(dtype=torch.float64), x.pow(2).sum(dtype=torch.float64), _off(var_b)]
        )
        for e, m in enumerate(members):
            block, on_F = _block_sums(m, x, var_b, scale)
            sums[e] += block
            fires[e] = fires[e] + on_F
    host, freq_EF = sums.cpu(), torch.stack(fires).double().cpu() / n  # type: ignore[arg-type]
    total_var, second_moment, off_mean = spread.tolist()
    total_var = _varies(total_var, second_moment)
    return [
        (_summary(h.tolist(), f, x_ND, total_var, off_mean, scale), f)
        for h, f in zip(host, freq_EF, strict=True)
    ]


def _off(var_b: torch.Tensor) -> torch.Tensor:
    """How many rows are not at the mean (the legacy explained variance's rows)."""
    return (var_b > 0).sum(dtype=torch.float64)


VARIANCE_FLOOR = 1e-12
"""Held-out rows whose variance around their mean is below this fraction of their second
moment do not vary (what is left is the mean's rounding): their FVU is NaN, not err / ~0."""


def _mean(x_ND: torch.Tensor, blocks: range, batch: int) -> torch.Tensor:
    """The rows' mean (D,), summed in float64 a block at a time (no float64 copy of them all),
    in their dtype."""
    total = sum(x_ND[at : at + batch].sum(dim=0, dtype=torch.float64) for at in blocks)
    return (total / x_ND.shape[0]).to(x_ND.dtype)  # type: ignore[union-attr]


def _varies(total_var: float, second_moment: float) -> float:
    """Σ‖x - mean‖² over the rows, or 0.0 when the rows do not vary (:data:`VARIANCE_FLOOR`)."""
    return total_var if total_var > VARIANCE_FLOOR * second_moment else 0.0


N_SUMS = 11
"""sq_err, l1, active, cos, l2_ratio, ||x_hat||^2, <x, x_hat>, err / var, the rows that are
not zero, ||x||, ||x_hat|| (summed over rows)."""


def _block_sums(
    m: Judged, x: torch.Tensor, var_b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_SUMS,) float64 sums of one block of rows (``var_b``: each row's ‖x - mean‖²), and each
    latent's firing count (F,). ``scale``: the rows' units per raw unit."""
    codes = sae.encode(m.params, x, m.arch, m.k)  # (b, F)
    x_hat = sae.decode(m.params, codes, m.arch)  # (b, D)
    dec = sae.decoder(m.params, m.arch) if m.widths else None  # (tied: computed, so only then)
    levels = [  # a Matryoshka's inner levels: the first w latents' reconstruction alone
        (codes[:, :w] @ dec[:w] + m.params["b_dec"] - x).pow(2).sum(dim=1).sum() for w in m.widths
    ]
    on_F = _fire_counts(codes)  # (F,)
    err = (x_hat - x).pow(2).sum(dim=1)  # (b,)
    norm_in = x.norm(dim=1)  # (b,)
    norm_out = x_hat.norm(dim=1)  # (b,)
    dot = (x * x_hat).sum(dim=1)  # (b,)
    cos = dot / (norm_in.clamp_min(COS_EPS) * norm_out.clamp_min(COS_EPS))  # (b,)
    tiny = norm_in < L2_RATIO_MIN_NORM * scale  # (b,) as SAEBench's guard, in raw units
    ratio = norm_out / torch.where(tiny, scale, norm_in)  # (b,)
    parts = [
        err.sum(),
        # = ‖f‖₁ (every architecture's codes are >= 0, a test holds them to it); by row, then
        # over the rows: one sum of b x F values would split between threads (sweep.sums)
        codes.sum(dim=1).sum(),
        on_F.sum(),
        cos.sum(),  # (0 on a zero row: left out of the mean by the count at the end)
        ratio.sum(),
        norm_out.pow(2).sum(),
        dot.sum(),
        # SAEBench's per-row explained variance (legacy), summed over rows not at the mean
        torch.where(var_b > 0, err / var_b, 0.0).sum(),
        (norm_in > 0).sum(),  # the rows with a direction (cossim's)
        norm_in.sum(),
        norm_out.sum(),
        *levels,
    ]
    return torch.stack([p.double() for p in parts]), on_F


FIRE_ROWS = 128
"""On the CPU, firing counts are summed this many rows at a time: a column sum over a whole
block of rows leaves the cache for every row (4x slower at 4096 x 8192, 2 cores)."""


def _fire_counts(codes_bF: torch.Tensor) -> torch.Tensor:
    """How many rows each latent fires on: (F,) int64."""
    if codes_bF.device.type != "cpu":
        return (codes_bF != 0).sum(dim=0)
    rows = range(0, codes_bF.shape[0], FIRE_ROWS)
    parts = [(codes_bF[i : i + FIRE_ROWS] != 0).sum(dim=0, dtype=torch.int32) for i in rows]
    return torch.stack(parts).sum(dim=0, dtype=torch.int64)


def _summary(
    sums: list[float],
    freq: torch.Tensor,
    x_ND: torch.Tensor,
    total_var: float,
    off_mean: float,
    scale: float,
) -> dict:
    """The metrics of one member from its row sums and firing frequencies (``off_mean``: how
    many rows are not at the rows' mean; ``scale``: the rows' units per raw unit)."""
    sq_err, l1, active, cos_sum, ratio_sum, out_sq, dot_sum, err_over_var, nonzero = sums[:9]
    norm_in, norm_out = sums[9:N_SUMS]
    n = x_ND.shape[0]
    varies = total_var > 0
    fvu = sq_err / total_var if varies else math.nan
    out = {
        "mse": sq_err / x_ND.numel(),
        "fvu": fvu,
        "l1_norm": l1 / n,
        "l0": active / n,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
        "eval_rows": n,
        "metrics_version": METRICS_VERSION,
        "explained_variance": 1.0 - fvu,
        "explained_variance_legacy": 1.0 - err_over_var / off_mean if varies else math.nan,
        "cossim": cos_sum / nonzero if nonzero else math.nan,
        "l2_ratio": ratio_sum / n,
        "l2_norm_in": norm_in / n / scale,  # (raw units, as SAEBench's)
        "l2_norm_out": norm_out / n / scale,
        "relative_reconstruction_bias": out_sq / dot_sum if abs(dot_sum) > 1e-12 else math.nan,
        **density_summary(freq),
        **{  # (a Matryoshka's: each inner level's FVU, the first 1-based; the whole's is fvu)
            f"fvu_level_{i}": err / total_var if varies else math.nan
            for i, err in enumerate(sums[N_SUMS:], 1)
        },
    }
    if not math.isfinite(l1):  # NaN or inf codes (a diverged run's) "fire": counts mean nothing
        out.update(dict.fromkeys(CODE_COUNTS, math.nan))
    return out


CODE_COUNTS = (
    "l1_norm",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "frac_alive",
    "freq_over_1_percent",
    "freq_over_10_percent",
    "normalized_freq_over_1_percent",
    "normalized_freq_over_10_percent",
)
"""The metrics counted from the codes, NaN when some code is not finite."""


def density_summary(freq_F: torch.Tensor) -> dict[str, float]:
    """SAEBench's latent-density scalars of firing frequencies ``freq_F`` (F,)."""
    freq = freq_F.double()
    total = float(freq.sum())
    out = {"frac_alive": float((freq > 0).double().mean())}
    for pct in (1, 10):
        over = freq > pct / 100
        out[f"freq_over_{pct}_percent"] = float(over.double().mean())
        out[f"normalized_freq_over_{pct}_percent"] = (
            float(freq[over].sum()) / total if total > 0 else 0.0
        )
    return out


def ground_truth_metrics(
    params: Params, gt_GD: torch.Tensor, arch: str = "untied"
) -> dict[str, float]:
    """``gt_mmcs``: mean over true features of the max cosine to any decoder row;
    ``gt_recovered``: the fraction of true features with max cosine > 0.9."""
    best = mmcs(gt_GD.float(), sae.decoder(params, arch).float())  # (G,)
    return {
        "gt_mmcs": float(best.mean()),
        "gt_recovered": float((best > RECOVERED_THRESHOLD).double().mean()),
    }
