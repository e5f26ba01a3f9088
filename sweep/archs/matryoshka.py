"""``matryoshka``: a BatchTopK SAE trained as nested dictionaries (Bussmann et al. 2025,
"Learning Multi-Level Features with Matryoshka Sparse Autoencoders").

The first m_1 < m_2 < ... < m_n latents (``sae.levels``: fractions of the dictionary) must each
reconstruct the input on their own, from the codes the whole dictionary's BatchTopK chose:
the loss averages the MSE of every level's reconstruction with the whole dictionary's
(:func:`sweep.sae.nested_mse`; AuxK, when on, reconstructs the whole dictionary's residual).
Early latents are pushed to carry the broad, frequent directions, later ones refine them,
which curbs feature absorption. Everything else is BatchTopK's: the selection, the inference
threshold, the SAELens form (a JumpReLU SAE), the metrics (of the whole dictionary).
"""

from __future__ import annotations

from typing import ClassVar

from sweep.archs.base import register
from sweep.archs.topk import BatchTopK

DEFAULT_LEVELS = (0.03125, 0.09375, 0.21875, 0.46875)
"""Dictionary fractions of the inner levels (1/32, 3/32, 7/32, 15/32; the whole dictionary is
always the last): groups of 1/32, 1/16, 1/8, 1/4 and 17/32 of the latents, dictionary_learning's
and SAEBench's Matryoshka BatchTopK settings (they floor each group's size, the remainder to the
last; here each prefix is rounded: the same sizes when the dictionary is a multiple of 32)."""


@register
class Matryoshka(BatchTopK):
    name: ClassVar[str] = "matryoshka"
    loss_text = "mean over levels of mean((x_hat_level - x)**2) [+ auxk_alpha * AuxK]"
    levels = DEFAULT_LEVELS

    def batch_buffers_at(self, d: int, f: int) -> float:
        """BatchTopK's, and the fast step's n inner levels' errors: n (B, D) buffers, n d / f
        of a (B, F) one (measured on the CPU: 0.5 more than BatchTopK at ratio 8 with the 4
        default levels, 2 at ratio 2, 8 with 8 levels at ratio 1)."""
        return self.batch_buffers + len(self.levels) * d / f
