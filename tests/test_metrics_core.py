"""SAEBench-style core metrics of :func:`sweep.metrics.evaluate_with_frequency` on hand-made
dictionaries whose answers are known, and against a direct whole-array computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sweep import metrics, sae
from sweep.finalize import health_note

D = 8
OLD = {"mse", "fvu", "l1_norm", "l0", "dead_fraction", "dense_fraction", "eval_rows"}
OLD |= {"metrics_version"}
CORE = {
    "explained_variance",
    "explained_variance_legacy",
    "cossim",
    "l2_ratio",
    "l2_norm_in",
    "l2_norm_out",
    "relative_reconstruction_bias",
    "frac_alive",
    "freq_over_1_percent",
    "freq_over_10_percent",
    "normalized_freq_over_1_percent",
    "normalized_freq_over_10_percent",
}


def split_identity(d: int = D, gain: float = 1.0) -> sae.Params:
    """relu(x) - relu(-x) = x: latents 2d; ``x_hat = gain * x``."""
    eye = torch.eye(d)
    return {
        "W_enc": torch.cat([eye, -eye], 1),  # (D, 2D)
        "b_enc": torch.zeros(2 * d),
        "W_dec": gain * torch.cat([eye, -eye], 0),  # (2D, D)
        "b_dec": torch.zeros(d),
    }


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, D, generator=g) * 2 + 1
    return x - x.mean(0)  # centred: sum ||x||^2 is the total variance


def test_names_are_added_not_changed(x):
    m, freq = metrics.evaluate_with_frequency(split_identity(), x)
    assert set(m) == OLD | CORE
    assert freq.dtype == torch.float64 and freq.shape == (2 * D,)


def test_perfect_reconstruction(x):
    m = metrics.evaluate(split_identity(), x, batch=64)
    assert m["mse"] == pytest.approx(0, abs=1e-12) and m["fvu"] == pytest.approx(0, abs=1e-12)
    for name in ("explained_variance", "cossim", "l2_ratio", "relative_reconstruction_bias"):
        assert m[name] == pytest.approx(1.0, abs=1e-6), name
    assert m["l0"] == D  # one of each +/- pair fires for every (non-zero) coordinate
    assert m["l1_norm"] == pytest.approx(float(x.abs().sum(1).mean()), rel=1e-6)
    # every latent fires on about half of the rows
    assert m["frac_alive"] == 1.0 and m["dead_fraction"] == 0.0
    assert m["freq_over_1_percent"] == m["freq_over_10_percent"] == m["dense_fraction"] == 1.0
    assert m["normalized_freq_over_1_percent"] == m["normalized_freq_over_10_percent"] == 1.0


def test_half_reconstruction_shrinks(x):
    m = metrics.evaluate(split_identity(gain=0.5), x, batch=64)
    assert m["l2_ratio"] == pytest.approx(0.5, rel=1e-6)
    # SAEBench (Gated SAE paper eq. 10): E||x_hat||^2 / E<x, x_hat> = 0.25 / 0.5
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-6)
    assert m["cossim"] == pytest.approx(1.0, abs=1e-6)  # direction is right
    assert m["fvu"] == pytest.approx(0.25, rel=1e-5)  # ||x/2||^2 over ||x||^2 (x centred)
    assert m["explained_variance"] == pytest.approx(0.75, rel=1e-5)
    assert m["explained_variance_legacy"] == pytest.approx(0.75, rel=1e-5)  # every row: 1 - 1/4
    assert m["mse"] == pytest.approx(0.25 * float(x.pow(2).mean()), rel=1e-5)


def test_overshoot_and_flipped_reconstruction(x):
    m = metrics.evaluate(split_identity(gain=2.0), x)
    assert m["l2_ratio"] == pytest.approx(2.0, rel=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(2.0, rel=1e-6)
    flipped = metrics.evaluate(split_identity(gain=-1.0), x)
    assert flipped["cossim"] == pytest.approx(-1.0, abs=1e-6)
    assert flipped["relative_reconstruction_bias"] == pytest.approx(-1.0, rel=1e-6)
    assert flipped["explained_variance"] == pytest.approx(-3.0, rel=1e-5)  # ||2x||^2 / ||x||^2


def test_zero_reconstruction(x):
    dead = {**split_identity(), "W_enc": torch.zeros(D, 2 * D)}
    m = metrics.evaluate(dead, x)
    assert m["cossim"] == 0.0 and m["l2_ratio"] == 0.0
    assert math.isnan(m["relative_reconstruction_bias"])  # 0 / 0
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-6)  # x centred
    assert m["frac_alive"] == 0.0 and m["freq_over_1_percent"] == 0.0
    assert m["normalized_freq_over_1_percent"] == m["normalized_freq_over_10_percent"] == 0.0


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_codes_that_are_not_finite_count_nothing(x, bad):
    """A diverged run's NaN or inf codes "fire" on every row: its code counts are NaN (a value
    with no meaning), not an L0 of the dictionary size and every latent alive."""
    diverged = {**split_identity(), "b_enc": torch.full((2 * D,), bad)}
    m = metrics.evaluate(diverged, x)
    assert all(math.isnan(m[name]) for name in metrics.CODE_COUNTS), m
    assert set(metrics.CODE_COUNTS) <= OLD | CORE


def test_legacy_explained_variance_leaves_out_a_row_at_the_mean():
    """SAEBench's per-row formula divides by the row's distance to the mean: a row exactly
    there has none (was inf); the metric is the mean over the other rows."""
    x = torch.zeros(3, D)
    x[0, 0], x[1, 0] = 1.0, -1.0  # mean 0: the last row is at it
    m = metrics.evaluate(split_identity(gain=0.5), x)
    assert m["explained_variance_legacy"] == pytest.approx(0.75)  # rows 1, 2: 1 - 1/4 each
    assert m["explained_variance"] == pytest.approx(0.75)  # 0.5 / 2 unexplained


def test_l2_ratio_divides_tiny_inputs_by_one():
    c = torch.tensor([3.0, 4.0])  # every row reconstructs to c (||c|| = 5)
    const = {
        "W_enc": torch.zeros(2, 3),
        "b_enc": torch.zeros(3),
        "W_dec": torch.ones(3, 2),
        "b_dec": c,
    }
    x = torch.tensor([[0.0, 0.0], [0.0, 10.0]])  # norms 0 (guarded) and 10
    m = metrics.evaluate(const, x)
    assert m["l2_ratio"] == pytest.approx((5 / 1 + 5 / 10) / 2)
    assert m["cossim"] == pytest.approx(0.8)  # a zero row has no direction: left out
    assert math.isnan(metrics.evaluate(const, torch.zeros(2, 2))["cossim"])  # (no row has one)
    # the same rows and reconstructions in training units (x 1000): the guard is in raw units,
    # so l2_ratio is what SAEBench gets from the exported (raw-space) SAE
    scaled = {**const, "b_dec": c * 1000}
    raw_units = metrics.evaluate(scaled, x * 1000, scale=1000)
    assert raw_units["l2_ratio"] == pytest.approx(m["l2_ratio"])
    assert m["l2_norm_in"] == raw_units["l2_norm_in"] == pytest.approx(5.0)  # (0 + 10) / 2
    assert m["l2_norm_out"] == raw_units["l2_norm_out"] == pytest.approx(5.0)
    tiny = torch.tensor([[5e-5, 0.0], [0.0, 10.0]])  # raw norm 5e-5 (guarded), 0.05 scaled
    want = metrics.evaluate(const, tiny)["l2_ratio"]
    assert want == pytest.approx((5 / 1 + 5 / 10) / 2)
    assert metrics.evaluate(scaled, tiny * 1000, scale=1000)["l2_ratio"] == pytest.approx(want)


def test_rows_that_do_not_vary_have_no_fvu():
    """FVU divides by the rows' variance: held-out rows that are all one vector have none (a
    float32 mean's rounding is left), so FVU is NaN instead of err / ~0."""
    row = torch.tensor([0.1, 3.7, -2.3, 1e3, 0.3, 7.1, -0.9, 5.5])
    x = row.expand(1000, D).contiguous()
    near = {**split_identity(), "W_enc": torch.zeros(D, 2 * D), "b_dec": row + 1e-2}  # x̂ = b_dec
    m = metrics.evaluate(near, x, batch=128)
    assert math.isnan(m["fvu"]) and math.isnan(m["explained_variance"])
    assert math.isnan(m["explained_variance_legacy"])
    assert m["mse"] == pytest.approx(1e-4, rel=0.05)
    assert "no FVU: the held-out rows do not vary" in health_note(m)  # its features are dead
    # a real spread, however small against the mean, still has an FVU
    varied = x.clone()
    varied[::2, 0] += 1e-2
    assert metrics.evaluate(near, varied)["fvu"] > 0


