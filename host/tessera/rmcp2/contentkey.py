"""Content key Kc: the SMA's schedule and the DMA's re-wrap from Ks to Kg, sans-IO
(docs/rmcp2-profile.md B.16; X.603.1 Amd.1 10.2.1.2, 10.2.7, figure 104).

- `KcSchedule` (SMA): a random Kc at random periodic intervals (bounds given, randomness
  injected); the next Kc is made and announced `lead` seconds before it is used, so an RMA
  holds the current and the next key; an urgent rotation (KCREQ from a DMA whose group
  lost or gained a member under BACKWARD / FORWARD) makes a fresh next key at once.
  Deliveries are KEYDELIVER (NT = SMA, 11.2.9.1 b) under Ks, one per DMA. The SM never
  takes part: nothing here is sent to it, and no SM message carries a Kc.
- `KcRelay` (DMA): opens the SMA's KEYDELIVER under Ks and seals the same plain message
  under its group's current Kg for its RMAs (the DMA learns Kc, as 10.2.7 requires for
  re-encryption, but relays content without decrypting it).

KCREQ (`0xB6`, DMA -> SMA under Ks, RESULT = why) is defined by this project (B.16).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.codec import ErrorCode, Rmcp2Error
from tessera.rmcp2.groupkey import Delivery, GroupKeyManager

log = logging.getLogger("tessera.rmcp2.contentkey")

KC_MIN_INTERVAL = 300.0  # B.16 defaults: a Kc is used for a random 300..900 s
KC_MAX_INTERVAL = 900.0
KC_LEAD = 30.0  # the next Kc is announced this long before its first use
KC_URGENT_LEAD = 5.0  # after KCREQ: new Kc in use this long after it is announced
KC_URGENT_GAP = 1.0  # at most one urgent rotation per second; requests in between coalesce
MAX_DMAS = 256  # SMA: replay windows for KCREQ kept for at most this many DMAs
KCREQ_LEFT = C.Result.LEAVE_NORMAL  # RESULT of KCREQ: a member left (BACKWARD)
KCREQ_JOINED = C.Result.ACCEPTED  # a member joined (FORWARD)


def ahead(new: int, old: int) -> int:
    """How far generation `new` is ahead of `old` on the 1..255 circle (B.6), 0 if it is
    not ahead by 1..127 (equal, behind, or too far to be anything but stale)."""
    d = (new - old) % 255
    return d if 1 <= d <= 127 else 0


def kc_message(session_id: int, dma_maid: bytes, gen: int, key: bytes) -> bytes:
    """The plain KEYDELIVER of a Kc (NT = SMA; MAID = the DMA it is for): Gen, FRESH, Period 0."""
    kd = C.KeyData(gen, C.KeyMode.FRESH, 0, key).encode()
    return C.Message(C.MsgType.KEYDELIVER, C.NodeType.SMA, session_id, dma_maid,
                     (C.KeyInfo(C.KeyType.KC, kd),)).encode()


@dataclass(frozen=True)
class KcAnnounce:
    """A new Kc exists: deliver it to every DMA now (`KcSchedule.keydeliver`)."""

    gen: int
    use_at: float


@dataclass(frozen=True)
class KcSwitch:
    """Content from now on is encrypted under this Kc generation."""

    gen: int


class KcSchedule:
    """The SMA's Kc: current, and from `lead` before the switch, the next one."""

    def __init__(self, session_id: int, sma_maid: bytes, rand: Callable[[int], bytes], now: float,
                 ks_suite: P.Suite = P.BOOTSTRAP, min_interval: float = KC_MIN_INTERVAL,
                 max_interval: float = KC_MAX_INTERVAL, lead: float = KC_LEAD,
                 urgent_lead: float = KC_URGENT_LEAD, urgent_gap: float = KC_URGENT_GAP, first_gen: int = 1,
                 on_new_gen: Callable[[int], None] | None = None) -> None:
        if not 0 < lead < min_interval <= max_interval or not 0 <= urgent_lead <= lead or urgent_gap < 0:
            raise ValueError("0 < lead < min_interval <= max_interval, 0 <= urgent_lead <= lead")
        if not 1 <= first_gen <= 255:
            raise ValueError("a Kc generation is 1..255 (B.6)")
        # every generation made is reported before it is used or sent, so that a restarted SMA
        # can start after the newest one any DMA or RMA may hold (smatree.KcGenFile): they refuse a Gen
        # that is not ahead of theirs (B.16)
        self.on_new_gen = on_new_gen
        self.session_id, self.sma_maid, self.rand, self.ks_suite = session_id, bytes(sma_maid), rand, ks_suite
        self.min_interval, self.max_interval, self.lead = min_interval, max_interval, lead
        self.urgent_lead, self.urgent_gap = urgent_lead, urgent_gap
        if on_new_gen is not None:
            on_new_gen(first_gen)
        self._keys: dict[int, bytes] = {first_gen: rand(16)}  # current and at most one next
        self._made: dict[int, float] = {first_gen: now}
        self.cur, self.nxt = first_gen, 0
        self.switch_at = now + self._interval()
        self._last_urgent = -1e18
        self._pending_since: float | None = None  # a KCREQ not yet served (rate limit)
        self._seq: tuple[int, int] = (0, 0)  # (Ks gen, last Seq) for KEYDELIVER under Ks
        self._windows: dict[tuple[bytes, int], P.ReplayWindow] = {}
        self.errors: dict[str, int] = {}
        self.urgent = 0

    def _interval(self) -> float:
        u = int.from_bytes(self.rand(4), "big") / 2 ** 32
        return self.min_interval + u * (self.max_interval - self.min_interval)

    # ------------------------------------------------------------------ queries
    def current(self) -> tuple[int, bytes]:
        return self.cur, self._keys[self.cur]

    def next(self) -> tuple[int, bytes] | None:
        return (self.nxt, self._keys[self.nxt]) if self.nxt else None

    def key(self, gen: int) -> bytes | None:
        """The key of a generation the SMA holds (current or next), for the content layer."""
        return self._keys.get(gen)

    # ------------------------------------------------------------------ events
    def tick(self, now: float) -> list:
        out: list = []
        if self._pending_since is not None and now >= self._last_urgent + self.urgent_gap:
            out += self._urgent(now)
        if not self.nxt and now >= self.switch_at - self.lead:
            out.append(self._announce(now, self.switch_at))
        if self.nxt and now >= self.switch_at:
            old, self.cur, self.nxt = self.cur, self.nxt, 0
            del self._keys[old], self._made[old]
            self.switch_at = now + self._interval()
            log.info("rmcp2 sma: Kc gen %d in use", self.cur)
            out.append(KcSwitch(self.cur))
        return out

    def request_rotation(self, now: float) -> list:
        """A DMA asked for a fresh Kc (KCREQ). Served by a next key made at or after `now`
        (one made earlier may be known to the member that left, or be one the joiner must
        not have); at most one per urgent_gap, requests in between are coalesced."""
        if self.nxt and self._made[self.nxt] >= now:
            return []
        if self._pending_since is None:
            self._pending_since = now
        if now < self._last_urgent + self.urgent_gap:
            return []
        return self._urgent(now)

    def receive_kcreq(self, data: bytes, ks: Callable[[int], P.ProtKey | None], now: float) -> list:
        """A sealed KCREQ from a DMA, under Ks (`ks(gen)` gives that generation or None)."""
        fresh: dict[tuple[bytes, int], P.ReplayWindow] = {}  # kept only once the Tag verified (B.7)

        def keys(maid: bytes, sec: P.SecHeader) -> P.ProtKey | None:
            return ks(sec.gen) if sec.ref == P.KeyRef.KS else None

        def windows(maid: bytes, key: P.ProtKey) -> P.ReplayWindow:
            k = (bytes(maid), key.gen)
            return self._windows.get(k) or fresh.setdefault(k, P.ReplayWindow())

        try:
            msg = P.unseal_decode(data, self.ks_suite, keys, windows)
            if msg.type != C.MsgType.KCREQ or msg.session_id != self.session_id:
                raise Rmcp2Error(ErrorCode.UNKNOWN_MESSAGE, "expected KCREQ of this session")
        except Rmcp2Error as e:
            self.errors[e.code.name] = self.errors.get(e.code.name, 0) + 1
            return []
        for k, w in fresh.items():
            while len(self._windows) >= MAX_DMAS:  # bounded: the oldest entry goes
                self._windows.pop(next(iter(self._windows)))
            self._windows[k] = w
        return self.request_rotation(now)

    def keydeliver(self, dma_maid: bytes, gen: int, ks: P.ProtKey) -> bytes:
        """KEYDELIVER(Kc gen) for one DMA under Ks (B.16), with a fresh IV and the next Seq."""
        key = self._keys.get(gen)
        if key is None:
            raise ValueError(f"Kc gen {gen} is not held")
        g, seq = self._seq
        seq = seq + 1 if g == ks.gen else 1
        self._seq = (ks.gen, seq)
        return P.seal(kc_message(self.session_id, dma_maid, gen, key), ks, self.ks_suite, seq,
                      self.rand(P.IV_LEN))

    # ------------------------------------------------------------------ internals
    def _announce(self, now: float, use_at: float) -> KcAnnounce:
        newest = self.nxt or self.cur
        gen = P.next_gen(newest)
        if self.on_new_gen is not None:
            self.on_new_gen(gen)
        if self.nxt:  # replaced before use: the skipped key is dropped everywhere
            del self._keys[self.nxt], self._made[self.nxt]
        self._keys[gen], self._made[gen], self.nxt = self.rand(16), now, gen
        self.switch_at = use_at
        log.info("rmcp2 sma: Kc gen %d announced, in use at %.1f", gen, use_at)
        return KcAnnounce(gen, use_at)

    def _urgent(self, now: float) -> list:
        self._pending_since = None
        self._last_urgent = now
        self.urgent += 1
        return [self._announce(now, now + self.urgent_lead)]


