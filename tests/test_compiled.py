"""``train.compile``: the ensemble step as one ``torch.compile``d function equals independent
single SAEs (params, Adam state, step counts), freezes a diverged member inside the compiled
program, and resumes bit-exactly. On CPU inductor emits C++; the CUDA variant is in
tests/test_gpu.py."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from sweep import compiled, restore
from sweep.config import TrainConfig
from sweep.ensemble import DeadLatents, Ensemble, stack
from sweep.optim import Adam, AdamState
from sweep.update import adam_stacked
from tests import reference
from tests.reference import BETAS, EPS, LR
from tests.test_archs import (
    VALUES,
    B,
    arch_of,
    assert_member_equal,
    batches,
    ensemble_of,
    knob_hyper,
    members,
)


def test_stacked_adam_equals_torch_adam_member_by_member():
    """One pass over all members == the fused kernel applied to each member's slices."""
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(3, 5, 7, generator=g), "b": torch.randn(3, 7, generator=g)}
    mine = {k: v.clone() for k, v in p.items()}
    ref_state, state = AdamState.zeros_like(p), AdamState.zeros_like(mine)
    adam = Adam(LR, BETAS, EPS)
    for i in range(6):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in p.items()}
        active = torch.tensor([True, i < 3, True])  # member 1 frozen after three steps
        adam.update(p, grads, ref_state, (~active).float(), lr_scale=0.5 + i / 10)
        lr = torch.tensor(LR * (0.5 + i / 10))
        for k in mine:
            m, v = state.exp_avg[k], state.exp_avg_sq[k]
            adam_stacked(mine[k], grads[k], m, v, state.step[k], active, lr, adam)
    for k in p:
        torch.testing.assert_close(mine[k], p[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state.exp_avg_sq[k], ref_state.exp_avg_sq[k])
        assert state.step[k].tolist() == ref_state.step[k].tolist() == [6.0, 3.0, 6.0]


@pytest.mark.parametrize(
    "name, auxk",
    [
        ("untied", False),
        ("untied:weighted", False),
        ("tied", False),
        ("topk", True),
        ("jumprelu", False),
        ("jumprelu:log", False),
    ],
)
def test_compiled_ensemble_equals_independent_training(name, auxk):
    a = arch_of(name)
    dead = DeadLatents(dead_tokens=2 * B, auxk_alpha=0.5, k_aux=16) if auxk else None
    xs, init = batches(25), members(name, len(VALUES[a.knob]))
    if auxk:
        for p in init:
            p["b_enc"][:10] = -50.0  # never win a top-k: dead, for AuxK to revive
    ens = ensemble_of(name, init, True, dead, compiled=True, grad_clip=0.05)
    assert ens.compiled
    for x in xs:
        ens.step(x)
    for e, value in enumerate(VALUES[a.knob]):
        p, opt = reference.train_single(a, init[e], value, xs, dead, grad_clip=0.05)
        assert_member_equal(ens, e, p, opt, len(xs))


def test_the_compiled_step_gives_each_member_its_own_learning_rate():
    """``grid.lr``: the compiled step's Adam takes the members' rates as an (E,) tensor."""
    init, xs, lrs = members("untied", 3), batches(8), (1e-3, 3e-3, 1e-2)
    hyper = knob_hyper(arch_of("untied"), [VALUES["l1"][1]] * 3)
    eager = Ensemble(stack(init), hyper, Adam(lrs, BETAS, EPS))
    fused = Ensemble(stack(init), hyper, Adam(lrs, BETAS, EPS), compiled=True)
    assert fused.compiled and fused.hyper["lr"].tolist() == pytest.approx(list(lrs))
    for i, x in enumerate(xs):
        eager.step(x, lr_scale=1 - i / 10)
        fused.step(x, lr_scale=1 - i / 10)
    for k, v in eager.params.items():
        torch.testing.assert_close(fused.params[k], v, rtol=1e-5, atol=1e-6)
    moved = [float((eager.params["W_enc"][e] - init[e]["W_enc"]).abs().mean()) for e in range(3)]
    assert moved[0] < moved[1] < moved[2]  # the rates did differ


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka", "gated"])
def test_compiled_discontinuous_step_equals_the_eager_step(name):
    """BatchTopK's selection is discontinuous (a rounding difference can move one code across
    the batch threshold), so its compiled step is held to the eager one step by step
    (Matryoshka's too: BatchTopK's selection, its levels' gradients; and Gated's, whose code
    jumps from 0 to its magnitude where a gate opens: over 25 steps the compiled and eager
    steps' rounding flips one gate, and the runs drift 1e-4 apart)."""
    init, xs = members(name, 3), batches(6)
    eager = ensemble_of(name, init, True, None, grad_clip=0.05)
    fused = ensemble_of(name, init, True, None, compiled=True, grad_clip=0.05)
    for x in xs:
        eager.step(x)
        fused.step(x)
        for k, v in eager.params.items():
            torch.testing.assert_close(fused.params[k], v, rtol=1e-4, atol=1e-5)
            fused.params[k].copy_(v)  # the next step starts from the same point
        for k, v in eager.buffers.items():
            torch.testing.assert_close(fused.buffers[k], v)


def test_diverged_member_is_frozen_inside_the_compiled_step():
    init, xs = members("untied", 3), batches(10)
    ens = ensemble_of("untied", init, True, None, compiled=True)
    for i, x in enumerate(xs):
        if i == 4:
            ens.hyper["l1"][1] = float("nan")  # member 1's loss turns NaN from step 5 on
            frozen = {k: v[1].clone() for k, v in ens.params.items()}
        ens.step(x)
    assert ens.active.tolist() == [True, False, True]
    for k, v in frozen.items():
        assert torch.equal(ens.params[k][1], v)
        assert ens.state.step[k].tolist() == [10.0, 4.0, 10.0]
    assert all(torch.isfinite(v).all() for v in ens.params.values())
    p, opt = reference.train_single(arch_of("untied"), init[0], VALUES["l1"][0], xs)
    assert_member_equal(ens, 0, p, opt, len(xs))  # the healthy members are unaffected


@pytest.mark.parametrize("clip", [1.0, None])
def test_member_whose_gradients_overflow_is_frozen_inside_the_compiled_step(clip):
    init, xs = members("untied", 3), batches(3)
    ens = ensemble_of("untied", init, True, None, compiled=True, grad_clip=clip)
    ens.step(xs[0])
    ens.hyper["l1"][1] = 1e30  # a finite loss whose gradient's squares overflow float32
    parts = ens.step(xs[1])
    assert torch.isfinite(parts.loss).all()
    assert ens.active.tolist() == [True, False, True]
    assert ens.state.step["W_enc"].tolist() == [2.0, 1.0, 2.0]


def copies_are_casts(ens: Ensemble) -> None:
    """The compiled step's bf16 copies are exactly the cast of the float32 weights: all a
    resumed ensemble (which casts its checkpoint's weights) needs to compute what the
    uninterrupted one does."""
    for k, w in ens._cast.items():
        assert torch.equal(w, ens.params[k].to(w.dtype)), k


@pytest.mark.parametrize("name", ["untied", "tied", "topk", "batchtopk", "jumprelu", "gated"])
def test_the_bf16_copies_are_the_weights_cast_after_every_step(name):
    """The compiled step refills the weights' bf16 copies in the pass that writes the new
    weights (Adam's, or the decoder constraint's after it), not from a fresh read: after
    every step, a frozen member's included, they equal the stored weights cast. Run on CUDA
    in tests/test_gpu.py, where a recomputed update could round otherwise."""
    init, xs = members(name, 3), batches(8)
    dead = DeadLatents(dead_tokens=B, auxk_alpha=0.03, k_aux=8) if name == "topk" else None
    ens = ensemble_of(name, init, True, dead, compiled=True, autocast_dtype=torch.bfloat16)
    for i, x in enumerate(xs):
        if i == 3:
            ens.active[1] = False  # member 1 frozen from here on (as a divergence does)
        ens.step(x, full=i % 3 == 0)
        copies_are_casts(ens)
    assert len(ens._cast) == (1 if name == "tied" else 2)  # (a tied SAE has no W_dec)


def test_the_copies_refill_compiles_on_the_cpu_where_a_copy_into_them_did_not():
    """Inductor's C++ code failed on ``cast.copy_(weight)`` after the weight's masked in-place
    update and row norm (``KeyError: 'buf5'`` under torch 2.11 and 2.13; under 2.11 every
    compiled bf16 step on the CPU failed so): :func:`compiled.refill` compiles there."""

    def update(p, g, active, cast):
        a = active[:, None, None]
        new = torch.where(a, p - g, p)
        norm = new.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
        p.copy_(new / torch.where(a, norm, 1.0))
        compiled.refill({"w": cast}, {"w": p})

    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(3, 40, 12, generator=gen), torch.randn(3, 40, 12, generator=gen)
    cast, active = p.to(torch.bfloat16), torch.tensor([True, False, True])
    torch.compile(update, fullgraph=True, dynamic=False)(p, g / 100, active, cast)
    assert torch.equal(cast, p.to(torch.bfloat16))


def test_a_drifted_copy_is_found_at_a_checkpoint_cast_again_and_recorded(
    tiny_store, tmp_path, monkeypatch, caplog
):
    """Should a bf16 copy ever not be its weight's cast (the test above says it is not),
    the next checkpoint finds it, casts it again, and says so: a warning and an
    ``inexact_resume`` event in every run of the ensemble."""
    from sweep.worker import train_ensemble
    from tests.test_worker import job_for

    init, xs = members("untied", 3), batches(3)
    ens = ensemble_of("untied", init, True, None, compiled=True, autocast_dtype=torch.bfloat16)
    for x in xs:
        ens.step(x)
    assert ens.copies_drifted() == []
    ens._cast["W_dec"][2, 0, 0] += 1.0  # (its weight's version counter does not move)
    assert ens.copies_drifted() == ["W_dec"]
    copies_are_casts(ens)
    monkeypatch.setattr(Ensemble, "copies_drifted", lambda self: ["W_enc"])
    job = job_for(tiny_store, tmp_path, compile="true", dtype="bfloat16")
    train_ensemble(job)
    assert "copies of W_enc were not the weights' cast" in caplog.text
    for m in job.ensemble.members:
        events = (tmp_path / "runs" / m.run_id / "events.jsonl").read_text()
        assert '"inexact_resume"' in events and "weight copies drifted (W_enc)" in events


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_training_resumes_bit_exactly(dtype):
    """Stopped after 6 steps and rebuilt from its state, a compiled ensemble ends exactly
    where the uninterrupted one does (under bf16 compute too: the copies the step refills
    are the stored weights cast, which a rebuilt ensemble casts afresh)."""
    init, xs = members("topk", 3), batches(12)
    whole = ensemble_of("topk", init, True, None, compiled=True, autocast_dtype=dtype)
    first = ensemble_of("topk", init, True, None, compiled=True, autocast_dtype=dtype)
    for i, x in enumerate(xs):
        whole.step(x, full=i % 4 == 0)
        if i < 6:
            first.step(x, full=i % 4 == 0)
    saved = AdamState(*({k: v.clone() for k, v in d.items()} for d in vars(first.state).values()))
    params = {k: v.clone() for k, v in first.params.items()}
    again = Ensemble(
        params, first.hyper, first.adam, arch="topk", state=saved, active=first.active.clone(),
        compiled=True, autocast_dtype=dtype,
    )  # fmt: skip
    for i, x in enumerate(xs[6:], start=6):
        again.step(x, full=i % 4 == 0)
    for k, v in whole.params.items():
        assert torch.equal(again.params[k], v)
        assert torch.equal(again.state.exp_avg_sq[k], whole.state.exp_avg_sq[k])


AFTER_SIX_STEPS = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from tests.test_archs import batches, ensemble_of, members
ens = ensemble_of("untied", members("untied", 3), True, None, compiled=True)
for x in batches(6):
    ens.step(x)
print(hashlib.sha256(b"".join(v.numpy().tobytes() for v in ens.params.values())).hexdigest())
"""


def test_the_compiled_step_is_compiled_for_the_thread_count_it_runs_with(monkeypatch):
    """The thread count is among the compile's options, so in the key of inductor's cache
    (the slow test below shows why, in processes)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]))
    spec = ensemble_of("untied", members("untied", 3), True, None, compiled=True)._spec()
    kept = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            compiled.compile_step(spec)
    finally:
        torch.set_num_threads(kept)
    assert [o["cpp.threads"] for o in seen] == [2, 1]


