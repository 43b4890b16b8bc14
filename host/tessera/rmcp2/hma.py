"""HMA election and candidate take-over among the DMAs of one multicast-enabled area
(docs/rmcp2-profile.md B.18, defined by this project: the amendment names HMA, candidate HMA,
HSOLICIT, HANNOUNCE and HLEAVE (3.23, 10.2.5) but fixes no procedure or timer).

Every DMA of the area (the same IPv4 multicast group) runs one `HmaEngine`; all its messages
go to the area's HMA port on the group, each under Ks (B.7, KeyRef Ks, replay window per
(sender MAID, Ks generation)). Rules:

- **Start**: HSOLICIT, then wait T_SOLICIT (1.5 T_HANN). A HANNOUNCE heard -> follow that HMA.
  Nothing heard -> become HMA if this DMA's MAID is the lowest of the DMAs heard from within
  T_PEER; otherwise solicit again (the lower one announces; a dead one ages out of T_PEER).
  A soliciting DMA that hears HSOLICIT from a DMA it did not know solicits once more, so a
  DMA that started too late to hear the first one still learns of it.
- **HMA**: HANNOUNCE every T_HANN with its candidates (CANDIDATE controls, the live DMAs in
  MAID order, at most 8); an HSOLICIT from a DMA it did not know is answered at once.
- **Follower**: HSOLICIT every 3 T_HANN as its presence (so the HMA lists it as a candidate).
- **Take-over**: HLEAVE from the HMA (it lists its candidates), or no HANNOUNCE for 3 T_HANN
  (HANN_MISSED): the candidate at rank i of the HMA's last list (the HMA itself left out)
  becomes HMA after i x T_HANN unless an HANNOUNCE came meanwhile; a DMA not in the list
  waits len(list) x T_HANN, then solicits as at start.
- **Two HMAs** (a partition healed, a race): the lower MAID stays HMA and announces at once;
  the higher one stops being HMA and follows it.

Nothing about a peer is stored before its message verified under Ks; the peer table and the
replay windows hold at most `max_peers` entries (the least recently heard goes).

`HmaEngine` is sans-IO: `start/receive/tick/stop(now)` return a `Step` (messages for the
group, events BECOME_HMA / STOP_HMA). `HmaService` is the asyncio adapter (one UDP socket
bound to the group's port, joined on the interface towards the other DMAs).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.codec import Rmcp2Error
from tessera.rmcp2.upstream import KsSeq, KsWindows, seal_ks, seq_base

log = logging.getLogger("tessera.rmcp2.hma")
N, M = C.NodeType, C.MsgType

T_HANN = 2.0  # B.18: HANNOUNCE period; a dead HMA is replaced after 3 x T_HANN (6 s) + rank x T_HANN
HANN_MISSED = 3
HMA_PORT = 26034  # B.10: the DMAs' HMA messages on the group address
MAX_PEERS = 64
MAX_DATAGRAM = 1024  # an HANNOUNCE with 8 candidates under Ks is ~180 bytes


class Event(enum.Enum):
    BECOME_HMA = "become HMA"
    STOP_HMA = "stop being HMA"


@dataclass
class Step:
    sends: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def __iadd__(self, other: Step) -> Step:
        self.sends += other.sends
        self.events += other.events
        return self


class HmaEngine:
    """One DMA's side of the HMA election (module docstring). States: idle, soliciting,
    follower, waiting (an HMA left or died; take-over pending), hma, stopped."""

    def __init__(self, session_id: int, maid: bytes, *, suite: P.Suite,
                 ks_current: Callable[[], P.ProtKey | None], ks_lookup: Callable[[int], P.ProtKey | None],
                 rand: Callable[[int], bytes], seq: KsSeq | None = None, t_hann: float = T_HANN,
                 max_peers: int = MAX_PEERS) -> None:
        if t_hann <= 0 or max_peers < 1:
            raise ValueError("T_HANN > 0 and at least one peer")
        self.sid, self.maid, self.suite = session_id, bytes(maid), suite
        self.ks_current, self.ks_lookup, self.rand = ks_current, ks_lookup, rand
        self.seq = seq or KsSeq()
        self.t_hann, self.max_peers = t_hann, max_peers
        self.t_peer = 7 * t_hann  # two follower presences (3 T_HANN each) and a margin
        self.state = "idle"
        self.hma: bytes | None = None  # the HMA this DMA follows (itself when HMA)
        self.candidates: list[bytes] = []  # the HMA's last list (ours when HMA)
        self.peers: dict[bytes, float] = {}  # DMA MAID -> last authentic message; bounded
        self.windows = KsWindows(max_peers)
        self.errors: Counter[str] = Counter()
        self.takeovers = 0
        self.hleaves = 0  # authentic HLEAVEs from the HMA followed
        self._deadline = 0.0  # next action of the current state
        self._last_hann = 0.0  # HMA: last sent; follower: last heard

    @property
    def is_hma(self) -> bool:
        return self.state == "hma"

    # ------------------------------------------------------------------ events in
    def start(self, now: float) -> Step:
        return self._solicit(now, 1.5 * self.t_hann)

    def receive(self, data: bytes, now: float) -> Step:
        if self.state in ("idle", "stopped"):
            return Step()
        try:
            if len(data) > MAX_DATAGRAM:
                raise Rmcp2Error(C.ErrorCode.OVERSIZE, "larger than any HMA message")
            msg = self.windows.unseal(data, self.suite, self.ks_lookup)
        except Rmcp2Error as e:
            self.errors[e.code.name] += 1
            return Step()
        if msg.session_id != self.sid or msg.nt != N.DMA or msg.type not in (M.HSOLICIT, M.HANNOUNCE, M.HLEAVE):
            self.errors["unexpected"] += 1
            return Step()
        if msg.maid == self.maid:  # our own datagram looped back by the group
            return Step()
        sender = msg.maid
        if msg.type == M.HLEAVE:
            self.peers.pop(sender, None)
            if sender == self.hma and self.state != "hma":
                self.hleaves += 1
                cands = [c.maid for c in msg.all(C.Candidate)]
                return self._lost_hma(now, cands)
            return Step()
        known = sender in self.peers
        self._heard(sender, now)
        if msg.type == M.HSOLICIT:
            if self.state == "hma" and not known:
                return self._announce(now)
            if self.state == "soliciting" and not known:  # it may have missed ours: tell it we are here
                return self._send(M.HSOLICIT)
            return Step()
        # HANNOUNCE
        cands = [c.maid for c in msg.all(C.Candidate)]
        if self.state == "hma":
            if sender < self.maid:  # two HMAs: the lower MAID stays (module docstring)
                out = Step(events=[Event.STOP_HMA])
                self._follow(sender, cands, now)
                return out
            return self._announce(now)  # make the other one yield at once
        self._follow(sender, cands, now)
        return Step()

    def tick(self, now: float) -> Step:
        for maid in [m for m, t in self.peers.items() if now - t > self.t_peer]:
            del self.peers[maid]
        if self.state == "hma":
            return self._announce(now) if now >= self._deadline else Step()
        if self.state == "follower":
            if now - self._last_hann > HANN_MISSED * self.t_hann:
                self.peers.pop(self.hma or b"", None)
                return self._lost_hma(now, self.candidates)
            if now >= self._deadline:  # presence, so the HMA lists us as a candidate
                self._deadline = now + HANN_MISSED * self.t_hann
                return self._send(M.HSOLICIT)
            return Step()
        if self.state == "soliciting" and now >= self._deadline:
            live = [m for m in self.peers if m != self.maid]
            if all(self.maid < m for m in live):
                return self._become(now)
            return self._solicit(now, 1.5 * self.t_hann)
        if self.state == "waiting" and now >= self._deadline:
            if self.maid in self.candidates:
                return self._become(now)
            return self._solicit(now, 1.5 * self.t_hann)
        return Step()

    def stop(self, now: float) -> Step:
        """A clean stop: HLEAVE with the candidates when HMA (before the members' LEAVREQ)."""
        out = Step()
        if self.state == "hma":
            out = self._send(M.HLEAVE, *(C.Candidate(m) for m in self._candidate_list()))
            out.events.append(Event.STOP_HMA)
        self.state, self.hma = "stopped", None
        return out

    # ------------------------------------------------------------------ internals
    def _heard(self, maid: bytes, now: float) -> None:
        self.peers.pop(maid, None)
        while len(self.peers) >= self.max_peers:
            self.peers.pop(next(iter(self.peers)))
        self.peers[maid] = now

    def _candidate_list(self) -> list[bytes]:
        return sorted(self.peers)[:C.MAX_CANDIDATES]

    def _follow(self, hma: bytes, cands: list[bytes], now: float) -> None:
        if self.state != "follower":  # next presence (HSOLICIT) in 3 T_HANN
            self._deadline = now + HANN_MISSED * self.t_hann
        self.state, self.hma, self.candidates = "follower", hma, cands
        self._last_hann = now

    def _lost_hma(self, now: float, cands: list[bytes]) -> Step:
        gone = self.hma
        self.candidates = [c for c in cands if c != gone]
        self.hma, self.state = None, "waiting"
        rank = self.candidates.index(self.maid) if self.maid in self.candidates else len(self.candidates)
        self._deadline = now + rank * self.t_hann
        log.info("hma: HMA %s gone; rank %d in its %d candidates", gone.hex() if gone else "?", rank,
                 len(self.candidates))
        return self.tick(now) if rank == 0 and self.maid in self.candidates else Step()

    def _solicit(self, now: float, wait: float) -> Step:
        self.state, self.hma = "soliciting", None
        self._deadline = now + wait
        return self._send(M.HSOLICIT)

    def _become(self, now: float) -> Step:
        self.state, self.hma = "hma", self.maid
        self.takeovers += 1
        log.info("hma: this DMA is now the HMA")
        out = self._announce(now)
        out.events.append(Event.BECOME_HMA)
        return out

    def _announce(self, now: float) -> Step:
        self._deadline = now + self.t_hann
        self._last_hann = now
        self.candidates = self._candidate_list()
        return self._send(M.HANNOUNCE, *(C.Candidate(m) for m in self.candidates))

    def _send(self, t: C.MsgType, *controls: C.Control) -> Step:
        ks = self.ks_current()
        if ks is None:
            self.errors["no Ks"] += 1
            return Step()
        return Step([seal_ks(C.Message(t, N.DMA, self.sid, self.maid, controls), ks, self.suite, self.seq, self.rand)])


def group_socket(group: tuple[str, int], iface: str | None) -> socket.socket:
    """A UDP socket bound to the group's port, joined to the group on `iface` (its IPv4
    address; None = the default), sending to the group through it, with loopback on (two
    DMAs of an area may share a host)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((group[0], group[1]))
        ifaddr = socket.inet_aton(iface or "0.0.0.0")
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group[0]) + ifaddr)
        if iface:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, ifaddr)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class HmaService:
    """Runs an HmaEngine over the group socket; `on_event(Event)` is called for every
    BECOME_HMA / STOP_HMA (the DMA switches its relay's multicast sending on them)."""

    def __init__(self, engine: HmaEngine, group: tuple[str, int], iface: str | None,
                 on_event: Callable[[Event], None], *, tick: float | None = None) -> None:
        self.engine, self.group, self.iface, self.on_event = engine, group, iface, on_event
        self.tick_s = tick if tick is not None else min(0.5, engine.t_hann / 4)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _apply(self, step: Step) -> None:
        for data in step.sends:
            try:
                assert self._sock is not None
                self._sock.sendto(data, self.group)
            except OSError as e:  # the group is best effort: the next HANNOUNCE repeats it
                self.engine.errors[f"send {e.errno}"] += 1
        for ev in step.events:
            self.on_event(ev)

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # bounded per wake-up
            try:
                data = self._sock.recv(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._apply(self.engine.receive(data, self._now()))

    async def start(self) -> None:
        self._sock = group_socket(self.group, self.iface)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
        self._apply(self.engine.start(self._now()))
        self._task = asyncio.create_task(self._ticks())

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._apply(self.engine.tick(self._now()))

    def abort(self) -> None:
        """Close without HLEAVE (as a killed process would)."""
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        """A clean stop: HLEAVE first when HMA."""
        if self._sock is not None:
            self._apply(self.engine.stop(self._now()))
        self.abort()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def new_seq() -> KsSeq:
    """A DMA's Seq under Ks for this process (B.15: first Seq from the wall clock)."""
    return KsSeq(seq_base(time.time()))