def test_health_notes_name_the_fix_of_the_architecture():
    dead = {"dead_fraction": 1.0, "fvu": 1.0, "l0": 0.0}
    assert health_note(dead).endswith("% of features dead); lower l1")
    rare = health_note({"dead_fraction": 0.05, "fvu": 1.07, "l0": 0.047})  # (not "5% dead" alone)
    assert "L0 0.047, almost no latent fires: 5% of features dead, the others rarely)" in rare
    assert health_note(dead, "jumprelu").endswith("dead); lower l1 (its L0 coefficient)")
    assert health_note(dead, "topk").endswith(  # (AuxK is on by default: its window matters)
        "lower train.lr; AuxK (train.auxk_alpha > 0) revives latents once silent for "
        "train.dead_tokens rows: lower train.dead_tokens for it to act sooner"
    )
    for arch in ("untied", "topk"):  # a step size too large, the loss still finite
        wild = health_note({"dead_fraction": 0.2, "fvu": 2.3e5, "l0": 40.0}, arch)
        assert wild.startswith("reconstructs worse than the held-out rows' mean (FVU 2.3e+05")
        assert wild.endswith("training went wrong; lower train.lr")
    assert health_note({"dead_fraction": 0.2, "fvu": 0.3, "l0": 40.0}) == ""


