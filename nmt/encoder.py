"""Bidirectional recurrent encoder over packed sequences: annotations h_j = [fwd_j; bwd_j]."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.tokenizer import PAD

RNN_TYPES = {"lstm": nn.LSTM, "gru": nn.GRU}


class Encoder(nn.Module):
    """Embeds source ids and runs stacked bidirectional LSTM/GRU layers with residual connections."""

    def __init__(self, vocab_size: int, emb_dim: int, hidden: int, layers: int, cell: str, dropout: float):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD)
        rnn = RNN_TYPES[cell]
        self.rnns = nn.ModuleList(
            rnn(emb_dim if i == 0 else 2 * hidden, hidden, batch_first=True, bidirectional=True)
            for i in range(layers)
        )
        self.dropout = nn.Dropout(dropout)

    @property
    def out_dim(self) -> int:
        return 2 * self.hidden

    def forward(self, src: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """(B, S) ids and (B,) lengths -> (B, S, 2*hidden) annotations, zero at padded positions."""
        x = self.dropout(self.embed(src))
        for i, rnn in enumerate(self.rnns):
            packed = pack_padded_sequence(x, lens.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
            x = self.dropout(out) + x if i > 0 else self.dropout(out)
        return x
