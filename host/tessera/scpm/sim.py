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
