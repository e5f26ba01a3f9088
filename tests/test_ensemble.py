"""The ensemble's generic behaviour: loss parts, frozen diverged members, unit decoder rows,
bf16 compute (equality with independent training, per architecture: tests/test_archs.py)."""

from __future__ import annotations

import pytest
import torch

from sweep import archs, fastpath, sae
from sweep.ensemble import Ensemble, hyper_of, stack, vmapped_grads
from sweep.optim import Adam
from tests import reference

D, F, B = 12, 40, 64
L1 = [0.0, 1e-3, 3e-2, 1e-1]
LR, BETAS, EPS = 3e-3, (0.9, 0.999), 1e-8


def members(arch: str) -> list[sae.Params]:
    return [sae.init_params(arch, D, F, torch.Generator().manual_seed(s)) for s in range(len(L1))]


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(B, D, generator=g) * 2 + 0.5 for _ in range(n)]


def l1_hyper(values: list[float] = L1) -> dict[str, torch.Tensor]:
    return hyper_of(values, [0] * len(values))


def train_single(p0: sae.Params, l1: float, xs: list[torch.Tensor]):
    """A plain single SAE: autograd + torch.optim.Adam + decoder renormalisation."""
    return reference.train_single("untied", p0, l1, xs)


def test_fast_path_gradients_equal_vmap_reference():
    params = stack(members("untied"))
    params["b_dec"] = torch.randn(len(L1), D) * 0.3  # non-zero: exercises the centring terms
    params["b_enc"] = torch.randn(len(L1), F) * 0.1
    x = batches(1)[0]
    arch = archs.get("untied")
    g_fast, p_fast, _ = fastpath.grads(arch, params, x, l1_hyper())
    g_ref, (p_ref, _) = vmapped_grads(arch, 0, None, False)(params, x, l1_hyper(), None)
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k], rtol=1e-4, atol=1e-6)
    for a, b in zip(p_fast, p_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_parts_are_what_they_claim():
    p = members("untied")[0]
    x = batches(1)[0]
    hyper = {"l1": torch.tensor(0.01), "k": torch.tensor(0)}
    loss, (parts, _) = sae.loss_fn(p, x, hyper, arch=archs.get("untied"))
    codes = sae.encode(p, x)
    recon = sae.decode(p, codes)
    assert float(parts.mse) == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-5)
    assert float(parts.sparsity) == pytest.approx(float(codes.abs().sum(1).mean()), rel=1e-5)
    assert float(parts.l0) == pytest.approx(float((codes > 0).float().sum(1).mean()), rel=1e-6)
    fvu = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(parts.fvu) == pytest.approx(float(fvu), rel=1e-5)
    assert float(loss) == pytest.approx(float(parts.mse + 0.01 * parts.sparsity), rel=1e-6)


