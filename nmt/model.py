"""The RNNsearch sequence-to-sequence model: encoder, decoder and the training loss."""

from __future__ import annotations

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.decoder import Decoder, Memory, OutputVocab, SegmentedMemory, State
from nmt.encoder import Encoder
from nmt.loss import output_loss
from nmt.tokenizer import PAD


class Seq2Seq(nn.Module):
    """Bidirectional encoder + attentional decoder (RNNsearch), or RNNencdec when attention is none."""

    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(src_vocab, cfg.emb_dim, cfg.enc_hidden, cfg.layers, cfg.cell, cfg.dropout)
        self.decoder = Decoder(tgt_vocab, cfg.emb_dim, self.encoder.out_dim, cfg.dec_hidden, cfg.attn_dim,
                               cfg.out_dim, cfg.layers, cfg.cell, cfg.dropout, cfg.attention != "none",
                               cfg.tie_embeddings)
        # PyTorch's default initialization (fan-in scaled; embeddings N(0, 1)): OpenNMT-py's uniform +-0.1
        # everywhere left small models stuck on a plateau for hundreds of steps. A tied embedding also serves
        # as the output layer, where N(0, 1) would start with a near one-hot softmax, so it gets N(0, 1/d).
        if cfg.tie_embeddings:
            nn.init.normal_(self.decoder.embed.weight, 0.0, cfg.emb_dim ** -0.5)
            with torch.no_grad():
                self.decoder.embed.weight[PAD].zero_()

    def encode(self, src: torch.Tensor, lens: torch.Tensor) -> Memory:
        values = self.encoder(src, lens)
        mask = src == PAD
        mask_bias = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
        mask_bias.masked_fill_(mask, float("-inf"))
        half = values.size(2) // 2
        last = (lens.to(values.device) - 1).clamp(min=0)
        fwd_last = values[torch.arange(values.size(0), device=values.device), last, :half]
        summary = torch.cat([fwd_last, values[:, 0, half:]], dim=1)
        attention = self.decoder.attention
        if attention is not None:
            # Inference hoists W_c h_j and W_oc h_j out of the step loop. Training keeps W_c c_i per step (its
            # backward is cheaper that way).
            if self.training:
                return Memory(values, attention.keys(values), mask_bias, summary, None)
            # The annotations are zero at padding, and so are these bias-free projections of them: computed at the
            # real positions only, since a batch of sources of different lengths is a third padding or more.
            real = ~mask
            flat = values[real]
            projected = (attention.keys(flat), *self.decoder.hoist(flat))
            keys, value_gates, value_readout = (_spread(t, real) for t in projected)
            return Memory(values, keys, mask_bias, summary, None, value_gates, value_readout)
        return Memory(values, None, mask_bias, summary, self.decoder.ctx_gates(summary))

    def init_state(self, mem: Memory) -> State:
        return self.decoder.init_state(mem)

    def forward(self, src: torch.Tensor, lens: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor,
                label_smoothing: float = 0.0, sampled_softmax: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass: summed label-smoothed loss and summed NLL over the real target tokens (over the
        whole vocabulary, or a sampled softmax with that many drawn pieces: see nmt.loss.output_loss)."""
        mem = self.encode(src, lens)
        readout = self.decoder(tgt_in, self.init_state(mem), mem)
        real = tgt_out != PAD
        # Project only real positions to the vocabulary: padding would cost the biggest matmul for nothing.
        return output_loss(readout[real], self.decoder.out, tgt_out[real], label_smoothing, sampled_softmax)

    def step(self, prev: torch.Tensor, state: State, mem: Memory | SegmentedMemory,
             vocab: OutputVocab | None = None) -> tuple[torch.Tensor, torch.Tensor | None, State]:
        """One decoding step: log-probabilities (N, V) (or over a shortlist's ids), attention weights (N, S)
        and the new state."""
        return self.decoder.step_logprobs(prev, state, mem, vocab)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _spread(rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(T, D) rows for the T true positions of a (B, S) mask -> (B, S, D), zero elsewhere."""
    out = rows.new_zeros(*real.shape, rows.size(-1))
    out[real] = rows
    return out
