"""Additive (Bahdanau) attention: e_ij = v^T tanh(W s_{i-1} + U h_j), softmax over real source positions."""

from __future__ import annotations

import torch
from torch import nn

CHUNK_ELEMENTS = 640_000  # elements of (sentences, k, S, A) per attention chunk at inference: 2.5 MB in float32


class AdditiveAttention(nn.Module):
    """Scores each source annotation against the decoder state and returns the weighted context."""

    def __init__(self, key_dim: int, attn_dim: int):
        super().__init__()
        # U, applied once per source sentence; the query projection W s_{i-1} belongs to the decoder, which
        # fuses it with its recurrent matmul.
        self.key_proj = nn.Linear(key_dim, attn_dim, bias=False)
        self.v = nn.Parameter(torch.empty(attn_dim).uniform_(-0.1, 0.1))

    def keys(self, annotations: torch.Tensor) -> torch.Tensor:
        """2 U h_j for source annotations (..., 2H) -> (..., A); doubled for the sigmoid form below."""
        return self.key_proj(annotations) * 2.0

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query = W s_{i-1} (N, A) -> context (N, 2H) and weights (N, S); mask_bias is -inf at padding.

        keys, values and mask_bias are per source sentence (B, ...); N = B * k queries read them, k consecutive
        ones per sentence (k beams in decoding, 1 in training), so beams share their sentence's memory."""
        alpha = self.weights(query, keys, mask_bias)
        return torch.bmm(alpha, values).view(query.size(0), -1), alpha.view(query.size(0), -1)

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """The attention weights alone, (B, k, S): what a weighted sum of anything per source position needs."""
        b = keys.size(0)
        k = query.size(0) // b
        queries = (2.0 * query).view(b, k, 1, -1)
        # The (B, k, S, A) elementwise passes below are memory-bound: without autograd, take them a few sentences
        # at a time so that each chunk stays in cache.
        step = b if torch.is_grad_enabled() else max(1, CHUNK_ELEMENTS // (k * keys.size(1) * keys.size(2)))
        scores = torch.cat([self._energies(keys[i:i + step], queries[i:i + step]) for i in range(0, b, step)])
        return torch.softmax(scores + mask_bias.unsqueeze(1), dim=-1)

    def _energies(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """v^T tanh(W s + U h_j) for (B, S, A) keys and (B, k, 1, A) queries -> (B, k, S)."""
        # v^T tanh(x) computed as 2 v^T sigmoid(2x) - sum(v): the same function, but torch's CPU sigmoid is about
        # twice as fast as its tanh, and this elementwise pass dominates attention's cost.
        hidden = torch.sigmoid_(keys.unsqueeze(1) + queries)
        return torch.matmul(hidden, 2.0 * self.v) - self.v.sum()
