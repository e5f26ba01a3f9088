"""Why does a compiled ensemble not resume bit-exactly on this GPU? (See README, Compiled step.)

    python3 scripts/diagnose_compile.py            # on the GPU machine, ~2 min
    python3 scripts/diagnose_compile.py --device cpu --dtypes fp32,bf16

Each variant runs in a fresh process (as a resumed worker does): an untied ensemble, 12 steps
of the compiled step from one start, and the same start stopped after 6 steps whose state a
new Ensemble (its own compile) continues, given its tensors in a checkpoint's order (by name,
where a fresh ensemble has its architecture's order). The first suspect, fixed in session 26:
an ensemble held its tensors in the order given, so a resumed one traced another graph; the
variant "held as given" puts that back. It prints whether two compiles in one process agree
after 6 steps, whether the continuation ends on the uninterrupted bits, and a hash of the end
state, which must also agree between processes. Variants: the default; inductor's
deterministic mode set for the whole process (not only the compile options); torch's
deterministic algorithms (warn only); inductor's caches off; the continuation's compiled step
called once first with its effects undone (does the first call of a compile differ?); the
continuation in a new process with an empty kernel cache (a sweep resumed on another machine:
within one process, or on one machine, dynamo and inductor may reuse the compiled step); the
compiled step replayed as CUDA graphs (``train.cuda_graphs``); the eager step (the control).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = {  # the telling ones first: a step's time limit may cut the tail
    "default": {},
    "continued in a new process, empty cache": {"DIAG_NEW_PROCESS": "1"},
    "under CUDA graphs (train.cuda_graphs)": {"DIAG_GRAPHS": "1"},
    "tensors held as given (before)": {"DIAG_AS_GIVEN": "1"},
    "eager (control)": {"DIAG_EAGER": "1"},
    "default, again": {},
    "inductor deterministic (process)": {"TORCHINDUCTOR_DETERMINISTIC": "1"},
    "deterministic algorithms": {"DIAG_DETERMINISTIC_ALGORITHMS": "1"},
    "inductor caches off": {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"},
    "continuation warmed up first": {"DIAG_WARMUP": "1"},
}


def ensemble(params: dict, device: str, dtype: str, compiled: bool = True, **kw: object):  # noqa: ANN201
    """The scenario's untied ensemble (tests.test_ensemble's L1 values and Adam) on
    ``device``, computing in ``dtype`` (fp32 or bf16)."""
    import torch

    from sweep.ensemble import Ensemble, hyper_of
    from sweep.optim import Adam
    from tests.test_ensemble import BETAS, EPS, L1, LR

    low = torch.bfloat16 if dtype == "bf16" else None
    hyper, adam = hyper_of(L1, [0] * len(L1), device), Adam(LR, BETAS, EPS)
    graphs = compiled and bool(os.environ.get("DIAG_GRAPHS"))  # (CUDA only: off elsewhere)
    return Ensemble(
        params, hyper, adam, compiled=compiled, autocast_dtype=low, cuda_graphs=graphs, **kw
    )


def in_checkpoint_order(tensors: dict) -> dict:
    """A clone of ``tensors`` in a checkpoint's order (by name), as a restored ensemble gets
    them (a fresh one gets its architecture's order)."""
    return {k: tensors[k].clone() for k in sorted(tensors)}


def one_run(device: str, dtype: str) -> dict:
    """The scenario, in this process."""
    from functools import partial

    import torch

    from sweep.ensemble import stack
    from sweep.optim import AdamState
    from tests.test_ensemble import batches, members

    if os.environ.get("DIAG_AS_GIVEN"):  # the order before session 26: as given, not by name
        import sweep.ensemble

        sweep.ensemble.by_name = dict
        AdamState.by_name = lambda self: self
    if os.environ.get("DIAG_DETERMINISTIC_ALGORITHMS"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    dev, compiled = torch.device(device), not os.environ.get("DIAG_EAGER")
    init, xs = members("untied"), [x.to(dev) for x in batches(12)]
    new = partial(ensemble, device=dev, dtype=dtype, compiled=compiled)
    start = {k: v.to(dev) for k, v in stack(init).items()}
    whole, first = new({k: v.clone() for k, v in start.items()}), new(start)
    agree_at_6 = None
    for i, x in enumerate(xs):
        whole.step(x)
        if i < 6:
            first.step(x)
        if i == 5:
            agree_at_6 = all(torch.equal(whole.params[k], v) for k, v in first.params.items())
    if os.environ.get("DIAG_NEW_PROCESS"):
        return {"agree_at_6": agree_at_6, **elsewhere(first, xs[6:], whole, dtype, dev.type)}
    state = AdamState(*(in_checkpoint_order(d) for d in vars(first.state).values()))
    again = new(in_checkpoint_order(first.params), state=state)
    if os.environ.get("DIAG_WARMUP"):  # a first call whose effects are undone: only tuning stays
        again._weights_cast()  # (its bf16 copies exist from the first step on)
        kept = [t.clone() for t in again._state_tensors()]
        again.step(xs[6])
        for t, k in zip(again._state_tensors(), kept, strict=True):
            t.copy_(k)
    for x in xs[6:]:
        again.step(x)
    differ = [k for k, v in whole.params.items() if not torch.equal(again.params[k], v)]
    return {"agree_at_6": agree_at_6, "resume_differs": differ, "end": digest(whole.params)}


def digest(params: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(params[k].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def elsewhere(first, xs: list, whole, dtype: str, device: str) -> dict:  # noqa: ANN001
    """``first``'s state continued over ``xs`` by a new process with an empty inductor cache
    (:func:`continue_saved`), against ``whole``'s end."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "state.pt"
        state = {"params": first.params, "state": vars(first.state), "active": first.active}
        torch.save({**state, "xs": xs}, saved)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "cache")}
        env.pop("DIAG_NEW_PROCESS")
        cmd = [sys.executable, __file__, "--device", device, "--continue-from", str(saved), dtype]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            return {"error": "the continuation took over 90 s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": done.stderr[-300:]}
    ends = json.loads(lines[-1])
    differ = [k for k, v in whole.params.items() if ends[k] != digest({k: v})]
    return {"resume_differs": differ, "end": digest(whole.params)}


def continue_saved(path: str, device: str, dtype: str) -> dict:
    """In this (new) process: a fresh compiled ensemble from the saved state (its tensors in a
    checkpoint's order) continued over the saved batches; each parameter's end digest."""
    import torch

    from sweep.optim import AdamState

    saved = torch.load(path, map_location=device)
    state = AdamState(*(in_checkpoint_order(d) for d in saved["state"].values()))
    params = in_checkpoint_order(saved["params"])
    again = ensemble(params, device, dtype, state=state, active=saved["active"])
    for x in saved["xs"]:
        again.step(x)
    return {k: digest({k: v}) for k, v in again.params.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="fp32", help="fp32 and/or bf16, comma-separated")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--continue-from", default=None, help=argparse.SUPPRESS)
    ap.add_argument("dtype", nargs="?", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.continue_from:
        print(json.dumps(continue_saved(args.continue_from, args.device, args.dtype)))
        return
    if args.child:
        print(json.dumps(one_run(args.device, args.child)))
        return
    import torch

    det = getattr(torch._inductor.config, "deterministic", "absent")
    print(f"torch {torch.__version__}; inductor config.deterministic: {det}", flush=True)
    for dtype in args.dtypes.split(","):
        for name, env in VARIANTS.items():
            cmd = [sys.executable, __file__, "--device", args.device, "--child", dtype]
            done = subprocess.run(
                cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
            )
            lines = done.stdout.strip().splitlines()
            result = lines[-1] if done.returncode == 0 and lines else done.stderr[-400:]
            print(f"{dtype:5} {name:34} {result}", flush=True)


if __name__ == "__main__":
    main()