def test_health_notes_fit_the_runs_l1():
    """Not "lower l1" at l1=0; not "lower train.lr" for an l1 so strong that no latent fires
    (its output is about b_dec, off the mean: a lower lr leaves it further off)."""
    dead = {"dead_fraction": 1.0, "fvu": 1.0, "l0": 0.0}
    for arch in ("untied", "jumprelu"):
        assert health_note(dead, arch, 0.0).endswith(
            "l1 is 0, so no penalty killed them: train with data.normalize=true if it was off "
            "(the defaults are set for rows of norm sqrt(width)), or lower train.lr"
        )
        assert health_note(dead, arch, 1e-2).startswith("dead dictionary") and "lower l1" in (
            health_note(dead, arch, 1e-2)
        )
    firing = {"dead_fraction": 0.0, "fvu": 1.03, "l0": 1.24}  # (not "dead" beside "0% dead")
    assert health_note(firing, "untied", 1e-1) == (
        "useless dictionary: it explains 0.0% of the variance (FVU 1.03, L0 1.24, 0% of "
        "features dead); lower l1"
    )
    silent = {"dead_fraction": 0.9, "fvu": 1.17, "l0": 0.09}
    assert health_note(silent, "untied", 30.0) == (
        "reconstructs worse than the held-out rows' mean (FVU 1.17, L0 0.09): almost no latent "
        "fires: l1 is too strong here; lower l1"
    )
    assert health_note(silent, "untied", 0.0).endswith("training went wrong; lower train.lr")
    assert health_note(silent, "topk").endswith("training went wrong; lower train.lr")
    on_axis = health_note(silent, "topk", lr_axis=True)  # (grid.lr: its rate is the grid's)
    assert on_axis.endswith("training went wrong; lower its grid.lr value")


def test_density_fractions_of_known_frequencies():
    """Latent 0 fires on 50% of rows, 1 on 5%, 2 on 0.5%, 3 never."""
    n = 1000
    x = torch.zeros(n, 4)
    x[:500, 0] = 1.0
    x[500:550, 1] = 1.0
    x[550:555, 2] = 1.0
    x[555:, 0] = -1.0  # relu: nothing fires
    eye = {"W_enc": torch.eye(4), "b_enc": torch.zeros(4), "W_dec": torch.eye(4), "b_dec": torch.zeros(4)}  # fmt: skip
    m, freq = metrics.evaluate_with_frequency(eye, x, batch=128)
    assert freq.tolist() == pytest.approx([0.5, 0.05, 0.005, 0.0])
    assert m["frac_alive"] == 0.75 and m["dead_fraction"] == 0.25
    assert m["freq_over_1_percent"] == 0.5
    assert m["freq_over_10_percent"] == m["dense_fraction"] == 0.25
    assert m["normalized_freq_over_1_percent"] == pytest.approx(0.55 / 0.555)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.555)
    assert m["l0"] == pytest.approx(0.555)
    assert metrics.density_summary(torch.zeros(5)) == {
        "frac_alive": 0.0,
        "freq_over_1_percent": 0.0,
        "normalized_freq_over_1_percent": 0.0,
        "freq_over_10_percent": 0.0,
        "normalized_freq_over_10_percent": 0.0,
    }


