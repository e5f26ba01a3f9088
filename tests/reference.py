"""The single-SAE reference every fast path is checked against: ONE member trained as a user
would write it — autograd through :func:`sweep.sae.loss_fn`, ``torch.optim.Adam``, the
architecture's constraint, its own dead-latent and threshold bookkeeping, resampling."""

from __future__ import annotations

import torch

from sweep import archs, sae
from sweep.ensemble import DeadLatents
from sweep.resample import generator, resample_member

LR, BETAS, EPS = 3e-3, (0.9, 0.999), 1e-8


def hyper(arch: archs.Architecture, value: float) -> dict[str, torch.Tensor]:
    if arch.knob == "k":
        return {"l1": torch.tensor(0.0), "k": torch.tensor(int(value))}
    return {"l1": torch.tensor(float(value)), "k": torch.tensor(0)}


def train_single(
    name: str | archs.Architecture,
    p0: sae.Params,
    value: float,
    xs: list[torch.Tensor],
    dead: DeadLatents | None = None,
    resample_every: int = 0,
    run_seed: int = 0,
    grad_clip: float | None = None,
    lr: float = LR,
) -> tuple[dict, torch.optim.Adam]:
    """Train one member; returns its params (+ buffers under their names) and optimizer."""
    a = archs.get(name) if isinstance(name, str) else name
    p = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt = torch.optim.Adam(list(p.values()), lr=lr, betas=BETAS, eps=EPS)
    hy, kmax = hyper(a, value), int(value) if a.knob == "k" else 0
    dev, f = p0["W_enc"].device, p0["W_enc"].shape[1]
    yes = torch.tensor([True], device=dev)
    hy = {k: v.to(dev) for k, v in hy.items()}
    buffers = {k: v[None].to(dev) for k, v in a.init_buffers(f).items()}
    since, rows = torch.zeros(f, device=dev), 0
    for step, x in enumerate(xs, 1):
        is_dead = None if dead is None or rows < dead.dead_tokens else since >= dead.dead_tokens
        aux = {} if dead is None else {"auxk_alpha": dead.auxk_alpha, "k_aux": dead.k_aux}
        opt.zero_grad()
        use = is_dead if a.knob == "k" else None
        loss, (_, codes) = sae.loss_fn(p, x, hy, use, arch=a, kmax=kmax, **aux)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(p.values()), grad_clip)
        opt.step()
        with torch.no_grad():
            a.constrain({k: v.data[None] for k, v in p.items()}, yes)
            a.update_buffers(buffers, codes[None], yes)
            if dead is not None:
                fired = (codes != 0).any(dim=0)
                since = torch.where(fired, 0.0, (since + x.shape[0]).clamp(max=dead.dead_tokens))
        rows += x.shape[0]
        if resample_every and step % resample_every == 0 and dead is not None:
            if rows >= dead.dead_tokens:
                _resample(a, p, opt, x, since >= dead.dead_tokens, generator(0, run_seed, step))
                since[since >= dead.dead_tokens] = 0.0
    out = {k: v.detach() for k, v in p.items()}
    out.update({k: v[0] for k, v in buffers.items()})
    return out, opt


def _resample(a, p, opt, x, dead_F, g) -> None:
    params = {k: v.data for k, v in p.items()}
    moments = [{k: opt.state[v][m] for k, v in p.items()} for m in ("exp_avg", "exp_avg_sq")]
    resample_member(a, params, moments, x, dead_F, g)
