"""DMA-side group key Kg manager, sans-IO (docs/rmcp2-profile.md B.16; X.603.1 Amd.1
10.2.1.1, 10.2.5, figure 97, Table 19).

The DMA creates Kg for its MM group and replaces it as the agreed GK_MECHA says:

- PERIODIC (bit 0x01): every `period` seconds a FRESH Kg, one group KEYDELIVER under the
  Kg it replaces (the holders do not change, so the new key is exactly as secret as the old).
- BACKWARD (0x02, a member leaves): a FRESH Kg at once, one KEYDELIVER per remaining member
  under that member's K_MAS, never under the old Kg the leaver holds.
- FORWARD (0x04, a member joins): a FRESH Kg before the joiner's RELANS, one group
  KEYDELIVER under the old Kg to the existing members; the joiner gets only the new one
  (in RELANS under its K_MAS, built by the join layer from `current()`).
- STATIC (0x00): Kg generation 1 for the life of the group.

Everything here is defined by this project except the rule of which key carries which
delivery (A.2, Table 11 as read in B.7). No sockets, clocks or randomness inside: `rand(n)`
and `now` are given by the caller; the outputs are sealed messages to send.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from tessera.errors import TesseraError
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

log = logging.getLogger("tessera.rmcp2.groupkey")

MAX_MEMBERS = 2000  # B.8: the SM admits at most 2000 RMAs per session
KG_PERIOD = 3600.0  # B.16: PERIODIC rotation, seconds
KG_GRACE = 30.0  # B.16: receivers keep the previous Kg this long after a group rollover
ROTATE_FORWARD, ROTATE_BACKWARD, ROTATE_PERIODIC = "forward", "backward", "periodic"


class GroupFull(TesseraError):
    """The member table is full (B.16: at most MAX_MEMBERS per DMA)."""


@dataclass(frozen=True)
class Delivery:
    """One sealed message. `maid` is the one RMA it is for (under its K_MAS), or None for
    a group message under Kg that goes to every current member."""

    maid: bytes | None
    data: bytes = field(repr=False)


@dataclass
class _Member:
    kmas: P.ProtKey = field(repr=False)
    seq: int = 0  # Seq of the DMA's messages under this K_MAS (B.7)


class _SeqSealer:
    """Seq counters per (key, generation) of one sender (B.7) and sealing with random IVs."""

    def __init__(self, suite: P.Suite, rand: Callable[[int], bytes]) -> None:
        self.suite, self.rand = suite, rand

    def seal(self, plain: bytes, key: P.ProtKey, seq: int) -> bytes:
        if seq > P.SEQ_MAX:  # 2^30 messages under one key: never in practice, refused if so
            raise TesseraError(f"Seq exhausted under {key!r}: a new key is needed (B.7)")
        return P.seal(plain, key, self.suite, seq, self.rand(P.IV_LEN))


def kg_message(session_id: int, dma_maid: bytes, gen: int, key: bytes) -> bytes:
    """The plain KEYDELIVER of a Kg (NT = DMA, 11.2.9.1 b): KEY_DATA Gen, FRESH, Period 0."""
    kd = C.KeyData(gen, C.KeyMode.FRESH, 0, key).encode()
    return C.Message(C.MsgType.KEYDELIVER, C.NodeType.DMA, session_id, dma_maid,
                     (C.KeyInfo(C.KeyType.KG, kd),)).encode()


class GroupKeyManager:
    """Kg of one DMA's MM group. Events in: member_joined, member_left, tick. Out: lists of
    `Delivery`. `current()` is the (gen, key16) to put in a joiner's RELANS."""

    def __init__(self, session_id: int, dma_maid: bytes, mecha: C.GkMecha, suite: P.Suite,
                 rand: Callable[[int], bytes], now: float, period: float = KG_PERIOD,
                 max_members: int = MAX_MEMBERS) -> None:
        if period <= 0 or not 0 < max_members <= MAX_MEMBERS:
            raise ValueError("period > 0, 1..2000 members")
        self.session_id, self.dma_maid, self.mecha = session_id, bytes(dma_maid), C.GkMecha(mecha)
        self.period, self.max_members, self.rand = period, max_members, rand
        self._tx = _SeqSealer(suite, rand)
        self._members: dict[bytes, _Member] = {}
        self._kg = P.ProtKey(P.KeyRef.KG, rand(16), 1)
        self._kg_seq = 0  # Seq under the current Kg generation (a group message per Seq)
        self._next_periodic = now + period
        self.rotations: dict[str, int] = {ROTATE_FORWARD: 0, ROTATE_BACKWARD: 0, ROTATE_PERIODIC: 0}

    # ------------------------------------------------------------------ queries
    def current(self) -> tuple[int, bytes]:
        """(gen, key16) of the Kg in force: what a joiner's RELANS carries (kg_source)."""
        return self._kg.gen, self._kg._raw

    def current_key(self) -> P.ProtKey:
        return self._kg

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, maid: bytes) -> bool:
        return bytes(maid) in self._members

    # ------------------------------------------------------------------ events
    def member_joined(self, maid: bytes, kmas: bytes, now: float, seq: int = 0) -> list[Delivery]:
        """An RMA passed Annex E with key K_MAS. Call it before building its RELANS: with
        FORWARD the Kg changes here and `current()` is then the key it may have. `seq`: the
        last Seq already used under this K_MAS (1 when the RELANS was sealed with Seq 1)."""
        maid = bytes(maid)
        if maid not in self._members and len(self._members) >= self.max_members:
            raise GroupFull(f"MM group full ({self.max_members} members)")
        out: list[Delivery] = []
        if maid in self._members:  # re-join with a new K_MAS: as a leave then a join
            out += self.member_left(maid, now)
        if self.mecha & C.GkMecha.FORWARD and self._members:
            out += self._rollover(ROTATE_FORWARD, now)
        self._members[maid] = _Member(P.ProtKey(P.KeyRef.KMAS, kmas), seq)
        return out

    def member_left(self, maid: bytes, now: float) -> list[Delivery]:
        """An RMA left (LEAVREQ, expulsion, or lost). With BACKWARD: a fresh Kg to every
        remaining member under its own K_MAS."""
        m = self._members.pop(bytes(maid), None)
        if m is None or not self.mecha & C.GkMecha.BACKWARD:
            return []
        return self._unicast_all(ROTATE_BACKWARD, now)

    def tick(self, now: float) -> list[Delivery]:
        """PERIODIC rotation on the injected clock."""
        if not self.mecha & C.GkMecha.PERIODIC or now < self._next_periodic:
            return []
        return self._rollover(ROTATE_PERIODIC, now)

    def resync(self, maid: bytes) -> Delivery | None:
        """The current Kg to one member under its K_MAS (a member that missed a group
        delivery). None if it is not a member."""
        m = self._members.get(bytes(maid))
        if m is None:
            return None
        return self._to_member(bytes(maid))

    def seal_to(self, maid: bytes, plain: bytes) -> Delivery | None:
        """Seal a plain message to one member under its K_MAS, on the same Seq counter as
        its Kg deliveries (the control link's HB, LEAVREQ, LEAVANS). None if not a member."""
        m = self._members.get(bytes(maid))
        if m is None:
            return None
        m.seq += 1
        return Delivery(bytes(maid), self._tx.seal(plain, m.kmas, m.seq))

    def seal_group(self, plain: bytes) -> Delivery:
        """Seal a plain message (e.g. a Kc KEYDELIVER being re-wrapped) under the current Kg."""
        self._kg_seq += 1
        return Delivery(None, self._tx.seal(plain, self._kg, self._kg_seq))

    # ------------------------------------------------------------------ internals
    def _new_kg(self, why: str, now: float) -> tuple[P.ProtKey, int]:
        """Replace Kg by a FRESH key with the next Gen; returns the old key and the last
        Seq used under it."""
        old, old_seq = self._kg, self._kg_seq
        self._kg = P.ProtKey(P.KeyRef.KG, self.rand(16), P.next_gen(old.gen))
        self._kg_seq = 0
        self._next_periodic = now + self.period
        self.rotations[why] += 1
        log.info("rmcp2 dma: Kg gen %d -> %d (%s, %d members)", old.gen, self._kg.gen, why, len(self._members))
        return old, old_seq

    def _rollover(self, why: str, now: float) -> list[Delivery]:
        """A new Kg for the same holders (PERIODIC) or before a joiner (FORWARD): one group
        message under the Kg it replaces."""
        old, old_seq = self._new_kg(why, now)
        if not self._members:
            return []
        plain = kg_message(self.session_id, self.dma_maid, self._kg.gen, self._kg._raw)
        return [Delivery(None, self._tx.seal(plain, old, old_seq + 1))]

    def _unicast_all(self, why: str, now: float) -> list[Delivery]:
        self._new_kg(why, now)
        return [self._to_member(maid) for maid in self._members]

    def _to_member(self, maid: bytes) -> Delivery:
        return self.seal_to(maid, kg_message(self.session_id, maid, self._kg.gen, self._kg._raw))  # type: ignore[return-value]