@pytest.mark.slow
def test_a_step_compiled_for_another_thread_count_is_not_taken_from_the_cache(tmp_path):
    """A resumed CPU worker runs with its checkpoint's thread count; its compiled step must
    be compiled for that count even where inductor's cache holds the same graph compiled
    under another (torch 2.11 reused it: its C++ kernels split sums by thread, so a resume
    differed in the last bits). Each compile in its own process, as workers do."""
    import subprocess
    import sys
    from pathlib import Path

    def digest(threads: int, cache: Path) -> str:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        root = Path(__file__).resolve().parents[1]
        cmd = [sys.executable, "-c", AFTER_SIX_STEPS, str(threads)]
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()[-1]

    one_thread = digest(1, tmp_path / "shared")  # fills the cache
    fresh = digest(2, tmp_path / "empty")
    if one_thread == fresh:
        pytest.skip("on this machine the step's kernels sum alike with one and two threads")
    assert digest(2, tmp_path / "shared") == fresh


def test_weights_changed_outside_the_compiled_step_are_cast_again():
    """Under bf16 compute the compiled step reads bf16 copies of the weights that it refills
    itself each step; a change from outside (a resample) is seen at the next step (the
    weight's version counter): it matches an ensemble built afresh from the changed weights,
    bit for bit. Both stay near the eager bf16 step."""
    init, xs = members("untied", 3), batches(6)
    ens = ensemble_of("untied", init, True, None, compiled=True, autocast_dtype=torch.bfloat16)
    eager = ensemble_of("untied", init, True, None, autocast_dtype=torch.bfloat16)
    for x in xs[:5]:
        ens.step(x)
        eager.step(x)
    for k, v in eager.params.items():
        assert (ens.params[k] - v).abs().mean() < 1e-3 * v.abs().mean()  # bf16 rounding apart
    ens.params["W_dec"][1].mul_(-1.0)  # in place, as sweep.resample writes
    saved = AdamState(*({k: v.clone() for k, v in d.items()} for d in vars(ens.state).values()))
    params = {k: v.clone() for k, v in ens.params.items()}
    fresh = Ensemble(
        params, ens.hyper, ens.adam, arch="untied", state=saved, compiled=True,
        autocast_dtype=torch.bfloat16,
    )  # fmt: skip
    ens.step(xs[5])
    fresh.step(xs[5])
    for k, v in fresh.params.items():
        assert torch.equal(ens.params[k], v)


