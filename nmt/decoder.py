"""Recurrent decoder in Bahdanau order: context from s_{i-1}, LSTM input [emb(y_{i-1}); c_i], readout."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from nmt.attention import AdditiveAttention
from nmt.int8 import Int8Linear, int8_available
from nmt.onednn import PackedLinear, packable, padded_rows
from nmt.tokenizer import PAD
from nmt.weights import WeightCache

# Matmuls that Decoder.pack_weights sends to oneDNN, and the layer whose weights each one reads.
_PACKED_LAYERS = {"hidden_proj": "hidden_proj", "ctx_gates": "ctx_gates", "readout_context": "readout",
                  "readout": "readout", "out": "out"}
# Those that stay fp32 in an int8 decoder: the readout's step matmul (emb, s_i -> 256) is small, and at a few rows
# quantizing its input and oneDNN's int8 kernel cost twice its fp32 time, while in a full batch int8 saves a few %.
_FP32_IN_INT8 = {"readout"}
# Those whose inputs lie within +-1: the first layer's state s_{i-1} (an LSTM's o * tanh(c), a GRU's mix of its
# tanh and its previous state, tanh at s_0) and the readout t_i (a tanh). int8 quantizes them with that fixed range.
_INPUT_BOUNDS = {"hidden_proj": 1.0, "out": 1.0}
_PER_POSITION = {"values": 0.0, "keys": 0.0, "value_gates": 0.0, "value_readout": 0.0,
                 "mask_bias": float("-inf")}  # padding fill


@dataclass
class Memory:
    """What the decoder reads from the encoder, one row per source sentence.

    The decoder's rows may be k beams per sentence (k = its rows / the memory's), each reading its sentence's row."""

    values: torch.Tensor  # (B, S, C) annotations h_j
    keys: torch.Tensor | None  # (B, S, A) 2 U h_j (see AdditiveAttention.keys), once per source sentence
    mask_bias: torch.Tensor  # (B, S) 0 at real positions, -inf at padding
    summary: torch.Tensor  # (B, C) fixed context [fwd_last; bwd_first], used when attention is off
    summary_gates: torch.Tensor | None  # (B, G*H) its gate contribution, hoisted out of the step loop
    # (B, S, G*H) W_c h_j at inference: the context's gate term W_c c_i is their attention-weighted sum, a
    # (k x S) by (S x G*H) product per sentence instead of a (k x C) by (C x G*H) one per step.
    value_gates: torch.Tensor | None = None
    # (B, S, O) W_oc h_j at inference, likewise: the readout's context term W_oc c_i as their weighted sum. With it
    # the decoder never forms c_i itself (Decoder.step returns that term in its place).
    value_readout: torch.Tensor | None = None

    def _map(self, fn) -> Memory:
        return Memory(**{f: None if getattr(self, f) is None else fn(f, getattr(self, f)) for f in _FIELDS})

    def select(self, index: torch.Tensor, width: int | None = None) -> Memory:
        """These sentences' rows (a copy); with a width, over their first `width` source positions only (see cut)."""
        return (self if width is None else self.cut(width))._map(lambda _, t: t.index_select(0, index))

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(field name, tensor) for each field that is set."""
        return [(f, getattr(self, f)) for f in _FIELDS if getattr(self, f) is not None]

    @property
    def width(self) -> int:
        """Source positions S, padding included."""
        return self.values.size(1)

    def cut(self, width: int) -> Memory:
        """The same rows over their first `width` source positions (the rest must be padding): views, no copy."""
        return self._map(lambda name, t: t[:, :width] if name in _PER_POSITION else t)


_FIELDS = tuple(f.name for f in fields(Memory))  # every tensor a Memory may hold


class MemorySlots:
    """Sentences' memories in buffers with rows to spare, for a batch that sentences join and leave.

    A join writes only the new sentences' rows; a leave moves the last sentences into the freed slots (so the
    order of the sentences changes: `remove` says how); `memory` is a view of the live rows. The buffers are
    exactly as wide as the longest live source, so that the view stays contiguous (strided views make bmm copy):
    only a change of that width copies every row. Vocabulary biases are not kept here (their columns change with
    the batch's shortlist).
    """

    def __init__(self) -> None:
        self._buf: Memory | None = None
        self.size = 0

    @property
    def width(self) -> int:
        return 0 if self._buf is None else self._buf.width

    @property
    def capacity(self) -> int:
        """Rows the buffers hold."""
        return 0 if self._buf is None else self._buf.values.size(0)

    @property
    def memory(self) -> Memory:
        return self._buf._map(lambda _, t: t[:self.size])

    def stage(self, mem: Memory) -> Callable[[], None]:
        """Add a memory's rows after the live ones in two parts: this writes them (into new buffers if these have
        no room) without making them live, and the function it returns makes them live, which cannot fail; so
        that several slots take their rows all or none."""
        n, m = self.size, mem.values.size(0)
        width = max(self.width, mem.width)
        rows, buf = self.capacity, self._buf
        if n + m > rows or width > self.width:
            buf = self._resized(rows if n + m <= rows else max(n + m, 2 * rows), width, mem)
        _put(buf, n, mem)  # rows past the live ones: nobody reads them until the commit

        def commit() -> None:
            self._buf, self.size = buf, n + m
        return commit

    def remove(self, leaving: list[int], width: int) -> list[int]:
        """Free the rows at these positions and fit the buffers to width; returns the new order (for each live
        row, the position it had before)."""
        n = self.size
        gone = set(leaving)
        size = n - len(gone)
        holes = [i for i in sorted(gone) if i < size]
        movers = [j for j in range(size, n) if j not in gone]
        order = list(range(size))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
            # Row by row: a copy into a plain view is a memcpy, where indexed assignment of the same rows took ten
            # times as long (a 74 x 2,048 row of value_gates: 18 against 172 us), 3% of a batched step.
            for _, t in self._buf.tensors():
                t[hole].copy_(t[mover])
        self.size = size
        if width != self.width:
            self._buf = self._resized(self.capacity, width, None)
        return order

    def _resized(self, rows: int, width: int, like: Memory | None) -> Memory:
        """New buffers of rows x width (shaped as the live rows', or as `like`'s when there are none) holding the
        live rows, padded or cut to width."""
        def shape(name: str, t: torch.Tensor) -> torch.Tensor:  # rows past size: never read
            return t.new_empty((rows, width, *t.shape[2:]) if name in _PER_POSITION else (rows, *t.shape[1:]))
        buf = (like if self._buf is None else self._buf)._map(shape)
        if self._buf is not None:
            _put(buf, 0, self.memory)
        return buf


def _put(buf: Memory, start: int, mem: Memory) -> None:
    """Write a memory's rows into buffers from row `start` on, cut to the buffers' width (padding only) or padded in
    place: no padded copy on the way."""
    end, width = start + mem.values.size(0), buf.width
    for name, t in buf.tensors():
        rows = getattr(mem, name)
        if name not in _PER_POSITION:
            t[start:end] = rows
            continue
        shared = min(width, rows.size(1))
        t[start:end, :shared] = rows[:, :shared]
        if shared < width:
            t[start:end, shared:] = _PER_POSITION[name]


@dataclass
class SegmentedMemory:
    """A batch's memories in parts, each as wide as its own longest source: the decoder's rows read the parts'
    sentences in order (k rows each), and attention over each part skips the padding a single memory as wide
    as the batch's longest source would hold."""

    parts: list[Memory]
    # (B, V') over all parts' sentences, with a shortlist: 0 on the sentence's own pieces, -inf elsewhere
    vocab_bias: torch.Tensor | None = None