def test_diverged_member_is_frozen_and_others_train_on():
    init, xs = members("untied"), batches(12)
    ens = Ensemble(stack(init), l1_hyper(), Adam(LR, BETAS, EPS))
    for i, x in enumerate(xs):
        if i == 5:
            ens.hyper["l1"][2] = float("nan")  # member 2's loss turns NaN from step 6 on
            frozen = {k: v[2].clone() for k, v in ens.params.items()}
        ens.step(x)
    assert ens.active.tolist() == [True, True, False, True]
    for k, v in frozen.items():
        assert torch.equal(ens.params[k][2], v)  # untouched since divergence
        assert float(ens.state.step[k][2]) == 5  # its step count stopped
        assert float(ens.state.step[k][0]) == 12
    assert all(torch.isfinite(v).all() for v in ens.params.values())
    p, _ = train_single(init[0], L1[0], xs)  # the healthy members are unaffected
    torch.testing.assert_close(ens.params["W_enc"][0], p["W_enc"].detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("clip", [1.0, None])
def test_member_whose_gradients_overflow_is_frozen_though_its_loss_is_finite(clip):
    """At an absurd L1 the loss stays finite but the gradient's squares overflow float32: the
    clip would scale them to zero (without it, Adam's second moment would be inf), and the
    member would stop moving unseen, its run "done" at its initial weights. It is frozen as
    diverged instead."""
    init, xs = members("untied"), batches(6)
    ens = Ensemble(stack(init), l1_hyper(), Adam(LR, BETAS, EPS), grad_clip=clip)
    ens.step(xs[0])
    ens.hyper["l1"][2] = 1e30
    parts = ens.step(xs[1])
    assert torch.isfinite(parts.loss).all()  # (the loss alone would not tell)
    assert ens.active.tolist() == [True, True, False, True]
    assert float(ens.state.step["W_enc"][2]) == 1


def test_unclipped_gradients_freeze_a_member_only_where_adam_cannot_step():
    """Unclipped, Adam squares each element: a gradient whose norm overflows float32 but whose
    elements' squares do not (1e17 over 4M elements) steps; one that is NaN or whose element
    squares overflow does not. Clipped, the norm's overflow would zero the step: frozen."""
    from sweep.update import clip_members

    g = torch.zeros(4, 2048, 2048)
    g[1], g[2, 0, 0], g[3, 5, 7] = 1e17, 1e20, float("nan")
    assert clip_members({"W": g.clone()}, None).tolist() == [True, True, False, False]
    assert clip_members({"W": g.clone()}, 1.0).tolist() == [True, False, False, False]


def test_decoder_rows_stay_unit_norm():
    ens = Ensemble(stack(members("untied")), l1_hyper(), Adam(1e-1, BETAS, EPS))
    for x in batches(5):
        ens.step(x)
    torch.testing.assert_close(ens.params["W_dec"].norm(dim=-1), torch.ones(len(L1), F))


def test_bfloat16_loss_parts_are_summed_in_float32():
    """Under a bf16 compute dtype the loss parts are fp32 sums of the bf16 step's values (a
    bf16 result would round mse, fvu and sparsity to 2**-9), and the variance is the input's."""
    params, x = stack(members("untied")), batches(1)[0]
    _, parts, codes = fastpath.grads(
        archs.get("untied"), params, x, l1_hyper(), compute_dtype=torch.bfloat16
    )
    centre = x.mean(dim=0)  # (the step centres x and b_dec on the batch's mean)
    xb = (x - centre).to(torch.bfloat16)
    W_dec, b_dec = params["W_dec"].to(torch.bfloat16), (params["b_dec"] - centre).to(torch.bfloat16)
    err = (torch.bmm(codes, W_dec) + b_dec[:, None, :] - xb).float()  # as the step rounds it
    sq = err.pow(2).sum(dim=(1, 2))
    var = (x - x.mean(dim=0)).pow(2).sum()
    torch.testing.assert_close(parts.mse, sq / (B * D), rtol=1e-3, atol=0)
    torch.testing.assert_close(parts.fvu, sq / var, rtol=1e-3, atol=0)
    torch.testing.assert_close(parts.sparsity, codes.float().sum(dim=(1, 2)) / B, rtol=1e-5, atol=0)


def test_bfloat16_gradients_do_not_degrade_with_a_large_data_mean():
    """Activations whose mean is 10x their spread (a residual stream's are): the bf16 fast
    path's gradients stay as close to the float64 ones as with centred data (its shared GEMMs
    see the rows centred; uncentred, dW_enc was off by 32%)."""
    centred, shifted = bf16_grad_errors(0.0), bf16_grad_errors(10.0)
    assert max(centred) < 0.02 and max(shifted) < 0.02, (centred, shifted)


def bf16_grad_errors(ratio: float, device: torch.device | str = "cpu") -> list[float]:
    """Relative errors of the bf16 fast path's gradients against float64 autograd, for data
    whose mean is ``ratio`` times its spread (also run on CUDA by tests/test_gpu.py)."""
    arch, gen = archs.get("untied"), torch.Generator().manual_seed(0)
    d, f, b = 128, 1024, 512
    mean = torch.randn(d, generator=gen)
    x = torch.randn(b, d, generator=gen) + mean / mean.norm() * ratio * d**0.5
    p = arch.init_params(d, f, gen, b_dec=x.mean(dim=0))
    p["b_enc"] -= 0.3
    want = _grads_float64(arch, p, x, hyper_of([1e-3], [0]))
    on_dev = stack([{k: v.to(device) for k, v in p.items()}])
    got, _, _ = fastpath.grads(
        arch, on_dev, x.to(device), hyper_of([1e-3], [0], device), compute_dtype=torch.bfloat16
    )
    return [_rel(got[k][0].cpu(), want[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")]


def _grads_float64(arch, p, x, hyper) -> dict[str, torch.Tensor]:
    """One SAE's gradients by autograd in float64 (the reference)."""
    from torch.func import grad

    h = {"l1": hyper["l1"][0].double(), "k": hyper["k"][0]}
    p64 = {k: v.double() for k, v in p.items()}
    return grad(lambda q: sae.loss_fn(q, x.double(), h, arch=arch), has_aux=True)(p64)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("fast", [True, False])
def test_bfloat16_compute_trains(fast):
    ens = Ensemble(
        stack(members("untied")),
        l1_hyper(),
        Adam(1e-2, BETAS, EPS),
        autocast_dtype=torch.bfloat16,
        fast=fast,
    )
    xs = batches(30)
    first = ens.step(xs[0]).mse.clone()
    for x in xs[1:]:
        last = ens.step(x).mse
    assert ens.params["W_enc"].dtype == torch.float32
    assert bool((last < first).all())


def test_cpu_memory_model_counts_the_checkpoint_snapshot():
    """On the CPU the checkpoint writer's host snapshot is device memory: the model counts
    what the snapshot really holds (weights and Adam moments, fp32; step counts aside)."""
    from sweep import ckpt_writer, grid

    init = members("untied")
    ens = Ensemble(stack(init), l1_hyper(), Adam(LR, BETAS, EPS))
    writer = ckpt_writer.CheckpointWriter([None] * len(init))  # type: ignore[list-item]
    held = [
        sum(v.numel() * v.element_size() for k, v in m.items() if ".step." not in k)
        for m in writer._host_buffers(ens)
    ]
    writer.close()
    cpu, gpu = (grid.bytes_per_member(D, F, B, "float32", on_gpu=g) for g in (False, True))
    assert held == [cpu - gpu] * len(init)


@pytest.mark.parametrize("n", [7, 480, 2**20, 65537, 2 * 65521])
def test_member_sums_do_not_depend_on_members_or_threads(n):
    """A member's sum, alone or in a stack, on one thread or two, has the same bits (torch
    splits ONE big sum between threads; sweep.sums never asks for one), and is the sum."""
    from sweep.sums import member_sums

    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        stacked, alone = member_sums(x), member_sums(x[1:2])
        torch.set_num_threads(1)
        one_thread = member_sums(x[1:2])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(stacked[1], alone[0]) and torch.equal(alone, one_thread)
    torch.testing.assert_close(stacked, x.double().sum(dim=1).float(), rtol=1e-5, atol=1e-3)
