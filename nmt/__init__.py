"""rnnsearch: RNNsearch neural machine translation (bidirectional LSTM encoder, Bahdanau attention)."""

__version__ = "0.1.0"
