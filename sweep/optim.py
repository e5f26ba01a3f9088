"""Adam over stacked ensemble parameters (leading member axis E).

State mirrors ``torch.optim.Adam``'s per parameter: ``exp_avg`` and ``exp_avg_sq`` with the
same (E, ...) shape as the parameter, and ``step`` with shape (E,) so every member has its own
step count (it advances on every update of that member; a frozen member's does not).

The update itself is torch's fused Adam kernel (one pass over memory) applied to each
member's slices of the stacked tensors, so member ``e`` sees exactly Adam on its own
parameters; a frozen (diverged) member is skipped through the kernel's ``found_inf`` flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.adam import adam as adam_functional

Params = dict[str, torch.Tensor]


def by_name(tensors: Params) -> Params:
    """``tensors`` in name order. An ensemble holds its parameters, Adam state and buffers so:
    a restored one gets them in a checkpoint's order, a fresh one in its architecture's, and
    the compiled step traced from either must be the same program (on a GPU inductor fuses
    and tunes a reordered graph differently: other bits, an inexact resume)."""
    return {k: tensors[k] for k in sorted(tensors)}


@dataclass
class AdamState:
    exp_avg: Params
    exp_avg_sq: Params
    step: Params
    """Per parameter name, an (E,) float32 tensor of step counts."""

    @staticmethod
    def zeros_like(params: Params) -> AdamState:
        n = next(iter(params.values())).shape[0]
        dev = next(iter(params.values())).device
        return AdamState(
            exp_avg={k: torch.zeros_like(v) for k, v in params.items()},
            exp_avg_sq={k: torch.zeros_like(v) for k, v in params.items()},
            step={k: torch.zeros(n, dtype=torch.float32, device=dev) for k in params},
        )

    def by_name(self) -> AdamState:
        """The same tensors, each dict in name order (:func:`by_name`)."""
        return AdamState(*(by_name(d) for d in vars(self).values()))

    def member(self, e: int) -> dict[str, torch.Tensor]:
        """Member ``e``'s state as flat named tensors (for its checkpoint)."""
        out: dict[str, torch.Tensor] = {}
        for k in self.exp_avg:
            out[f"adam.exp_avg.{k}"] = self.exp_avg[k][e]
            out[f"adam.exp_avg_sq.{k}"] = self.exp_avg_sq[k][e]
            out[f"adam.step.{k}"] = self.step[k][e]
        return out

    @staticmethod
    def stack(
        members: list[dict[str, torch.Tensor]], names: list[str], device: torch.device
    ) -> AdamState:
        """Inverse of :meth:`member` for a list of members."""

        def gather(kind: str, k: str) -> torch.Tensor:
            return torch.stack([m[f"adam.{kind}.{k}"] for m in members]).to(device)

        return AdamState(
            exp_avg={k: gather("exp_avg", k) for k in names},
            exp_avg_sq={k: gather("exp_avg_sq", k) for k in names},
            step={k: gather("step", k) for k in names},
        )


@dataclass(frozen=True)
class Adam:
    lr: float | tuple[float, ...]
    """The learning rate, or each member's (an lr grid axis)."""
    betas: tuple[float, float]
    eps: float

    def member_lr(self, e: int) -> float:
        """Member ``e``'s learning rate."""
        return self.lr[e] if isinstance(self.lr, tuple) else self.lr

    def lr_tensor(self, device: torch.device) -> torch.Tensor | None:
        """Each member's learning rate as an (E,) float32 tensor, None when they share one."""
        if not isinstance(self.lr, tuple):
            return None
        return torch.tensor(self.lr, dtype=torch.float32, device=device)

    def update(
        self,
        params: Params,
        grads: Params,
        state: AdamState,
        skip: torch.Tensor,
        lr_scale: float = 1.0,
    ) -> None:
        """In-place Adam step (learning rate ``lr * lr_scale``, each member's own) of every
        member whose ``skip`` (E,) entry is 0.

        ``skip`` stays on the device: the fused kernel's ``found_inf`` leaves a skipped
        member's parameters, moments and step count as they were, with no host sync.
        """
        names = list(params)
        for e in range(skip.shape[0]):
            adam_functional(
                [params[k][e] for k in names],
                [grads[k][e] for k in names],
                [state.exp_avg[k][e] for k in names],
                [state.exp_avg_sq[k][e] for k in names],
                [],
                [state.step[k][e] for k in names],
                fused=True,  # (on every device torch has the kernel for; elsewhere it says so)
                foreach=False,
                found_inf=skip[e],
                amsgrad=False,
                beta1=self.betas[0],
                beta2=self.betas[1],
                lr=self.member_lr(e) * lr_scale,
                weight_decay=0.0,
                eps=self.eps,
                maximize=False,
            )
