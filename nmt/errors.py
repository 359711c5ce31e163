"""The one exception type for problems a user can fix (bad input, bad config, missing files, a full disk)."""


class NMTError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero, the service maps it to a 4xx."""