def test_train_compile_auto_is_off_until_a_compiled_gpu_run_resumes_exactly(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(restore, "GPU_COMPILED_RESUME_CONFIRMED", False)
    assert not restore.use_compile(TrainConfig(), cpu)
    assert not restore.use_compile(TrainConfig(), gpu)
    assert restore.use_compile(TrainConfig(compile="True"), cpu)
    assert not restore.use_compile(TrainConfig(compile="false"), gpu)
    monkeypatch.setattr(restore, "GPU_COMPILED_RESUME_CONFIRMED", True)  # measured exact
    assert restore.use_compile(TrainConfig(), gpu) and restore.use_cuda_graphs(TrainConfig(), gpu)
    assert not restore.use_compile(TrainConfig(), cpu)  # slower there
    assert not restore.use_compile(TrainConfig(compile="false"), gpu)


def test_cuda_graphs_go_wherever_the_step_is_compiled_on_a_gpu(caplog):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    compiled = TrainConfig(compile="true")
    assert restore.use_cuda_graphs(compiled, gpu)
    assert not restore.use_cuda_graphs(TrainConfig(compile="true", cuda_graphs="false"), gpu)
    assert not restore.use_cuda_graphs(TrainConfig(), gpu)  # auto: the step is eager there
    assert not restore.use_cuda_graphs(compiled, cpu) and not caplog.records
    assert not restore.use_cuda_graphs(TrainConfig(compile="true", cuda_graphs=True), cpu)
    assert "runs without CUDA graphs" in caplog.text  # asked for, not possible: said so


def test_the_compiled_step_follows_a_schedule():
    """The compiled step's lr and l1 factors are device tensors written only when they change:
    under a schedule that changes either, both, neither and returns to 1, it computes what the
    eager step does."""
    init, xs = members("untied", 3), batches(8)
    scales = [(0.5, 0.2), (0.5, 0.2), (1.0, 0.2), (1.0, 1.0), (0.3, 1.0), (0.3, 0.7), (1.0, 1.0)]
    eager = ensemble_of("untied", init, True, None)
    fused = ensemble_of("untied", init, True, None, compiled=True)
    for x, (lr, l1) in zip(xs, scales, strict=False):
        for ens in (eager, fused):
            ens.step(x, lr_scale=lr, l1_scale=l1)
    for k, v in eager.params.items():
        torch.testing.assert_close(fused.params[k], v, rtol=1e-5, atol=1e-6)


class TracedGraphs:
    """Every graph inductor is given in this process: its code and, per input, shape, stride,
    dtype, storage offset and alignment. Equal graphs with equal inputs are equal kernels on
    any device (inductor's kernel choice is deterministic here: see sweep.compiled), so a
    resumed compiled run computes what its uninterrupted self did, GPU included."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch._inductor.compile_fx as cfx

        self.graphs: list[tuple[str, list]] = []
        compile_fx = cfx.compile_fx

        def record(gm: torch.fx.GraphModule, inputs: list, *args: object, **kw: object):
            if not kw.get("config_patches"):  # (with them, compile_fx applies and calls itself)
                self.graphs.append((gm.code, [self._meta(t) for t in inputs]))
            return compile_fx(gm, inputs, *args, **kw)

        monkeypatch.setattr(cfx, "compile_fx", record)

    @staticmethod
    def _meta(t: object) -> object:
        if not isinstance(t, torch.Tensor):
            return repr(t)
        return t.shape, t.stride(), t.dtype, t.storage_offset(), t.data_ptr() % 16

    def take(self) -> list[tuple[str, list]]:
        out, self.graphs = self.graphs, []
        return out


@pytest.mark.parametrize(
    "arch, dtype",
    [("untied", "float32"), ("batchtopk", "bfloat16")],
    ids=["untied", "batchtopk-bf16"],
)
def test_a_compiled_worker_resumes_bit_exactly(arch, dtype, tiny_store, tmp_path, monkeypatch):
    """Through the worker (train.compile=true on CPU): stopped, checkpointed and continued, the
    dictionaries equal an uninterrupted compiled run's, and the resumed worker compiled the
    very graphs the uninterrupted one did (same code, same inputs' order and layout: a GPU's
    kernels are the same too); compile time is recorded apart."""
    from sweep import rundir
    from sweep.worker import train_ensemble
    from tests.test_worker import digest, job_for, stop_after

    traced, knob = TracedGraphs(monkeypatch), {"l1s": (2, 4)} if arch == "batchtopk" else {}
    kw = {"compile": "true", "dtype": dtype, "arch": arch, "dead_tokens": 256 * 10, **knob}
    ref = train_ensemble(job_for(tiny_store, tmp_path / "ref", **kw))
    assert ref.timings["compile"] > 0
    uninterrupted = traced.take()
    cut = job_for(tiny_store, tmp_path / "cut", **kw)
    train_ensemble(cut, should_stop=stop_after(17))
    traced.take()
    assert train_ensemble(cut).resumed_from == 17
    resumed, variants = traced.take(), 2 if arch == "batchtopk" else 1
    # (BatchTopK: a variant before latents can be dead (10 steps), one after: resumed at 17)
    assert len(uninterrupted) == variants and resumed == uninterrupted[-1:]
    for m in cut.ensemble.members:
        a, b = (rundir.run_dir(tmp_path / d, m.run_id) for d in ("ref", "cut"))
        assert digest(a) == digest(b)


def test_a_failed_compile_is_one_line_naming_the_fix_and_changes_nothing(monkeypatch):
    from sweep import compiled
    from sweep.errors import SweepError

    def broken(spec, mode=None):
        def fn(*_: object) -> None:
            raise torch._dynamo.exc.InternalTorchDynamoError("no kernel for this\nlong trace")

        return fn

    monkeypatch.setattr(compiled, "compile_step", broken)
    init = members("untied", 3)
    ens = ensemble_of("untied", init, True, None, compiled=True)
    before = {k: v.clone() for k, v in ens.params.items()}
    with pytest.raises(
        SweepError,
        match=r"\(InternalTorchDynamoError: no kernel for this\); set train.compile=false",
    ):
        ens.step(batches(1)[0])
    assert all(torch.equal(ens.params[k], v) for k, v in before.items())


def raiser(path: str, error: str) -> Callable[[], None]:
    """A function that raises ``error`` from a frame in a file named like torch's ``path``."""
    code = compile(f"def fail(): raise {error}", "/site-packages/" + path, "exec")
    scope: dict = {}
    exec(code, scope)
    return scope["fail"]


def test_a_bare_error_raised_while_compiling_is_one_line_too():
    """Dynamo does not wrap all of its failures (torch 2.11 raised a bare AssertionError for a
    NamedTuple built inside the step); one raised on the compile path is still a compile
    failure, and an error from running the compiled step is not."""
    from sweep import compiled
    from sweep.errors import SweepError

    convert = raiser(compiled.COMPILING, "AssertionError('no source for cls')")
    with pytest.raises(SweepError, match=r"\(AssertionError: no source for cls\); set train"):
        compiled.call(convert)

    def running() -> None:
        raise RuntimeError("index out of bounds")

    with pytest.raises(RuntimeError, match="index out of bounds"):
        compiled.call(running)


def test_a_failure_of_the_cuda_graphs_is_one_line_naming_their_switch():
    """Under CUDA graphs a failure while compiling names both fixes, and one raised where
    inductor records or replays the graphs names train.cuda_graphs=false."""
    from sweep import compiled
    from sweep.errors import SweepError

    fail = raiser(compiled.COMPILING, "AssertionError('no source')")
    with pytest.raises(SweepError, match=r"set train.cuda_graphs=false to run it without CUDA "):
        compiled.call(fail, graphs=True)
    fail = raiser(compiled.GRAPHING, "RuntimeError('capture failed')")
    with pytest.raises(SweepError, match=r"graphs failed \(RuntimeError: capture failed\); set t"):
        compiled.call(fail, graphs=True)
    with pytest.raises(RuntimeError, match="capture failed"):  # (no graphs: not theirs)
        compiled.call(fail)


def test_the_recompile_limit_is_one_line_and_changes_nothing():
    """A variant that would pass the recompile limit fails before it runs (dynamo would
    otherwise run the step uncompiled, with other numerics)."""
    from sweep.errors import SweepError

    dead = DeadLatents(dead_tokens=B, auxk_alpha=0.5, k_aux=16)
    ens = ensemble_of("topk", members("topk", 3), True, dead, compiled=True)
    xs = batches(2)
    ens.step(xs[0])  # compiles the first variant (no latent can be dead yet)
    before = {k: v.clone() for k, v in ens.params.items()}
    # (config.patch, not monkeypatch: undoing a monkeypatch hides the entry in torch 2.13,
    # breaking every later compile in the process)
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(SweepError, match="set train.compile=false"):
            ens.step(xs[1])  # B rows seen: the dead-latent variant, over the limit
    assert all(torch.equal(ens.params[k], v) for k, v in before.items())


def test_memory_that_runs_out_while_compiling_is_not_called_a_compile_failure():
    """Inductor wraps an allocation that failed while it tuned kernels; the worker names the
    fix for memory (a smaller ensemble), so it must not read as "set train.compile=false"."""
    from sweep import compiled

    def tuning() -> None:
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, oom, None) from oom

    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        compiled.call(tuning)


