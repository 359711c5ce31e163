"""The training loss: exact softmax and the sampled softmax that estimates it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nmt.loss import output_loss

VOCAB, DIM = 60, 12


def layer_and_batch(rows: int = 40, seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    out = nn.Linear(DIM, VOCAB)
    targets = torch.randint(4, 24, (rows,))  # a batch uses a third of the vocabulary
    return out, torch.randn(rows, DIM), targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_drawing_every_other_piece_gives_the_exact_loss(smoothing: float) -> None:
    out, readout, targets = layer_and_batch()
    exact, exact_nll = output_loss(readout, out, targets, smoothing)
    manual = -torch.log_softmax(out(readout), -1).gather(1, targets[:, None]).sum()
    assert torch.allclose(exact_nll, manual)
    loss, nll = output_loss(readout, out, targets, smoothing, sampled=VOCAB)
    assert torch.allclose(loss, exact) and torch.allclose(nll, exact_nll)


def test_label_smoothing_mixes_the_nll_with_the_mean_over_the_vocabulary() -> None:
    # (1 - e) NLL + e * mean over the whole vocabulary of -log p, per row (a uniform prior over the pieces).
    out, readout, targets = layer_and_batch()
    logprobs = torch.log_softmax(out(readout), -1)
    nll = -logprobs.gather(1, targets[:, None]).sum()
    expected = 0.9 * nll + 0.1 * (-logprobs).mean(dim=1).sum()
    loss, _ = output_loss(readout, out, targets, 0.1)
    assert torch.allclose(loss, expected)


def test_the_sampled_normalizer_is_unbiased() -> None:
    # One row: exp(NLL) = Z / exp(z_target), so the mean of exp(sampled NLL) over draws must match the exact one.
    # Without the log(others / K) correction it would be about 4x too small here.
    out, readout, targets = layer_and_batch(rows=1)
    with torch.no_grad():
        out.weight.mul_(3.0)  # logits spread over several nats, so that which pieces are drawn matters
        exact = math.exp(float(output_loss(readout, out, targets)[1]))
        draws = [math.exp(float(output_loss(readout, out, targets, sampled=15)[1])) for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(exact, rel=0.05)
    assert min(draws) < 0.9 * exact  # the draws really differ


def test_only_the_batch_pieces_and_the_drawn_ones_are_trained() -> None:
    out, readout, targets = layer_and_batch()
    loss, _ = output_loss(readout, out, targets, 0.1, sampled=7)
    loss.backward()
    touched = out.weight.grad.abs().sum(1) > 0
    assert bool(touched[targets].all())
    assert int(touched.sum()) == len(set(targets.tolist())) + 7
    assert torch.equal(touched, out.bias.grad != 0)
