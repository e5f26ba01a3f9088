"""Every registered architecture: an ensemble equals K independently trained single SAEs
(params, buffers, Adam state, step counts), on the fast path and the vmapped one, with a
different k per member, AuxK switched on, and resampling events."""

from __future__ import annotations

import pytest
import torch

from sweep import archs, sae
from sweep.archs import Architecture, Hyper
from sweep.ensemble import DeadLatents, Ensemble, hyper_of, stack
from sweep.optim import Adam
from sweep.resample import resample
from tests import reference
from tests.reference import BETAS, EPS, LR

D, F, B = 12, 40, 64
VALUES = {"l1": [0.0, 1e-3, 3e-2], "k": [2, 5, 9]}


def arch_of(name: str) -> archs.Architecture:
    """``untied:weighted`` -> the untied architecture with its weighted recipe."""
    base, _, recipe = name.partition(":")
    return archs.get(base).configure(recipe or None)


def members(name: str, n: int) -> list[sae.Params]:
    a = arch_of(name)
    return [a.init_params(D, F, torch.Generator().manual_seed(s)) for s in range(n)]


def batches(n: int, seed: int = 123) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g) * 2 + 0.5 for _ in range(n)]


def knob_hyper(a: Architecture, vals: list, device: torch.device | str = "cpu") -> Hyper:
    """The hyper-parameters of members whose knob (``a``'s: l1 or k) takes ``vals``."""
    zeros = [0] * len(vals)
    return hyper_of(zeros, vals, device) if a.knob == "k" else hyper_of(vals, zeros, device)


def ensemble_of(
    name: str, init: list[sae.Params], fast: bool, dead: DeadLatents | None, **kw
) -> Ensemble:
    a = arch_of(name)
    hy = knob_hyper(a, VALUES[a.knob])
    return Ensemble(stack(init), hy, Adam(LR, BETAS, EPS), arch=a, fast=fast, dead=dead, **kw)


def assert_member_equal(ens: Ensemble, e: int, p: dict, opt: torch.optim.Adam, n: int) -> None:
    for k, v in ens.params.items():
        torch.testing.assert_close(v[e], p[k], rtol=2e-5, atol=2e-6)
        st = opt.state[opt.param_groups[0]["params"][list(p).index(k)]]
        torch.testing.assert_close(ens.state.exp_avg[k][e], st["exp_avg"], rtol=2e-4, atol=1e-7)
        torch.testing.assert_close(
            ens.state.exp_avg_sq[k][e], st["exp_avg_sq"], rtol=2e-4, atol=1e-9
        )
        assert float(ens.state.step[k][e]) == float(st["step"]) == n
    for k in ens.arch.buffers:
        torch.testing.assert_close(ens.buffers[k][e], p[k], rtol=2e-5, atol=2e-6)


CASES = [
    ("untied", True),
    ("untied", False),
    ("untied:weighted", True),
    ("untied:weighted", False),
    ("tied", True),
    ("tied", False),
    ("topk", True),
    ("topk", False),
    ("batchtopk", True),
    ("batchtopk", False),
    ("matryoshka", True),
    ("matryoshka", False),
    ("jumprelu", True),
    ("jumprelu", False),
    ("jumprelu:log", True),
    ("jumprelu:log", False),
    ("gated", True),
    ("gated", False),
]


@pytest.mark.parametrize("name, fast", CASES)
@pytest.mark.parametrize("auxk", [False, True])
def test_ensemble_equals_independent_training(name, fast, auxk):
    a = arch_of(name)
    if auxk and a.knob != "k":
        pytest.skip("AuxK belongs to the TopK family")
    dead = DeadLatents(dead_tokens=2 * B, auxk_alpha=0.5, k_aux=16) if auxk else None
    n, xs = len(VALUES[a.knob]), batches(25)
    init = members(name, n)
    for p in init:  # (at the tied start a row's lone code has a zero gradient, up to rounding
        p["b_enc"] += 0.01 * torch.randn(F, generator=torch.Generator().manual_seed(7))
    if auxk:  # that Adam's first step would make a step of lr: rounding's order would show)
        for p in init:
            p["b_enc"][:10] = -50.0  # latents that never win a top-k: dead, for AuxK to revive
    ens = ensemble_of(name, init, fast, dead)
    assert ens.fast == (fast and a.fast)
    for x in xs:
        ens.step(x)
    if auxk:
        n_dead = (ens.buffers["since_fired"] >= 2 * B).sum(dim=1)
        assert 0 < int(n_dead.max()) < 16, "AuxK never switched on, or its k never cut"
    for e, value in enumerate(VALUES[a.knob]):
        p, opt = reference.train_single(a, init[e], value, xs, dead)
        assert_member_equal(ens, e, p, opt, len(xs))


