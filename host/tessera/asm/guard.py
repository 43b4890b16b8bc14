"""Sans-IO defences of the ASM responder against unauthenticated peers (issue 11 #3, #9, #10).

Everything here is defined by this project; SMPTE 430-6 says nothing about floods.

* FailureAggregator: connections that fail before the initiator is authenticated and
  authorised (empty or non-TLS connections, handshake failures or timeouts, refused
  certificates, connections over the limits) are counted per source address. The first
  failure of each kind from a source in an interval is recorded in full at once (so a
  refused certificate is not hidden behind a port scan); the others of that interval are
  summed into one summary record per source when the interval ends. The number of sources
  tracked per interval is bounded; the rest share one "other sources" bucket. The counts of
  all records add up to the number of failures: nothing is lost, and the log grows by at
  most (kinds + 1) x (max_sources + 1) records per interval whatever the attack rate.
* ConnectionLimiter: caps connections per source address and in total. At the total cap a
  new connection evicts the oldest one still in its handshake (unauthenticated state goes
  first); if every connection is authenticated the new one is refused.

A source address proves nothing: it only spreads the budget, it never grants anything.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

OTHER = "other sources"  # the shared bucket once max_sources are tracked


@dataclass
class FailureSummary:
    source: str
    count: int  # failures summed in this record (the first of each kind excluded)
    kinds: Counter[str]
    first: float  # clock of the first and last failure counted here
    last: float


@dataclass
class _Bucket:
    written: set[str] = field(default_factory=set)  # kinds already recorded in full
    count: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    first: float = 0.0
    last: float = 0.0


class FailureAggregator:
    def __init__(self, interval: float = 10.0, max_sources: int = 32) -> None:
        if interval <= 0 or max_sources < 1:
            raise ValueError("interval must be positive and max_sources at least 1")
        self.interval = interval
        self.max_sources = max_sources
        self._buckets: dict[str, _Bucket] = {}
        self._started: float | None = None
        self.total = 0  # failures ever noted

    def note(self, source: str, kind: str, now: float) -> bool:
        """Count one failure. True: it is the first of its kind from this source (or bucket)
        in the interval, and the caller records it in full now; False: summed for flush()."""
        if self._started is None:
            self._started = now
        self.total += 1
        if source not in self._buckets and len(self._buckets) >= self.max_sources:
            source = OTHER
        b = self._buckets.setdefault(source, _Bucket())
        if kind not in b.written:
            b.written.add(kind)
            return True
        if not b.count:
            b.first = now
        b.count += 1
        b.kinds[kind] += 1
        b.last = now
        return False

    def due(self, now: float) -> bool:
        return self._started is not None and now - self._started >= self.interval

    def failures(self, source: str) -> int:
        """Failures of a source in the current interval (0 if untracked)."""
        b = self._buckets.get(source)
        return 0 if b is None else b.count + len(b.written)

    @property
    def pending(self) -> int:
        """Failures counted but not yet written (in no record so far)."""
        return sum(b.count for b in self._buckets.values())

    def flush(self) -> list[FailureSummary]:
        """End the interval: one summary per source with failures beyond its first."""
        out = [FailureSummary(src, b.count, b.kinds, b.first, b.last)
               for src, b in self._buckets.items() if b.count]
        self._buckets.clear()
        self._started = None
        return out


K = TypeVar("K", bound=Hashable)


@dataclass
class _Conn:
    source: str
    started: float
    authenticated: bool = False


class ConnectionLimiter(Generic[K]):
    """Bounds on live connections; `K` identifies a connection (the adapter's handle)."""

    def __init__(self, max_total: int = 64, max_per_source: int = 8) -> None:
        if max_total < 1 or max_per_source < 1:
            raise ValueError("connection limits must be at least 1")
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._conns: dict[K, _Conn] = {}
        self._per_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._conns)

    def admit(self, key: K, source: str, now: float,
              suspicion: Callable[[str], int] | None = None) -> tuple[bool, K | None]:
        """(admitted, connection to evict first). Refused when the source is at its cap, or
        when the total is at its cap and no unauthenticated connection can be evicted.
        `suspicion(source)`: recent failures of a source (FailureAggregator.failures); the
        victim is the oldest handshake of the most suspicious, then busiest, source."""
        if self._per_source[source] >= self.max_per_source:
            return False, None
        victim: K | None = None
        if len(self._conns) >= self.max_total:
            pending = [(c.source, c.started, k) for k, c in self._conns.items() if not c.authenticated]
            if not pending:
                return False, None
            # the oldest handshake of the source that failed most lately, then of the one
            # holding the most handshakes: a flood evicts itself, not a lone good client
            per = Counter(p[0] for p in pending)
            sus = suspicion or (lambda _s: 0)
            victim = min(pending, key=lambda p: (-sus(p[0]), -per[p[0]], p[1]))[2]
            self.release(victim)
        self._conns[key] = _Conn(source, now)
        self._per_source[source] += 1
        return True, victim

    def authenticated(self, key: K) -> None:
        if key in self._conns:
            self._conns[key].authenticated = True

    def release(self, key: K) -> None:
        c = self._conns.pop(key, None)
        if c is not None:
            self._per_source[c.source] -= 1
            if not self._per_source[c.source]:
                del self._per_source[c.source]
