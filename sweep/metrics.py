"""How dictionaries are judged: reconstruction, sparsity, feature health, ground truth.

All reconstruction metrics are computed on held-out rows (the store's evaluation window) in
the training space (activations times the store's scale); FVU does not depend on that scale.
"""

from __future__ import annotations

import torch

from sweep import sae
from sweep.sae import Params

DENSE_THRESHOLD = 0.1
RECOVERED_THRESHOLD = 0.9


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
        best_a[at : at + chunk] = sim.max(dim=1).values
        best_b = torch.maximum(best_b, sim.max(dim=0).values)
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


def evaluate(params: Params, x_ND: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """Final metrics of one SAE on evaluation rows ``x_ND`` (already scaled)."""
    return evaluate_with_frequency(params, x_ND, batch)[0]


@torch.no_grad()
def evaluate_with_frequency(
    params: Params, x_ND: torch.Tensor, batch: int = 4096
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`evaluate`'s metrics and each feature's firing frequency on ``x_ND``: (F,) float64."""
    n, _ = x_ND.shape
    sq_err = 0.0
    l1 = 0.0
    active = 0.0
    fires = None
    mean = x_ND.mean(dim=0)
    total_var = float((x_ND - mean).pow(2).sum())
    for at in range(0, n, batch):
        x = x_ND[at : at + batch]  # (b, D)
        codes = sae.encode(params, x)  # (b, F)
        sq_err += float((sae.decode(params, codes) - x).pow(2).sum())
        l1 += float(codes.sum())
        on = codes > 0
        active += float(on.sum())
        fires = on.sum(dim=0) if fires is None else fires + on.sum(dim=0)
    freq = fires.double() / n  # (F,)
    summary = {
        "mse": sq_err / x_ND.numel(),
        "fvu": sq_err / max(total_var, 1e-12),
        "l1_norm": l1 / n,
        "l0": active / n,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
        "eval_rows": n,
    }
    return summary, freq.cpu()


def ground_truth_metrics(params: Params, gt_GD: torch.Tensor) -> dict[str, float]:
    """``gt_mmcs``: mean over true features of the max cosine to any decoder row;
    ``gt_recovered``: the fraction of true features with max cosine > 0.9."""
    best = mmcs(gt_GD.float(), sae.decoder(params).float())  # (G,)
    return {
        "gt_mmcs": float(best.mean()),
        "gt_recovered": float((best > RECOVERED_THRESHOLD).double().mean()),
    }