def kcreq(session_id: int, dma_maid: bytes, why: C.Result, ks: P.ProtKey, suite: P.Suite, seq: int,
          iv: bytes) -> bytes:
    """KCREQ (B.16): a DMA asks the SMA for a fresh Kc, under Ks."""
    msg = C.Message(C.MsgType.KCREQ, C.NodeType.DMA, session_id, dma_maid, (C.ResultCtl(why),))
    return P.seal(msg.encode(), ks, suite, seq, iv)


@dataclass
class _Held:
    key: bytes = field(repr=False)
    at: float


class KcRelay:
    """DMA side: Kc deliveries from the SMA (under Ks) re-sealed under this group's Kg."""

    def __init__(self, session_id: int, dma_maid: bytes, group: GroupKeyManager,
                 ks_suite: P.Suite = P.BOOTSTRAP) -> None:
        self.session_id, self.dma_maid, self.group, self.ks_suite = session_id, bytes(dma_maid), group, ks_suite
        self._held: dict[int, _Held] = {}  # at most 2: current and next
        self._plain: dict[int, bytes] = {}
        self._windows: dict[int, P.ReplayWindow] = {}  # per Ks generation, at most 3
        self.errors: dict[str, int] = {}

    def held(self) -> list[int]:
        return sorted(self._held)

    def receive(self, data: bytes, ks: Callable[[int], P.ProtKey | None], now: float) -> list[Delivery]:
        """One sealed KEYDELIVER(Kc) from the SMA. Returns the group message under Kg (or
        nothing: a duplicate, or an error counted in `errors`)."""
        try:
            plain = P.unseal(data, self.ks_suite, self._ks_lookup(ks), self._window)
            msg = C.decode(plain)
            ki = msg.get(C.KeyInfo)
            if msg.type != C.MsgType.KEYDELIVER or ki is None or ki.key_type != C.KeyType.KC:
                raise Rmcp2Error(ErrorCode.UNKNOWN_MESSAGE, "expected KEYDELIVER of a Kc")
            if msg.session_id != self.session_id or msg.maid != self.dma_maid:
                raise Rmcp2Error(ErrorCode.MAID, "KEYDELIVER for another session or DMA")
            kd = C.KeyData.decode(ki.key_data)
            if kd.gen in self._held:
                if self._held[kd.gen].key == kd.key:
                    return []  # the same key again (a re-sent delivery): nothing to do
                raise Rmcp2Error(ErrorCode.REPLAY, "a held Kc generation with another key")
            newest = max(self._held, key=lambda g: self._held[g].at, default=0)
            if newest and not ahead(kd.gen, newest):
                raise Rmcp2Error(ErrorCode.REPLAY, f"Kc gen {kd.gen} is not ahead of {newest}")
        except Rmcp2Error as e:
            self.errors[e.code.name] = self.errors.get(e.code.name, 0) + 1
            return []
        self._held[kd.gen] = _Held(kd.key, now)
        self._plain[kd.gen] = bytes(plain)
        while len(self._held) > 2:
            old = min(self._held, key=lambda g: self._held[g].at)
            del self._held[old], self._plain[old]
        return [self.group.seal_group(plain)]

    def catch_up(self, maid: bytes, joined_at: float) -> list[Delivery]:
        """The Kc a member that just joined may have, under the current Kg, for it alone:
        with FORWARD only those the DMA received after `joined_at` (made for its
        membership), otherwise the current and next."""
        fwd = bool(self.group.mecha & C.GkMecha.FORWARD)
        return [Delivery(bytes(maid), self.group.seal_group(self._plain[g]).data)
                for g in sorted(self._held, key=lambda g: self._held[g].at)
                if not fwd or self._held[g].at >= joined_at]

    def rotation_wanted(self, joined: bool) -> C.Result | None:
        """The KCREQ reason to send after a join (FORWARD) or leave (BACKWARD), or None."""
        if joined and self.group.mecha & C.GkMecha.FORWARD:
            return KCREQ_JOINED
        if not joined and self.group.mecha & C.GkMecha.BACKWARD:
            return KCREQ_LEFT
        return None

    def _ks_lookup(self, ks: Callable[[int], P.ProtKey | None]):
        def lookup(maid: bytes, sec: P.SecHeader) -> P.ProtKey | None:
            return ks(sec.gen) if sec.ref == P.KeyRef.KS else None
        return lookup

    def _window(self, maid: bytes, key: P.ProtKey) -> P.ReplayWindow:
        if key.gen not in self._windows:
            while len(self._windows) >= 3:
                self._windows.pop(next(iter(self._windows)))
            self._windows[key.gen] = P.ReplayWindow()
        return self._windows[key.gen]