def test_device_memory_named_only_in_a_message_is_still_out_of_memory():
    """cuBLAS, CUDA graphs and Triton report running out of device memory as RuntimeErrors;
    an OOM already handled (its context suppressed) does not count."""
    from sweep.errors import out_of_memory

    assert out_of_memory(RuntimeError("CUDA error: out of memory")) == "device"
    assert out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling")) == "device"
    assert out_of_memory(MemoryError()) == "host"
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise ValueError("bad input") from None
    except ValueError as err:
        assert out_of_memory(err) is None


def test_a_compiled_step_resumed_on_a_gpu_is_reported_inexact(tmp_path, caplog, monkeypatch):
    """train.compile=true on a GPU resumed equal only up to rounding (measured on an H200):
    until it is measured exact, the resume says so in the log and in each run's events.jsonl;
    on the CPU it is exact and silent."""
    monkeypatch.setattr(restore, "GPU_COMPILED_RESUME_CONFIRMED", False)
    from sweep.rundir import RunFolder

    init = members("untied", 2)
    ens = ensemble_of("untied", init, True, None, compiled=True)
    folders = [RunFolder(tmp_path / f"r{i}") for i in range(2)]
    for f in folders:
        f.path.mkdir()
    restore._report_inexact_resume(folders, ens, torch.device("cpu"), "e0")
    assert not caplog.records
    restore._report_inexact_resume(folders, ens, torch.device("cuda"), "e0")
    assert "not bit for bit; train.compile=false resumes exactly" in caplog.text
    for f in folders:
        assert "inexact_resume" in (f.path / "events.jsonl").read_text()
    caplog.clear()
    monkeypatch.setattr(restore, "GPU_COMPILED_RESUME_CONFIRMED", True)
    restore._report_inexact_resume(folders, ens, torch.device("cuda"), "e1")
    assert not caplog.records  # measured exact: nothing to report