@pytest.mark.parametrize("fast", [True, False])
def test_gradient_clipping_is_per_member(fast):
    """``train.grad_clip``: each member clipped as clip_grad_norm_ clips it alone."""
    init, xs = members("untied:weighted", 3), batches(15)
    ens = ensemble_of("untied:weighted", init, fast, None, grad_clip=0.05)
    for x in xs:
        ens.step(x)
    a = arch_of("untied:weighted")
    for e, value in enumerate(VALUES["l1"]):
        p, opt = reference.train_single(a, init[e], value, xs, grad_clip=0.05)
        assert_member_equal(ens, e, p, opt, len(xs))
    free, _ = reference.train_single(a, init[0], VALUES["l1"][0], xs)
    assert not torch.allclose(free["W_enc"], ens.params["W_enc"][0])  # clipping did act


LRS = (1e-3, 3e-3, 1e-2)


@pytest.mark.parametrize("name, fast", [("untied", True), ("untied", False), ("topk", True)])
def test_members_with_their_own_learning_rates_train_as_each_would_alone(name, fast):
    """``grid.lr``: each member steps at its own learning rate, as a single SAE with that
    ``torch.optim.Adam`` lr; one knob value for all, so only the rates tell members apart."""
    a = arch_of(name)
    value, xs, init = VALUES[a.knob][1], batches(15), members(name, len(LRS))
    ens = Ensemble(
        stack(init), knob_hyper(a, [value] * len(LRS)), Adam(LRS, BETAS, EPS), arch=a, fast=fast
    )
    for x in xs:
        ens.step(x, lr_scale=0.5)
    for e, lr in enumerate(LRS):
        p, opt = reference.train_single(a, init[e], value, xs, lr=lr * 0.5)
        assert_member_equal(ens, e, p, opt, len(xs))


def test_weighted_recipe_keeps_a_free_decoder_started_small():
    ens = ensemble_of("untied:weighted", members("untied:weighted", 3), True, None)
    norms = ens.params["W_dec"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.1))
    for x in batches(10):
        ens.step(x)
    assert float((ens.params["W_dec"].norm(dim=-1) - 0.1).abs().max()) > 1e-3


def test_auxk_changes_training_only_once_latents_are_dead():
    init, xs = members("topk", 3), batches(12)
    for p in init:
        p["b_enc"][:10] = -50.0
    plain = ensemble_of("topk", init, True, None)
    late = ensemble_of("topk", init, True, DeadLatents(10**9, 0.5, 6))  # nothing dies in time
    early = ensemble_of("topk", init, True, DeadLatents(B, 0.5, 6))
    for x in xs:
        for ens in (plain, late, early):
            ens.step(x)
    assert torch.equal(plain.params["W_enc"], late.params["W_enc"])
    assert not torch.equal(plain.params["W_enc"], early.params["W_enc"])


@pytest.mark.parametrize("name", ["untied", "untied:weighted", "tied", "gated"])
def test_resampling_equals_independent_resampling(name):
    dead, xs = DeadLatents(dead_tokens=2 * B), batches(24)
    l1s = [0.0, 1e-3, 3e-2]
    init = members(name, 3)
    for p in init:
        p["b_enc"][:10] = -50.0  # latents that never fire: dead, to be resampled
    a = arch_of(name)
    ens = Ensemble(stack(init), hyper_of(l1s, [0] * 3), Adam(LR, BETAS, EPS), arch=a, dead=dead)
    events = 0
    for step, x in enumerate(xs, 1):
        ens.step(x)
        if step % 6 == 0:
            events += sum(resample(ens, x, step, 0, [0, 1, 2]))
    assert events > 0, "no latent died: the test does not exercise resampling"
    for e, l1 in enumerate(l1s):
        p, opt = reference.train_single(a, init[e], l1, xs, dead, resample_every=6, run_seed=e)
        assert_member_equal(ens, e, p, opt, len(xs))


def test_a_resampled_weighted_decoder_row_has_the_alive_rows_norm():
    """The weighted recipe's decoder rows are free (near 0.1 at init) and weight the L1: a
    resampled row at unit norm would pay ~10x their penalty."""
    from sweep.resample import resample_member

    a = arch_of("untied:weighted")
    p, x = members("untied:weighted", 1)[0], batches(1)[0]
    dead = torch.zeros(F, dtype=torch.bool)
    dead[:5] = True
    want = float(p["W_dec"][~dead].norm(dim=1).mean())
    assert resample_member(a, p, [], x, dead, torch.Generator().manual_seed(0)) == 5
    torch.testing.assert_close(p["W_dec"][:5].norm(dim=1), torch.full((5,), want))


