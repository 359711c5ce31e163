"""The training loss: label-smoothed cross-entropy over the whole target vocabulary or a sampled part of it."""

from __future__ import annotations

import math

import torch
from torch import nn


def output_loss(readout: torch.Tensor, out: nn.Linear, targets: torch.Tensor, label_smoothing: float = 0.0,
                sampled: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed loss and summed NLL of (N, D) readouts against (N,) target ids.

    sampled=0: the exact softmax over the whole vocabulary. sampled=K > 0: a sampled softmax (Jean et al. 2015,
    RNNsearch-LV) with logits only for the pieces that are targets in this batch and K others drawn uniformly
    without replacement; each drawn piece stands for r = others/K pieces in the normalizer (its logit + log r),
    so that the normalizer and the label-smoothing sum of logits are unbiased estimates of the whole
    vocabulary's. The loss takes the normalizer's log, so it is biased low (Jensen), as Jean et al.'s is. The
    output layer's three matmuls shrink to those rows; K >= the others gives the exact loss again."""
    vocab = out.weight.size(0)
    if sampled <= 0:
        logprobs = torch.log_softmax(out(readout).float(), dim=-1)
        nll = -logprobs.gather(1, targets.unsqueeze(1)).sum()
        smooth = -logprobs.mean(dim=1).sum()
    else:
        present = torch.zeros(vocab, dtype=torch.bool, device=targets.device)
        present[targets] = True
        kept, others = present.nonzero().squeeze(1), (~present).nonzero().squeeze(1)
        k = min(sampled, others.numel())
        ids = torch.cat([kept, others[torch.randperm(others.numel(), device=targets.device)[:k]]])
        position = torch.empty(vocab, dtype=torch.long, device=targets.device)
        position[kept] = torch.arange(kept.numel(), device=targets.device)
        log_r = math.log(others.numel() / k) if k else 0.0
        correction = torch.zeros(ids.numel(), device=targets.device)
        correction[kept.numel():] = log_r
        logits = torch.addmm(out.bias.index_select(0, ids), readout, out.weight.index_select(0, ids).t())
        logprobs = torch.log_softmax(logits.float() + correction, dim=-1)
        nll = -logprobs.gather(1, position[targets].unsqueeze(1)).sum()
        weights = correction.exp()  # 1 for the batch's pieces, r for each drawn one
        smooth = -((logprobs - correction) @ weights).sum() / vocab
    if label_smoothing == 0:
        return nll, nll.detach()
    return (1.0 - label_smoothing) * nll + label_smoothing * smooth, nll.detach()
