"""The target tokens of a language-modeling loss: the positions whose logits predict a label (≠ −100), and which.

The token-level terms (the KL anchor, DFT weighting) are sums over exactly the tokens the task loss averages over,
in the same order, so that the Trainer's normalization of the task loss applies to them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_labels(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, shifts: bool) -> torch.Tensor:
    """(batch, positions): the label each position predicts, −100 where it predicts none.

    Decoder-only (``shifts``): position t predicts ``labels[t + 1]``, or ``shift_labels[t]`` when a collator
    already shifted them. Encoder-decoder: decoder position t predicts ``labels[t]``.
    """
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise ValueError(
            "`l2_kl_coef` > 0 and `l2_token_weighting` need `labels` in the batch: they say which tokens count."
        )
    if shifts:  # the last position predicts nothing
        return F.pad(labels[..., 1:], (0, 1), value=-100)
    return labels


def target_logits(
    logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None, shifts: bool
) -> torch.Tensor:
    """The (N, vocab) rows of ``logits`` that predict a label ≠ −100, in row-major order (as `target_ids`).

    Gathered as whole rows of the (batch × positions, vocab) view (`index_select`): no slice of the logits, so
    neither a strided gather nor, in backward, a second full-size gradient for the slice.
    """
    targets = target_labels(labels, shift_labels, shifts)
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            "`l2_kl_coef` > 0 and `l2_token_weighting` need a language model's logits (batch, positions, vocab) "
            f"matching its labels (batch, positions); got logits {tuple(logits.shape)} and labels "
            f"{tuple(targets.shape)}. Set `l2_kl_coef=0` and `l2_token_weighting='none'` for this model."
        )
    rows = (targets.to(logits.device) != -100).flatten().nonzero().squeeze(1)
    return logits.reshape(-1, logits.shape[-1]).index_select(0, rows)


def target_ids(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, shifts: bool) -> torch.Tensor:
    """(N,): the labels the rows of `target_logits` predict, in the same order."""
    targets = target_labels(labels, shift_labels, shifts)
    return targets[targets != -100]