def reference(params: sae.Params, x: torch.Tensor, arch: str, k: int) -> dict[str, float]:
    """The metrics from whole-array formulas, in float64 (independent of the batched pass)."""
    p64 = {n: v.double() for n, v in params.items()}
    x = x.double()
    codes = sae.encode(p64, x, arch, k)
    x_hat = sae.decode(p64, codes, arch)
    norm_in = x.norm(dim=1)
    freq = (codes != 0).double().mean(0)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {
        "mse": float((x_hat - x).pow(2).mean()),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "explained_variance_legacy": float(
            (1 - (x_hat - x).pow(2).sum(1) / (x - x.mean(0)).pow(2).sum(1)).mean()
        ),
        "cossim": float(F.cosine_similarity(x, x_hat, dim=1)[norm_in > 0].mean()),
        "l2_ratio": float((x_hat.norm(dim=1) / torch.where(norm_in < 1e-4, 1.0, norm_in)).mean()),
        "l2_norm_in": float(norm_in.mean()),
        "l2_norm_out": float(x_hat.norm(dim=1).mean()),
        "relative_reconstruction_bias": float(
            x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean()
        ),
        "l0": float((codes != 0).double().sum(1).mean()),
        "l1_norm": float(codes.abs().sum(1).mean()),
        "frac_alive": float((freq > 0).double().mean()),
        "freq_over_1_percent": float((freq > 0.01).double().mean()),
        "freq_over_10_percent": float((freq > 0.1).double().mean()),
    }


@pytest.mark.parametrize(("arch", "k"), [("untied", 0), ("topk", 3)])
def test_batched_pass_matches_whole_array_formulas(arch, k):
    g = torch.Generator().manual_seed(1)
    f = 4 * D
    params = sae.init_params(arch, D, f, g)
    params["b_enc"] = torch.randn(f, generator=g) * 0.3
    params["b_dec"] = torch.randn(D, generator=g) * 0.1
    x = torch.randn(1000, D, generator=g) + 0.5
    ref = reference(params, x, arch, k)
    for batch in (4096, 97):  # one block, and uneven blocks
        m = metrics.evaluate(params, x, batch=batch, arch=arch, k=k)
        for name, want in ref.items():
            assert m[name] == pytest.approx(want, rel=1e-4, abs=1e-6), (batch, name)
    if arch == "topk":
        assert 0 < m["l0"] <= k


def test_a_matryoshkas_levels_have_their_own_fvu():
    """Each inner level's FVU from its first m latents' inference codes alone, written out;
    the whole dictionary's stays ``fvu``; no levels, no such metric."""
    g = torch.Generator().manual_seed(2)
    f = 4 * D
    params = sae.init_params("matryoshka", D, f, g)
    params["b_enc"] = torch.randn(f, generator=g) * 0.3
    params["threshold"] = torch.tensor(0.2)
    x = torch.randn(1000, D, generator=g) + 0.5
    codes = sae.encode(params, x, "matryoshka")
    var = (x - x.mean(0)).pow(2).sum()
    m = metrics.evaluate(params, x, batch=97, arch="matryoshka", widths=(2, 5))
    for i, w in enumerate((2, 5), 1):
        err = (codes[:, :w] @ params["W_dec"][:w] + params["b_dec"] - x).pow(2).sum()
        assert m[f"fvu_level_{i}"] == pytest.approx(float(err / var), rel=1e-5)
    assert "fvu_level_3" not in m and m["fvu"] != m["fvu_level_2"]
    assert not any(
        k.startswith("fvu_level") for k in metrics.evaluate(params, x, arch="matryoshka")
    )


def test_fire_counts_match_a_plain_count_for_any_number_of_rows():
    torch.manual_seed(0)
    for rows in (1, 127, 128, 300):
        codes = F.relu(torch.randn(rows, 17))
        want = (codes != 0).sum(dim=0)
        got = metrics._fire_counts(codes)
        assert got.dtype == torch.int64 and torch.equal(got, want), rows
