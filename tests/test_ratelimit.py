"""The per-client token buckets behind NMT_RATE_LIMIT."""

from __future__ import annotations

from service.ratelimit import RateLimiter


def test_a_client_gets_its_burst_then_waits_for_refills():
    now = [0.0]
    limiter = RateLimiter(2, 60.0, clock=lambda: now[0])
    assert [limiter.acquire("a"), limiter.acquire("a")] == [0.0, 0.0]
    assert limiter.acquire("a") == 30.0  # one token every 30 s
    assert limiter.acquire("b") == 0.0  # another client's bucket
    now[0] = 30.0
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") == 30.0


def test_an_idle_client_gets_its_burst_and_no_more_and_waits_only_for_what_is_missing():
    now = [0.0]
    limiter = RateLimiter(2, 60.0, clock=lambda: now[0])
    assert limiter.acquire("a") == 0.0
    now[0] = 3600.0  # an hour idle refills to two tokens, not 120
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 30.0]
    now[0] += 15.0  # half a token back: the wait is the other half
    assert limiter.acquire("a") == 15.0


def test_memory_and_eviction_work_stay_bounded_when_every_client_is_refilling(monkeypatch):
    # Over max_clients clients still refilling (as many addresses as one IPv6 network holds) made every request
    # rebuild the whole table, and the table grew without bound.
    now = [0.0]
    limiter = RateLimiter(1, 3600.0, clock=lambda: now[0], max_clients=100)
    passes = []
    real = limiter._evict
    monkeypatch.setattr(limiter, "_evict", lambda at: passes.append(at) or real(at))
    for n in range(1000):
        now[0] += 0.001
        limiter.acquire(f"client{n}")
        assert len(limiter._buckets) <= 100
    assert len(passes) <= 1000 // 10 + 1  # once per tenth of max_clients in new clients, not per request
    assert limiter.acquire("client999") > 0  # the most recent clients are remembered, still limited
    assert limiter.acquire("client0") == 0.0  # forgotten: it starts again with a full bucket