def selection_cases() -> list[tuple[str, torch.Tensor, list[int]]]:
    """(E, B, F) pre-activations: continuous, BatchTopK ties at the threshold, mostly negative
    (fewer positive codes than k*B), and k*B past the batch."""
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(4, 64, 40, generator=g) * 2 + 0.3
    ties = (pre * 2).round() / 2  # many equal values
    negative = pre - 4.0
    return [
        ("topk", pre, [1, 3, 7, 40]),
        ("batchtopk", pre, [1, 3, 7, 40]),
        ("batchtopk", ties, [1, 3, 7, 9]),
        ("batchtopk", negative, [5, 9, 20, 40]),
    ]


@pytest.mark.parametrize("case", range(4))
def test_batched_selection_equals_the_single_member_math(case):
    """The fast path's two selections (one top-kmax for all members: GPUs; each member at its
    own k: CPU) keep exactly the codes :meth:`activate` keeps."""
    name, pre, ks = selection_cases()[case]
    a, k_E = archs.get(name), torch.tensor(ks)
    want = torch.stack(
        [a.activate(p, {"k": k}, {}, max(ks)) for p, k in zip(pre, k_E, strict=True)]
    )
    together, each = pre.clone(), pre.clone()
    a.keep_all(together, k_E, max(ks))
    a.keep_each(each, ks)
    assert torch.equal(together, want) and torch.equal(each, want)


def test_batchtopk_threshold_is_the_running_smallest_kept_code():
    ens = ensemble_of("batchtopk", members("batchtopk", 3), True, None)
    assert (ens.buffers["threshold"] < 0).all()  # not measured yet
    ens.step(batches(1)[0])
    assert (ens.buffers["threshold"] > 0).all()


def test_batchtopk_threshold_keeps_k_codes_per_row_at_inference():
    """The threshold follows the smallest kept code as it falls during training (it lagged
    at SAELens's 0.99: inference kept a third to two thirds of k after 80 steps)."""
    ens = ensemble_of("batchtopk", members("batchtopk", 3), True, None)
    for x in batches(80):
        ens.step(x)
    p = {k: v.clone() for k, v in ens.params.items()}
    p["threshold"] = ens.buffers["threshold"]
    x = torch.cat(batches(8, seed=7))
    for e, k in enumerate(VALUES["k"]):
        member = {name: v[e] for name, v in p.items()}
        l0 = float((sae.encode(member, x, "batchtopk", k=k) != 0).sum(dim=1).float().mean())
        assert 0.85 * k <= l0 <= 1.15 * k, (k, l0)


def test_inference_codes_follow_the_architecture():
    x = batches(1)[0]
    for name in archs.REGISTRY:
        p = members(name, 1)[0]
        if "threshold" in archs.get(name).buffers:  # batchtopk, matryoshka
            p["threshold"] = torch.tensor(0.5)
        codes = sae.encode(p, x, name, k=3)
        assert codes.shape == (B, F) and bool((codes >= 0).all()), name
        if name == "topk":
            assert int((codes != 0).sum(dim=1).max()) <= 3
        if "threshold" in archs.get(name).buffers:
            pre = archs.get(name).pre(p, x)
            assert torch.equal(codes != 0, pre > 0.5)


def test_evaluation_codes_are_the_inference_codes_bit_for_bit():
    """Without autograd (an evaluation) the codes are made in place, in one buffer: the same
    bits as the plain pre-activations and inference, for every architecture."""
    x = batches(1)[0] * 3.0
    for name in archs.REGISTRY:
        p = members(name, 1)[0]
        p["b_enc"] = torch.randn(F)
        if "threshold" in archs.get(name).buffers:
            p["threshold"] = torch.tensor(0.5)
        a = archs.get(name)
        plain = a.infer(a.pre(p, x), 3, p)
        with torch.no_grad():
            assert torch.equal(sae.encode(p, x, name, k=3), plain), name


def test_unknown_architecture_is_one_line():
    with pytest.raises(Exception, match="unknown architecture sae='nope'; choose one of"):
        archs.get("nope")


def test_jumprelu_warns_when_its_thresholds_cannot_reach_the_codes():
    """Adam moves a parameter ~lr a step: a log threshold from 1e-3 needs ~1500 steps at lr
    3e-3 to reach the codes' scale, a linear one from 0.01 thirty."""
    log, linear = (arch_of(f"jumprelu:{r}") for r in ("log", "linear"))
    short = log.check_schedule(126, 3e-3)
    assert short is not None and "train for >= 1536 steps" in short, short
    assert "sae.recipe=linear" in short
    assert log.check_schedule(5000, 3e-3) is None
    assert linear.check_schedule(126, 3e-3) is None
    assert "train for >= 30 steps" in str(linear.check_schedule(10, 3e-3))
    assert archs.get("topk").check_schedule(10, 3e-3) is None