def test_an_ensemble_holds_its_tensors_by_name_whatever_order_it_is_given():
    """A checkpoint gives an ensemble back its tensors in name order, a fresh one gets its
    architecture's order: both hold them by name, so the compiled step traced from a resumed
    ensemble is the uninterrupted one's program (on an H200 a reordered graph was fused and
    tuned differently: a resume with other bits)."""
    init = members("batchtopk", 2)
    dead = DeadLatents(dead_tokens=B, auxk_alpha=0.03, k_aux=8)
    fresh = ensemble_of("batchtopk", init, True, dead, compiled=True)
    assert list(init[0]) != sorted(init[0]) and len(fresh.buffers) == 2

    def reversed_(d: dict) -> dict:
        return {k: d[k] for k in reversed(list(d))}

    state = AdamState(*(reversed_(d) for d in vars(fresh.state).values()))
    again = Ensemble(
        reversed_(fresh.params), fresh.hyper, fresh.adam, arch="batchtopk", state=state,
        dead=dead, compiled=True,
    )  # fmt: skip
    again.buffers = reversed_(fresh.buffers)  # as sweep.restore sets a checkpoint's
    mine = [again.params, again.buffers, *vars(again.state).values()]
    theirs = [fresh.params, fresh.buffers, *vars(fresh.state).values()]
    for a, b in zip(mine, theirs, strict=True):
        assert list(a) == list(b) == sorted(a)
