"""Per-client token-bucket rate limiting."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    """Allows `requests` per `period` seconds per client, with bursts up to `requests`."""

    def __init__(self, requests: int, period: float, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 100_000):
        self.capacity = float(requests)
        self.per_second = requests / period
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last update)

    def acquire(self, client: str) -> float:
        """Take one token for `client`: 0.0 when allowed, else the seconds until a token is free."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.per_second)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_clients:
                self._forget_full(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.per_second

    def _forget_full(self, now: float) -> None:
        """Drop clients whose bucket has refilled: forgetting them changes nothing, and bounds memory."""
        self._buckets = {client: (tokens, last) for client, (tokens, last) in self._buckets.items()
                         if tokens + (now - last) * self.per_second < self.capacity}