@dataclass
class OutputVocab:
    """The part of the target vocabulary a decoding batch computes logits for (a shortlist)."""

    ids: torch.Tensor  # (V',) sorted target ids
    layer: nn.Linear  # the whole output layer
    onednn: PackedLinear | Int8Linear | None = None  # on the CPU: those rows and biases prepacked for oneDNN

    @functools.cached_property
    def weight(self) -> torch.Tensor:
        """(V', out_dim) their rows of the output layer (fp32), gathered at first use: never where oneDNN runs."""
        return self.layer.weight.index_select(0, self.ids)

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """(V',) their biases, likewise."""
        return self.layer.bias.index_select(0, self.ids)

    def logits(self, readout: torch.Tensor) -> torch.Tensor:
        """(N, out_dim) readout -> (N, V') logits."""
        if self.onednn is not None and not torch.is_grad_enabled():
            return self.onednn(readout)[:, :self.ids.numel()]  # it computes a few rows more: see output_vocab
        return torch.addmm(self.bias, readout, self.weight.t())


@dataclass
class State:
    """Recurrent state per decoder layer: h (and c for LSTM), each (B, H)."""

    h: list[torch.Tensor]
    c: list[torch.Tensor] | None

    def select(self, index: torch.Tensor) -> State:
        h = [t.index_select(0, index) for t in self.h]
        c = None if self.c is None else [t.index_select(0, index) for t in self.c]
        return State(h, c)

    @staticmethod
    def cat(parts: list[State]) -> State:
        """The rows of several states, in order."""
        h = [torch.cat(layer) for layer in zip(*(p.h for p in parts), strict=True)]
        c = None if parts[0].c is None else [torch.cat(layer) for layer in zip(*(p.c for p in parts), strict=True)]
        return State(h, c)


