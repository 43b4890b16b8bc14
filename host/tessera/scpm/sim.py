"""Simulated fleets: the host KSN engine wired to FIRMWARE device engines run under CPython
(tessera.mpshim), frames passed in memory. Used by the transcript generator, the broad
negative tests and the benchmark; the true end-to-end tests use virtual boards instead."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from tessera.scpm.ksn import KsnEngine, Send, Txn


def device_class():
    from tessera import mpshim

    mpshim.install()
    from tessera_fw.scpm.device import Device

    return Device


def memfs_store():
    from tessera import mpshim

    mpshim.install()
    from tessera_fw.scpm.store import MemFS, Store

    return Store(MemFS())


class DetRng:
    """Deterministic randomness for transcripts: SHA-256 in counter mode over a label."""

    def __init__(self, label: str) -> None:
        self.label = label.encode()
        self.n = 0

    def __call__(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            out += hashlib.sha256(self.label + self.n.to_bytes(8, "big")).digest()
            self.n += 1
        return out[:size]


@dataclass
class Clock:
    t: float = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Fleet:
    engine: KsnEngine
    clock: Clock
    devices: dict[int, object] = field(default_factory=dict)
    # hook(direction, addr, frame) -> frame to deliver, or None to drop; records transcripts
    hook: Callable[[str, int, bytes], bytes | None] | None = None

    def add(self, addr: int, setup_key: bytes, rand=None, store=None):
        dev = device_class()(addr, setup_key, store=store if store is not None else memfs_store(), rand=rand)
        self.devices[addr] = dev
        self.engine.register(addr)
        return dev

    def pump(self, sends: list[Send], max_rounds: int = 100) -> None:
        """Deliver frames both ways until nothing more is sent."""
        for _ in range(max_rounds):
            if not sends:
                return
            nxt: list[Send] = []
            for s in sends:
                frame = s.frame
                if self.hook:
                    frame = self.hook("ksn->dev", s.addr, frame)
                    if frame is None:
                        continue
                dev = self.devices.get(s.addr)
                if dev is None:
                    continue
                for out in dev.receive(frame, int(self.clock.t * 1000)):
                    b = bytes(out)
                    if self.hook:
                        b = self.hook("dev->ksn", s.addr, b)
                        if b is None:
                            continue
                    nxt += self.engine.handle(b)
            sends = nxt
        raise RuntimeError("frames still flowing after max_rounds")

    def from_device(self, addr: int, frames) -> None:
        sends: list[Send] = []
        for f in frames:
            b = bytes(f)
            if self.hook:
                b = self.hook("dev->ksn", addr, b)
                if b is None:
                    continue
            sends += self.engine.handle(b)
        self.pump(sends)

    def run(self, started: tuple[Txn, list[Send]], max_time: float = 60.0) -> Txn:
        """Drive one transaction to its end, advancing the fake clock through timeouts."""
        t, sends = started
        self.pump(sends)
        limit = self.clock.t + max_time
        while not t.finished and self.clock.t < limit:
            nd = self.engine.next_deadline()
            self.clock.t = max(self.clock.t, nd if nd is not None else self.clock.t + 1)
            self.pump(self.engine.poll())
            for addr, dev in self.devices.items():
                self.from_device(addr, dev.tick(int(self.clock.t * 1000)))
        return t


# ---------------------------------------------------------------- board-speed devices (issue 9)


@dataclass(frozen=True)
class BoardModel:
    """How long a board's interpreter is busy with each frame it receives. While busy (a DH
    exponentiation is one C call: nothing else runs) its network stack holds at most `queue`
    datagrams and drops the rest. Figures: docs/scpm-profile.md section 9a."""

    name: str
    mku_s: float  # MKU_START: two 2048-bit exponentiations with 256-bit exponents
    queue: int  # datagrams lwIP keeps while the interpreter is busy
    flash_s: float = 0.1  # one key-store save (assumed; not measured)
    frame_s: float = 0.01  # decode, MAC, answer of one frame
    boot_s: float = 0.0  # busy from time 0, e.g. the boot self-test's DH just after a reboot


# Issue 9's measurements: py/mpz.c on an RP2040 emulator, 325.6 M + 339.9 M cycles at 125 MHz;
# ESP32_GENERIC at its default 160 MHz, 1.7-2.2 s per exponentiation (worst case taken).
PICO_W = BoardModel("rp2040 Pico W 125 MHz", mku_s=5.32, queue=4)
ESP32 = BoardModel("esp32 160 MHz", mku_s=4.3, queue=6)


@dataclass
class _Busy:
    dev: object
    model: BoardModel
    until: float = 0.0
    queue: list = field(default_factory=list)
    dropped: int = 0
    received: dict[str, int] = field(default_factory=dict)  # frames processed, by what they cost
    saves: int = 0


class TimedFleet:
    """Firmware device engines that take board time to answer, on the injected fake clock:
    an event simulation of the KSN's timers against devices that are busy for as long as the
    board would be (BoardModel), with a bounded receive queue while busy."""

    def __init__(self, engine: KsnEngine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock
        self.boards: dict[int, _Busy] = {}
        self._events: list[tuple[float, int, str, int, bytes]] = []
        self._seq = 0

    def add(self, addr: int, setup_key: bytes, model: BoardModel, rand=None, store=None):
        dev = device_class()(addr, setup_key, store=store if store is not None else memfs_store(), rand=rand)
        self.engine.register(addr)
        return self._board(addr, dev, model)

    def reboot(self, addr: int, rand=None):
        """Power-cycle a device: state from its key store, busy with the boot self-test."""
        old = self.boards[addr]
        dev = device_class()(addr, old.dev.setup.key, store=old.dev.store, rand=rand)
        return self._board(addr, dev, old.model)

    def _board(self, addr: int, dev, model: BoardModel):
        b = _Busy(dev, model)
        real_save = dev.save

        def save() -> None:
            b.saves += 1
            real_save()

        dev.save = save  # counts the key-store writes each frame costs
        self.boards[addr] = b
        self.busy(addr, model.boot_s)
        return dev

    def busy(self, addr: int, seconds: float) -> None:
        """The device's interpreter is busy (e.g. a boot self-test DH) for `seconds` from now."""
        b = self.boards[addr]
        b.until = max(b.until, self.clock.t + seconds)
        self._at(b.until, "free", addr)

    def _at(self, t: float, kind: str, addr: int, frame: bytes = b"") -> None:
        import heapq

        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, addr, frame))

    def _send(self, sends: list[Send]) -> None:
        for s in sends:
            self._at(self.clock.t, "to_dev", s.addr, s.frame)

    def _process(self, b: _Busy, addr: int, frame: bytes) -> None:
        before, saves = b.dev.pending, b.saves
        out = b.dev.receive(frame, int(self.clock.t * 1000))
        dh = b.dev.pending is not None and b.dev.pending is not before
        cost = b.model.frame_s + (b.model.mku_s if dh else 0.0) + b.model.flash_s * (b.saves - saves)
        key = "dh" if dh else "other"
        b.received[key] = b.received.get(key, 0) + 1
        b.until = self.clock.t + cost
        for f in out:
            self._at(b.until, "to_ksn", addr, bytes(f))
        self._at(b.until, "free", addr)

    def _event(self, kind: str, addr: int, frame: bytes) -> None:
        b = self.boards.get(addr)
        if kind == "to_ksn":
            self._send(self.engine.handle(frame))
        elif b is None:
            return
        elif kind == "to_dev":
            if self.clock.t < b.until or b.queue:
                if len(b.queue) < b.model.queue:
                    b.queue.append(frame)
                else:
                    b.dropped += 1
            else:
                self._process(b, addr, frame)
        elif kind == "free" and self.clock.t >= b.until and b.queue:
            self._process(b, addr, b.queue.pop(0))

    def run(self, started: tuple[Txn, list[Send]], max_time: float = 600.0) -> Txn:
        """Drive one transaction to its end on the fake clock."""
        import heapq

        t, sends = started
        self._send(sends)
        limit = self.clock.t + max_time
        while not t.finished and self.clock.t < limit:
            nd = self.engine.next_deadline()
            ev = self._events[0][0] if self._events else None
            if ev is not None and (nd is None or ev <= nd):
                when, _, kind, addr, frame = heapq.heappop(self._events)
                self.clock.t = max(self.clock.t, when)
                self._event(kind, addr, frame)
            elif nd is not None:
                self.clock.t = max(self.clock.t, nd)
                self._send(self.engine.poll())
            else:
                break
        return t
