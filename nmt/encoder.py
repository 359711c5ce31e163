"""Bidirectional recurrent encoder over padded batches: annotations h_j = [fwd_j; bwd_j]."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.tokenizer import PAD
from nmt.weights import WeightCache

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
        self._layouts: WeightCache[_Layout] = WeightCache()  # by layer: their weights as _infer_layer reads them

    @property
    def out_dim(self) -> int:
        return 2 * self.hidden

    def forward(self, src: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """(B, S) ids and (B,) lengths -> (B, S, 2*hidden) annotations, zero at padded positions."""
        if not (self.training or torch.is_grad_enabled() or src.is_cuda) and int(lens.min()) < src.size(1):
            return self._infer(src, lens)
        x = self.dropout(self.embed(src))
        for i, rnn in enumerate(self.rnns):
            out = _packed(rnn, x, lens) if x.is_cuda else _both_ways(rnn, x, lens)
            x = self.dropout(out) + x if i > 0 else self.dropout(out)
        return x

    def _infer(self, src: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """forward at inference on the CPU, for a padded batch: each layer's two directions step together over the
        real positions only (see _Packing), where oneDNN's RNN runs them one after the other over the padding too
        (half of a server's join of 15 Bible verses). On a 2-core Xeon: 1.4-1.6x as fast for 15 verses, 1.9x for
        30, 2.2x for 128 (a CLI batch); about even for 2 to 8. A batch without padding (a single sentence) keeps
        oneDNN's one call for both directions, faster there. A source's annotations are the same whatever else is
        in the batch, up to float rounding."""
        b, s = src.shape
        packing = _Packing(lens, s)
        x = self.embed(src.reshape(-1).index_select(0, packing.forward))  # (T, E), time-major, longest first
        for i in range(len(self.rnns)):
            out = _infer_layer(self._layout(i), x, packing)
            x = out + x if i > 0 else out
        values = x.new_zeros(b * s, x.size(1))
        return values.index_copy_(0, packing.forward, x).view(b, s, -1)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Encoder:
        self._layouts.clear()  # .to(), .cuda(), .half(): the copies are of the old weights
        return super()._apply(fn, recurse)

    def _layout(self, layer: int) -> _Layout:
        """The layer's weights as _infer_layer reads them (kept while they stay as they are: see WeightCache)."""
        rnn = self.rnns[layer]
        return self._layouts.get(layer, [*_weights(rnn, ""), *_weights(rnn, "_reverse")], lambda: _Layout(rnn))


class _Layout:
    """A bidirectional layer's weights for _infer_layer: both directions stacked, each transposed to (in, gates)
    and contiguous (a transposed view made the per-step matmul 1.5x slower)."""

    def __init__(self, rnn: nn.RNNBase):
        with torch.no_grad():
            pairs = zip(_weights(rnn, ""), _weights(rnn, "_reverse"), strict=True)
            w_ih, w_hh, b_ih, b_hh = (torch.stack(pair) for pair in pairs)
            self.lstm = isinstance(rnn, nn.LSTM)
            self.hidden = rnn.hidden_size
            # An LSTM's two biases add up; a GRU's recurrent one stays inside its reset gate.
            b_ih, b_hh = (b_ih + b_hh if self.lstm else b_ih), b_hh
            if self.lstm:  # the cell input g doubled: one sigmoid gives all four gates, tanh(g) = 2 sigmoid(2g) - 1
                double = torch.ones(4, 1, 1, dtype=w_ih.dtype, device=w_ih.device)
                double[2] = 2.0
                w_ih, w_hh, b_ih = ((t.view(2, 4, self.hidden, -1) * double).view(t.shape) for t in (w_ih, w_hh, b_ih))
            self.input = w_ih.transpose(1, 2).contiguous()  # (2, in, G)
            self.recurrent = w_hh.transpose(1, 2).contiguous()  # (2, H, G)
            self.input_bias = b_ih.unsqueeze(1)
            self.recurrent_bias = b_hh.unsqueeze(1)


class _Packing:
    """The real positions of a padded (B, S) batch in time-major order, its sources longest first (as a packed
    sequence), so that time step t is the first counts[t] rows of its block and each row's state is a prefix of the
    step before's. A backward direction reads each source reversed within its own length, and the same packing
    holds its positions: the one at row r of step t is position lens[r] - 1 - t of that source."""

    def __init__(self, lens: torch.Tensor, width: int):
        lens = lens.cpu()
        order = torch.argsort(lens, descending=True, stable=True)
        longest_first = lens.index_select(0, order)
        steps = torch.arange(width).unsqueeze(1)
        real = longest_first.unsqueeze(0) > steps  # (S, B)
        self.counts: list[int] = real.sum(1).tolist()
        start = order.unsqueeze(0) * width
        self.forward = (start + steps).masked_select(real)  # flat padded index of each packed position
        backward = (start + longest_first.unsqueeze(0) - 1 - steps).masked_select(real)
        where = torch.empty(lens.numel() * width, dtype=torch.long)
        where[self.forward] = torch.arange(self.forward.numel())
        # packed position read by the backward direction -> the forward one of that source position; its own inverse
        self.reverse = where.index_select(0, backward)


def _infer_layer(layer: _Layout, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
    """One bidirectional LSTM/GRU layer (eval mode) over packed inputs (T, in) -> (T, 2H), both in forward order.

    Both directions run as one batched matmul per time step, on the rows still running; their input terms come
    from one matmul over all positions beforehand."""
    inputs = torch.stack([x, x.index_select(0, packing.reverse)])
    gates = torch.baddbmm(layer.input_bias, inputs, layer.input)  # (2, T, G)
    recurrent, hidden = layer.recurrent, layer.hidden
    out = x.new_empty(2, x.size(0), hidden)
    h = x.new_zeros(2, packing.counts[0] if packing.counts else 0, hidden)
    c = torch.zeros_like(h)
    start = 0
    for n in packing.counts:
        prev, step_gates = h[:, :n], gates[:, start:start + n]
        h = out[:, start:start + n]
        if layer.lstm:
            z = torch.baddbmm(step_gates, prev, recurrent).sigmoid_()
            i, f, g, o = z.chunk(4, 2)
            c = f.mul(c[:, :n]).addcmul_(i, g, value=2.0).sub_(i)
            torch.tanh(c, out=h)
            h.mul_(o)
        else:
            hh = torch.baddbmm(layer.recurrent_bias, prev, recurrent)
            r, u = torch.sigmoid(step_gates[..., :2 * hidden] + hh[..., :2 * hidden]).chunk(2, 2)
            new = torch.tanh(step_gates[..., 2 * hidden:] + r * hh[..., 2 * hidden:])
            torch.addcmul(new, u, prev - new, out=h)
        start += n
    return torch.cat([out[0], out[1].index_select(0, packing.reverse)], dim=1)


def _packed(rnn: nn.Module, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """The bidirectional layer over a packed sequence (cuDNN takes packed batches as they are)."""
    packed = pack_padded_sequence(x, lens.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0]


def _both_ways(rnn: nn.RNNBase, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """The bidirectional layer as two one-way passes over the padded batch, the backward one over each sequence
    reversed within its own length, so that padding only ever follows the real positions (where it cannot reach
    them). On CPU this runs oneDNN's fused RNN, which packed sequences do not get: 1.4-2x as fast in training,
    and 2-3x at inference on batches of several sentences. Without padding (a single sentence, as most of a
    server's joins are), one bidirectional call gives the same numbers, and oneDNN runs its two directions at once."""
    b, s, _ = x.shape
    if int(lens.min()) == s:
        return rnn(x)[0]
    pos = torch.arange(s, device=x.device)
    lens = lens.to(x.device).unsqueeze(1)
    rev = lens - 1 - pos
    rev = torch.where(rev >= 0, rev, pos).unsqueeze(2)  # a permutation that is its own inverse
    fwd = _one_way(rnn, x, "")
    bwd = _one_way(rnn, x.gather(1, rev.expand_as(x)), "_reverse")
    out = torch.cat([fwd, bwd.gather(1, rev.expand_as(bwd))], dim=2)
    return out * (pos < lens).unsqueeze(2).to(out.dtype)


def _one_way(rnn: nn.RNNBase, x: torch.Tensor, suffix: str) -> torch.Tensor:
    """One direction of a one-layer bidirectional LSTM/GRU (its weights with this suffix) from a zero state."""
    weights = _weights(rnn, suffix)
    h0 = x.new_zeros(1, x.size(0), rnn.hidden_size)
    if isinstance(rnn, nn.LSTM):
        return torch.lstm(x, (h0, h0), weights, True, 1, 0.0, rnn.training, False, True)[0]
    return torch.gru(x, h0, weights, True, 1, 0.0, rnn.training, False, True)[0]


def _weights(rnn: nn.RNNBase, suffix: str) -> list[torch.Tensor]:
    """A one-layer LSTM/GRU's weight_ih, weight_hh, bias_ih and bias_hh for one direction ("" or "_reverse")."""
    return [getattr(rnn, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
