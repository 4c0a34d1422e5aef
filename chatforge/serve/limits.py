"""Limits the server keeps per client, in memory (one process): rate buckets and failure back-off.

``RateLimiter``: a token bucket per identity (API key, user, or client address). The
request limit takes 1 per request; the token limit takes a request's worst case (prompt
tokens + max_tokens for every prompt) before it runs and gives back what it did not use.

``FailureThrottle``: exponential back-off on failed attempts (a login per account and
address, an API key per address), as OWASP's authentication cheat sheet asks: no hard
lock-out that anyone could trigger for someone else, just slower and slower guessing.
An attempt is counted *when it starts*, under a lock, before the password or key is
checked, so parallel guesses cannot all pass between "check" and "record"; a success
forgets the key's failures, and only that key's.
"""

from __future__ import annotations

import math
import threading
import time

__all__ = ["FailureThrottle", "RateLimiter"]


class RateLimiter:
    """Token buckets: ``per_minute`` of burst, refilled at ``per_minute / 60`` per second; 0 = off."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def _level(self, ident: str, now: float) -> float:
        rate, cap = self.per_minute / 60.0, float(self.per_minute)
        tokens, last = self._buckets.get(ident, (cap, now))
        return min(cap, tokens + (now - last) * rate)

    def check(self, ident: str, cost: float = 1.0) -> float:
        """0 if ``ident`` may spend ``cost`` now (and it is spent), else seconds until it may
        (``math.inf`` when ``cost`` exceeds the whole bucket: it never may)."""
        if self.per_minute <= 0:
            return 0.0
        if cost > self.per_minute:
            return math.inf
        now = time.monotonic()
        with self._lock:
            tokens = self._level(ident, now)
            if tokens >= cost:
                self._buckets[ident] = (tokens - cost, now)
                return 0.0
            self._buckets[ident] = (tokens, now)
            if len(self._buckets) > 10_000:  # forget idle clients (their buckets would be full anyway)
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60.0}
            return (cost - tokens) / (self.per_minute / 60.0)

    def refund(self, ident: str, amount: float) -> None:
        """Give back what a request took but did not use (e.g. tokens it never generated)."""
        if self.per_minute <= 0 or amount <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._buckets[ident] = (min(float(self.per_minute), self._level(ident, now) + amount), now)


class FailureThrottle:
    """Back-off per key: ``free`` failures at once, then each attempt must wait
    ``base * 2**(k)`` seconds after the previous one (k = failures beyond ``free``, at most
    ``cap`` seconds). A key's failures are forgotten after ``forget`` seconds without attempts."""

    def __init__(self, free: int = 5, base: float = 1.0, cap: float = 300.0, forget: float = 3600.0) -> None:
        self.free, self.base, self.cap, self.forget = free, base, cap, forget
        self._keys: dict[str, tuple[int, float]] = {}  # key -> (failed attempts, time of the last one)
        self._lock = threading.Lock()

    def delay(self, failures: int) -> float:
        """Seconds an attempt must wait after the previous one, once ``failures`` are on record."""
        if failures < self.free:
            return 0.0
        return min(self.cap, self.base * 2.0 ** (failures - self.free))

    def attempt(self, key: str) -> float:
        """Start an attempt for ``key``: 0 and it is counted as a failure until ``succeeded``,
        or the seconds to wait (nothing counted)."""
        now = time.monotonic()
        with self._lock:
            failures, last = self._keys.get(key, (0, now))
            if now - last > self.forget:
                failures = 0
            wait = self.delay(failures) - (now - last)
            if wait > 0:
                return max(wait, 0.001)
            self._keys[key] = (failures + 1, now)
            if len(self._keys) > 100_000:  # forget quiet keys so the table cannot grow without bound
                self._keys = {k: v for k, v in self._keys.items() if now - v[1] < self.forget}
            return 0.0

    def succeeded(self, key: str) -> None:
        """The attempt was right: forget this key's failures (no other key's)."""
        with self._lock:
            self._keys.pop(key, None)

    def release(self, key: str) -> None:
        """The attempt was right, but earlier failures stay on record (for keys shared by many
        clients, such as one address for API keys, where one client's success must not wipe
        another client's failed guesses)."""
        with self._lock:
            failures, last = self._keys.get(key, (0, 0.0))
            if failures <= 1:
                self._keys.pop(key, None)
            else:
                self._keys[key] = (failures - 1, last)

    def failures(self, key: str) -> int:
        with self._lock:
            return self._keys.get(key, (0, 0.0))[0]
