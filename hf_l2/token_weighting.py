"""Per-token weights of the task loss: `l2_token_weighting`.

`"dft"` is Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629): each target token's cross-entropy is multiplied
by its own probability under the current model, with the gradient stopped through the weight, so tokens the model
finds unlikely pull less. With the KL anchor (`l2_kl_coef` > 0) this is Anchored SFT (Zhu et al., ICLR 2026,
arXiv 2509.23753).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOKEN_WEIGHTINGS = ("none", "dft")


def dft_token_sums(rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over (N, vocab) logits rows and their (N,) targets, in fp32: Σ sg(p)·CE (with gradient), p = exp(−CE) being
    the target's probability, and Σ CE (detached, for the log)."""
    ce = F.cross_entropy(rows.float(), ids.to(rows.device), reduction="none")
    return (ce * torch.exp(-ce.detach())).sum(), ce.detach().sum()