def test_a_linear_jumprelu_threshold_is_kept_non_negative():
    """Projected after the step (below zero the gate would pass negative pre-activations);
    a frozen member is left as it is."""
    a = arch_of("jumprelu:linear")
    p = stack(members("jumprelu:linear", 2))
    p["threshold"][:, :5] = -0.25
    a.constrain(p, torch.tensor([True, False]))
    assert float(p["threshold"][0].min()) == 0.0 and float(p["threshold"][1].min()) == -0.25
    assert "log_threshold" in members("jumprelu:log", 1)[0]


def test_a_log_recipe_jumprelu_sae_has_a_threshold_as_the_linear_one():
    """``SAE.threshold`` reads exp(log_threshold): the form the export writes for SAELens."""
    p = members("jumprelu:log", 1)[0]
    model = sae.SAE(p, {"architecture": "jumprelu", "recipe": "log"})
    torch.testing.assert_close(model.threshold, p["log_threshold"].exp())
    assert "threshold" not in dict(model.named_buffers())  # (derived, not saved twice)
    assert not hasattr(sae.SAE(members("untied", 1)[0], {"architecture": "untied"}), "threshold")


@pytest.mark.parametrize(
    "name, fast",
    [
        ("untied", True),
        ("topk", True),
        ("batchtopk", True),
        ("matryoshka", True),
        ("tied", True),
        ("tied", False),
        ("gated", True),
    ],
)
def test_a_member_trains_alone_as_it_does_in_an_ensemble(name, fast):
    """Bit for bit, on two threads, with gradient clipping, at a size where MKL splits one
    GEMM's reduction and torch one sum between threads: a run trained alone (repaired, split
    off, a grid point of its own) equals the same run trained with ensemble-mates — weights,
    and the logged loss and FVU, on any thread count (sweep sets MKL_CBWR; per-member sums,
    sweep.sums, also in the vmapped reference; the fast path's matrix-vector products are
    sums, not a one-member gemv)."""
    import os

    assert os.environ.get("MKL_CBWR") == "AUTO,STRICT"
    a, threads = arch_of(name), torch.get_num_threads()
    init = [a.init_params(128, 1024, torch.Generator().manual_seed(s)) for s in range(3)]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(512, 128, generator=g) * 2 + 0.5 for _ in range(4)]
    vals = VALUES[a.knob]

    # TopK-style: AuxK from the second step on (every latent silent for 512 rows counts dead)
    dead = DeadLatents(512, 0.5, 64) if a.knob == "k" else None

    def trained(idx: list[int], n_threads: int) -> tuple[sae.Params, torch.Tensor]:
        v = [vals[i] for i in idx]
        hy = knob_hyper(a, v)
        opt, inits = Adam(LR, BETAS, EPS), stack([init[i] for i in idx])
        ens = Ensemble(inits, hy, opt, arch=a, fast=fast, grad_clip=1e-2, dead=dead)
        torch.set_num_threads(n_threads)
        try:
            parts = [ens.step(x) for x in xs]
        finally:
            torch.set_num_threads(threads)
        return ens.params, torch.stack([torch.stack([p.loss, p.fvu]) for p in parts])

    (together, logged3), (alone, logged1) = trained([0, 1, 2], 2), trained([1], 2)
    for k, v in together.items():
        assert torch.equal(v[1], alone[k][0]), k
    assert torch.equal(logged3[..., 1], logged1[..., 0])  # loss and fvu, AuxK's too
    _, logged_1_thread = trained([1], 1)  # the training curve of a run resumed elsewhere
    assert torch.equal(logged_1_thread, logged1)


def test_matryoshka_loss_is_the_mean_of_its_levels_mse():
    """Written out independently: the codes BatchTopK chose over the whole dictionary, each
    level reconstructing from its first m latents alone, the MSEs averaged; AuxK's residual is
    the whole dictionary's. No levels: BatchTopK, bit for bit (its loss and gradients)."""
    a, x = archs.get("matryoshka"), batches(1)[0]
    p = {k: v.requires_grad_(True) for k, v in members("matryoshka", 1)[0].items()}
    hy = reference.hyper(a, 5)
    loss, (parts, codes) = sae.loss_fn(p, x, hy, arch=a, kmax=5)
    assert a.inner_widths(F) == [1, 4, 9, 19]
    by_hand = torch.stack(
        [((codes[:, :m] @ p["W_dec"][:m] + p["b_dec"] - x) ** 2).mean() for m in (1, 4, 9, 19, F)]
    ).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts.mse, ((codes @ p["W_dec"] + p["b_dec"] - x) ** 2).mean())
    flat, plain = a.configure(levels=[]), archs.get("batchtopk")
    grads = []
    for arch in (flat, plain):
        q = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
        out, _ = sae.loss_fn(q, x, hy, arch=arch, kmax=5)
        out.backward()
        grads.append([out.detach(), *(v.grad for v in q.values())])
    assert all(torch.equal(u, v) for u, v in zip(*grads, strict=True))