class Decoder(nn.Module):
    """Stacked LSTM/GRU decoder with additive attention (or a fixed context when attention is off).

    The first layer's previous state is the attention query (Bahdanau's s_{i-1} when there is one layer, the
    GNMT arrangement when there are more); upper layers are residual. The output layer reads [s_i; c_i;
    emb(y_{i-1})]. Target embeddings, their input projection and the output projections are computed for all
    time steps at once outside the step loop.
    """

    def __init__(self, vocab_size: int, emb_dim: int, ctx_dim: int, hidden: int, attn_dim: int, out_dim: int,
                 layers: int, cell: str, dropout: float, attention: bool, tie_embeddings: bool):
        super().__init__()
        self.lstm = cell == "lstm"
        self.hidden = hidden
        gates = (4 if self.lstm else 3) * hidden
        self.attn_dim = attn_dim if attention else 0
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=PAD)
        self.emb_gates = nn.Linear(emb_dim, gates)  # hoisted: applied to all target embeddings at once
        self.ctx_gates = nn.Linear(ctx_dim, gates, bias=False)
        # One matmul on s_{i-1} gives both the attention query W s_{i-1} and the recurrent term W_hh s_{i-1}.
        self.hidden_proj = nn.Linear(hidden, self.attn_dim + gates)
        self.attention = AdditiveAttention(ctx_dim, attn_dim) if attention else None
        cell_type = nn.LSTMCell if self.lstm else nn.GRUCell
        self.upper = nn.ModuleList(cell_type(hidden, hidden) for _ in range(layers - 1))
        self.init_proj = nn.Linear(ctx_dim // 2, layers * hidden)
        self.readout = nn.Linear(hidden + ctx_dim + emb_dim, out_dim)
        self.out = nn.Linear(out_dim, vocab_size)
        if tie_embeddings:
            self.out.weight = self.embed.weight
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("gate_table", None, persistent=False)
        self._pack_matmuls = False  # see pack_weights
        self._linear: type[PackedLinear] | type[Int8Linear] = PackedLinear  # what packs them
        self._packed: WeightCache[PackedLinear | Int8Linear] = WeightCache()  # by _PACKED_LAYERS name

    def pack_weights(self, int8: bool = False) -> bool:
        """For CPU inference: run the matmuls of decoding's fixed weights (hidden_proj, the readout, the context
        hoists, the whole-vocabulary output layer) through oneDNN, in fp32 (nmt.onednn) or int8 (nmt.int8),
        whenever neither training nor recording gradients; whether this model can. Each layer is packed at its
        first use and again after its weights change (an optimizer step, load_state_dict, .to()), so the packed
        copies never go stale; a batch's shortlisted output rows are packed with the batch's list (output_vocab)."""
        self._pack_matmuls = packable(self.hidden_proj.weight)
        self._linear = Int8Linear if int8 and self._pack_matmuls and int8_available() else PackedLinear
        self._packed.clear()
        return self._pack_matmuls

    def can_int8(self) -> bool:
        """Whether int8 can decode this model here: this torch build has oneDNN's int8 matmul, and the weights are
        finite (a non-finite weight would quantize to finite nonsense, where fp32 ends the search as overflowed)."""
        return int8_available() and all(bool(torch.isfinite(p).all()) for p in self.parameters())

    @property
    def packs_int8(self) -> bool:
        """Whether pack_weights took in int8 (where oneDNN's int8 matmul is missing it packs fp32)."""
        return self._pack_matmuls and self._linear is Int8Linear

    @property
    def packs_matmuls(self) -> bool:
        """Whether pack_weights took: decoding's fixed matmuls go through oneDNN."""
        return self._pack_matmuls

    def _may_pack(self, layer: nn.Linear) -> bool:
        """Whether this layer's matmuls may go through oneDNN now (see pack_weights)."""
        return (self._pack_matmuls and not self.training and not torch.is_grad_enabled()
                and packable(layer.weight, probe=False))  # not moved off the CPU since

    def _packed_for(self, name: str) -> PackedLinear | Int8Linear | None:
        """The packed matmul for this layer (a key of _PACKED_LAYERS), if it may be used now."""
        layer = getattr(self, _PACKED_LAYERS[name])
        if not self._may_pack(layer):
            return None

        def pack() -> PackedLinear | Int8Linear:
            if name in _FP32_IN_INT8 or self._linear is PackedLinear:
                return PackedLinear(*self._pack_source(name, layer))
            return Int8Linear(*self._pack_source(name, layer), input_bound=_INPUT_BOUNDS.get(name))
        return self._packed.get(name, [layer.weight, layer.bias], pack)

    def _pack_source(self, name: str, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight (out, in) and bias of the matmul a packed layer computes."""
        if name == "readout_context":
            return self._readout_columns()[1], None
        if name == "readout":  # the columns that read [s_i; emb(y_{i-1})]
            state, _, emb = self._readout_columns()
            return torch.cat([state, emb], 1), layer.bias
        return layer.weight, layer.bias

    def _readout_columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The readout weight's columns that read s_i, c_i (W_oc) and emb(y_{i-1})."""
        weight, h, e = self.readout.weight, self.hidden, self.embed.embedding_dim
        return weight[:, :h], weight[:, h:weight.size(1) - e], weight[:, weight.size(1) - e:]

    def cache_embedding_gates(self, max_mb: float) -> bool:
        """For inference: precompute emb_gates(embed(y)) for the whole target vocabulary when the table takes at
        most max_mb, so that each decoding step gathers rows instead of running a matmul; whether it did.

        The table is a snapshot: only call this on a model whose weights will not change (a Translator's)."""
        if self.embed.num_embeddings * self.emb_gates.out_features * 4 > max_mb * 2**20:
            return False
        with torch.no_grad():
            self.gate_table = self.emb_gates(self.embed.weight)
        return True

    def init_state(self, mem: Memory) -> State:
        """s_0 = tanh(W_init bwd_1) for every layer, one row per sentence; LSTM cells start at zero."""
        half = mem.values.size(2) // 2
        h = torch.tanh(self.init_proj(mem.values[:, 0, half:])).split(self.hidden, dim=1)
        c = [torch.zeros_like(x) for x in h] if self.lstm else None
        return State(list(h), c)

    def _first_cell(self, x: torch.Tensor, hh: torch.Tensor, h: torch.Tensor,
                    c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first layer's cell from its input gates x and recurrent gates hh (both bias-included)."""
        if self.lstm:
            i, f, g, o = (x + hh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        xr, xz, xn = x.chunk(3, 1)
        hr, hz, hn = hh.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return n + z * (h - n), None

    def step(self, emb_gates: torch.Tensor, state: State, mem: Memory | SegmentedMemory
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, State]:
        """One time step from the target embedding's gate term -> (output s_i, context c_i, weights, state).

        With a memory that holds value_readout, the readout's context term W_oc c_i comes instead of c_i. With a
        SegmentedMemory, the weights are zero-padded to its widest part."""
        proj = (self._packed_for("hidden_proj") or self.hidden_proj)(state.h[0])
        parts = mem.parts if isinstance(mem, SegmentedMemory) else [mem]
        k = proj.size(0) // sum(part.values.size(0) for part in parts)
        if self.attention is not None:
            query, hh = proj.split([self.attn_dim, proj.size(1) - self.attn_dim], dim=1)
            ctx, alpha, ctx_gates = self._attend(query, parts, k)
            x = emb_gates + (self.ctx_gates(ctx) if ctx_gates is None else ctx_gates)
        else:
            summary = torch.cat([part.summary for part in parts])
            hh, ctx, alpha = proj, summary.repeat_interleave(k, dim=0), None
            x = emb_gates + torch.cat([part.summary_gates for part in parts]).repeat_interleave(k, dim=0)
        h0, c0 = self._first_cell(x, hh, state.h[0], None if state.c is None else state.c[0])
        hs, cs = [h0], [c0]
        out = h0
        for layer, cell in enumerate(self.upper, start=1):
            if self.lstm:
                h, c = cell(self.dropout(out), (state.h[layer], state.c[layer]))
            else:
                h, c = cell(self.dropout(out), state.h[layer]), None
            hs.append(h)
            cs.append(c)
            out = out + h
        return out, ctx, alpha, State(hs, cs if self.lstm else None)

    def hoist(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For inference: W_c h_j and W_oc h_j for annotations (..., C) (Memory.value_gates, .value_readout)."""
        gates = self._packed_for("ctx_gates")
        if gates is not None:
            return gates(values), self._packed_for("readout_context")(values)
        return self.ctx_gates(values), F.linear(values, self._readout_columns()[1])

    def _attend(self, query: torch.Tensor, parts: list[Memory],
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Context (or the readout's context term, with hoisted memories), attention weights (zero-padded to the
        widest part) and, with hoisted memories, the context's gate term, for k query rows per sentence."""
        ctxs, alphas, gates, start = [], [], [], 0
        for part in parts:
            rows = k * part.values.size(0)
            query_rows = query[start:start + rows]
            if part.value_readout is None:
                ctx, alpha = self.attention(query_rows, part.keys, part.values, part.mask_bias)
            else:
                weights = self.attention.weights(query_rows, part.keys, part.mask_bias)
                ctx, alpha = torch.bmm(weights, part.value_readout).view(rows, -1), weights.view(rows, -1)
                gates.append(torch.bmm(weights, part.value_gates).view(rows, -1))
            ctxs.append(ctx)
            alphas.append(alpha)
            start += rows
        if len(parts) == 1:
            return ctxs[0], alphas[0], gates[0] if gates else None
        width = max(a.size(1) for a in alphas)
        alpha = torch.cat([F.pad(a, (0, width - a.size(1))) for a in alphas])
        return torch.cat(ctxs), alpha, torch.cat(gates) if gates else None

    def output_layer(self, out: torch.Tensor, ctx: torch.Tensor, emb: torch.Tensor,
                     hoisted: bool = False) -> torch.Tensor:
        """Readout t_i = tanh(W_o [s_i; c_i; emb(y_{i-1})]), before the vocabulary projection.

        hoisted: ctx holds the readout's context term W_oc c_i already (see Memory.value_readout)."""
        if not hoisted:
            return self.dropout(torch.tanh(self.readout(torch.cat([out, ctx, emb], dim=-1))))
        packed = self._packed_for("readout")
        if packed is not None:
            readout = packed(torch.cat([out, emb], dim=-1)).add_(ctx)
            return self.dropout(torch.tanh(readout))
        state_columns, _, emb_columns = self._readout_columns()
        rows, h, e = out.shape[:-1], out.size(-1), emb.size(-1)
        readout = torch.addmm(ctx.reshape(-1, ctx.size(-1)), out.reshape(-1, h), state_columns.t())
        readout.addmm_(emb.reshape(-1, e), emb_columns.t())
        return self.dropout(torch.tanh(readout.add_(self.readout.bias))).view(*rows, -1)

    def forward(self, tgt_in: torch.Tensor, state: State, mem: Memory) -> torch.Tensor:
        """Teacher-forced pass over (B, T) target inputs -> (B, T, out_dim) readout vectors."""
        emb = self.dropout(self.embed(tgt_in.t()))  # time-major (T, B, E): each step reads a contiguous slice
        gates = self.emb_gates(emb)
        outs, ctxs = [], []
        # unbind, not gates[t]: indexing's backward would zero-fill a full (T, B, G) gradient at every step.
        for step_gates in gates.unbind(0):
            out, ctx, _, state = self.step(step_gates, state, mem)
            outs.append(out)
            ctxs.append(ctx)
        readout = self.output_layer(torch.stack(outs), torch.stack(ctxs), emb, mem.value_readout is not None)
        return readout.transpose(0, 1)

    def vocab_logits(self, readout: torch.Tensor) -> torch.Tensor:
        """Readout vectors (..., out_dim) -> logits over the whole target vocabulary."""
        return (self._packed_for("out") or self.out)(readout)

    def output_vocab(self, ids: torch.Tensor) -> OutputVocab:
        """The output layer restricted to the target ids (sorted), for decoding over a shortlist."""
        if not self._may_pack(self.out):
            return OutputVocab(ids, self.out)
        # Packed anew whenever a batch's shortlist changes (sentences join, or an eighth of it goes unused), for a
        # third less time in the matmul at every step. oneDNN keeps a kernel for each shape (about half a megabyte
        # each), so the rows are padded (with copies of the last) to one of 8 widths per doubling. int8 weights
        # are quantized per row, so the shortlist's rows quantize as they do in the whole layer.
        n = ids.numel()
        packed = self._packed_for("out").select(torch.cat([ids, ids[-1:].expand(padded_rows(n) - n)]))
        return OutputVocab(ids, self.out, onednn=packed)

    def step_logprobs(self, prev: torch.Tensor, state: State, mem: Memory | SegmentedMemory,
                      vocab: OutputVocab | None = None) -> tuple[torch.Tensor, torch.Tensor | None, State]:
        """Inference step from previous tokens (N,) -> log-probabilities (N, V), attention (N, S), state.

        With a vocab, the log-probabilities are over its ids (N, V'), each row normalized over the pieces
        a SegmentedMemory's vocab_bias leaves open."""
        emb = self.embed(prev)
        table = None if self.training else self.gate_table
        gates = self.emb_gates(emb) if table is None else table.index_select(0, prev)
        out, ctx, alpha, state = self.step(gates, state, mem)
        hoisted = (mem.parts[0] if isinstance(mem, SegmentedMemory) else mem).value_readout is not None
        readout = self.output_layer(out, ctx, emb, hoisted)
        if vocab is None:
            logits = self.vocab_logits(readout)
        else:
            logits = vocab.logits(readout)
            bias = mem.vocab_bias if isinstance(mem, SegmentedMemory) else None
            if bias is not None:
                logits = (logits.view(bias.size(0), -1, logits.size(1)) + bias.unsqueeze(1)).view(logits.shape)
        return torch.log_softmax(logits.float(), dim=-1), alpha, state
