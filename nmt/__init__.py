"""rnnsearch: RNNsearch neural machine translation (bidirectional LSTM encoder, Bahdanau attention)."""

__version__ = "0.1.0"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the CLI's, and a service worker process's