def test_matryoshka_levels_are_checked_against_each_dictionary_size():
    a = archs.get("matryoshka").configure(levels=[0.25, 0.5])
    assert a.inner_widths(64) == [16, 32] and a.check_levels(64) is None
    assert "are [0, 1] latents" in a.check_levels(2)
    assert "are [1, 1] latents" in a.configure(levels=[0.2, 0.3]).check_levels(4)
    assert "are [2, 4] latents" in a.configure(levels=[0.6, 0.9]).check_levels(4)  # (4 = F)


def test_gated_loss_is_the_papers_with_a_frozen_decoder_in_its_auxiliary_term():
    """Written out independently (Rajamanoharan et al. 2024, weight sharing): the gate picks
    the features, the magnitude path sets them; the step has no gradient, so the gate's bias
    learns only from the L1 and the auxiliary reconstruction, whose decoder is a frozen copy."""
    a = arch_of("gated")
    p = members("gated", 1)[0]
    g = torch.Generator().manual_seed(3)
    for name in ("b_enc", "r_mag", "b_mag"):
        p[name] = 0.3 * torch.randn(F, generator=g)
    x, l1 = batches(1)[0], 0.02
    mine = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    loss, (parts, codes) = sae.loss_fn(mine, x, {"l1": torch.tensor(l1)}, arch=a)
    loss.backward()

    ref = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    centred = x - ref["b_dec"]
    gate = centred @ ref["W_enc"] + ref["b_enc"]
    mag = centred @ (ref["W_enc"] * ref["r_mag"].exp()) + ref["b_mag"]
    f = (gate > 0).float() * torch.relu(mag)
    mse = ((f @ ref["W_dec"] + ref["b_dec"] - x) ** 2).mean()
    frozen = (torch.relu(gate) @ ref["W_dec"].detach() + ref["b_dec"].detach() - x) ** 2
    want = mse + l1 * torch.relu(gate).sum(dim=1).mean() + frozen.mean()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codes, f.detach(), rtol=1e-5, atol=1e-6)
    for k in p:
        torch.testing.assert_close(mine[k].grad, ref[k].grad, rtol=1e-4, atol=1e-6, msg=k)
    assert float(parts.l0) == float((f != 0).sum(dim=1).float().mean())


def test_a_gated_sae_encodes_raw_activations_as_it_trained():
    """The training scale folded in (sweep.sae.SAE): the gate and magnitudes act on the
    pre-activations, which folding leaves unchanged; its codes are the training codes."""
    p = members("gated", 1)[0]
    p["r_mag"], p["b_mag"] = torch.full((F,), 0.5), torch.full((F,), -0.1)
    s, x = 4.0, batches(1)[0]
    model = sae.SAE(p, {"architecture": "gated", "act_scale": s})
    assert {n for n, _ in model.named_buffers()} == {"r_mag", "b_mag"}
    torch.testing.assert_close(model.encode(x / s), sae.encode(p, x, "gated"), rtol=1e-5, atol=1e-6)


def test_a_resampled_gated_latent_starts_its_magnitude_path_again():
    """Its r_mag and b_mag (and their Adam moments) go back to 0, as at initialisation: the
    gate and the magnitudes start equal; the living latents keep theirs."""
    from sweep.resample import resample_member

    a, p = arch_of("gated"), members("gated", 1)[0]
    for name in ("r_mag", "b_mag"):
        p[name] = torch.full((F,), 0.7)
    moments = [{k: torch.ones_like(v) for k, v in p.items()} for _ in range(2)]
    dead = torch.zeros(F, dtype=torch.bool)
    dead[:5] = True
    n = resample_member(a, p, moments, batches(1)[0], dead, torch.Generator().manual_seed(0))
    assert n == 5
    for t in (p["r_mag"], p["b_mag"], *(m[k] for m in moments for k in ("r_mag", "b_mag"))):
        assert bool((t[:5] == 0).all()) and bool((t[5:] != 0).all())
