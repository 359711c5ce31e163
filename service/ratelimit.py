"""Per-client token-bucket rate limiting."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

KEEP_AFTER_EVICTION = 0.9  # of max_clients: evictions then come once per tenth of it in new clients, not per request


class RateLimiter:
    """Allows `requests` per `period` seconds per client, with bursts up to `requests`; remembers at most
    `max_clients` clients."""

    def __init__(self, requests: int, period: float, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 100_000):
        self.capacity = float(requests)
        self.per_second = requests / period
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last update), least recent first

    def acquire(self, client: str) -> float:
        """Take one token for `client`: 0.0 when allowed, else the seconds until a token is free."""
        now = self._clock()
        tokens, last = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.per_second)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self._max_clients:
            self._evict(now)
        return 0.0 if allowed else (1.0 - tokens) / self.per_second

    def _evict(self, now: float) -> None:
        """Forget the clients whose bucket has refilled (which changes nothing for them), then, while more than
        KEEP_AFTER_EVICTION x max_clients are left, those seen least recently: memory stays bounded, and so does
        the time these passes take per request, however many clients are refilling at once (each request over
        the bound rebuilt the whole table)."""
        live = [(client, (tokens, last)) for client, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.per_second < self.capacity]
        keep = int(self._max_clients * KEEP_AFTER_EVICTION)
        self._buckets = dict(itertools.islice(live, max(0, len(live) - keep), None))
