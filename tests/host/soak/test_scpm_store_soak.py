"""Soak of the SCPM device's key store (issue 9 #6): the firmware engine (CPython through
tessera.mpshim) in the in-memory fleet with the host KSN, on a filesystem that injects
OSErrors into writes and reads and cuts the power inside writes (torn image) and between
frames, at seeded random points. Invariants: the device never forgets its enrolment or a
key it acknowledged, never accepts a replayed frame, never reuses an SNF, and after each
SYNC the KSN and the device hold one master key. The counts are printed and in
docs/scpm-firmware.md ("Flash wear")."""
from __future__ import annotations

import random
import time

import pytest

from tessera.scpm.codec import KeyKind
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.sim import Clock, DetRng, Fleet, device_class
from tessera.scpm.store import Store as KsnStore

ADDR = 0x0A000042
SETUP = bytes(range(0x40, 0x50))
SEED = 9
OPS = 3000
BUDGET_S = 60.0


class PowerCut(BaseException):
    """Power lost inside a write: nothing after it runs (not an OSError)."""


class FaultFS:
    """Slot files in memory; seeded OSErrors on reads and writes, torn writes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.files: dict[str, bytes] = {}
        self.armed = False
        self.p_read, self.p_write, self.p_cut = 0.05, 0.04, 0.015
        self.read_errors = self.write_errors = self.cuts = self.writes = 0

    def read(self, name):
        if self.armed and self.rng.random() < self.p_read:
            self.read_errors += 1
            raise OSError(5, "injected")
        return self.files.get(name)

    def write(self, name, data):
        data = bytes(data)
        if self.armed:
            r = self.rng.random()
            if r < self.p_cut:
                self.cuts += 1
                self.files[name] = data[:self.rng.randrange(len(data))]
                raise PowerCut
            if r < self.p_cut + self.p_write:
                self.write_errors += 1
                how = self.rng.randrange(3)  # nothing written, torn, or written then an error
                if how == 1:
                    self.files[name] = data[:self.rng.randrange(len(data))]
                elif how == 2:
                    self.files[name] = data
                raise OSError(5, "injected")
        self.files[name] = data
        self.writes += 1

    def remove(self, name):
        self.files.pop(name, None)


class Soak:
    def __init__(self, tmp_path, seed: int) -> None:
        from tessera import mpshim

        mpshim.install()
        from tessera_fw.scpm.store import Store

        self.FwStore = Store
        self.rng = random.Random(seed)
        self.fs = FaultFS(random.Random(seed + 1))
        self.clock = Clock()
        self.store = KsnStore(tmp_path / "ksn.sqlite", storage_key=bytes(32), durable=False)
        self.engine = KsnEngine(self.store, rng=DetRng(f"ksn:{seed}"), clock=self.clock, timeout=1.0, retries=4)
        self.fleet = Fleet(self.engine, self.clock, hook=self._hook)
        self.devrng = DetRng(f"dev:{seed}")
        self.dev = self.fleet.add(ADDR, SETUP, rand=self.devrng, store=Store(self.fs))
        self.answered: list[bytes] = []  # KSN->device frames the device answered
        self.last_in: bytes | None = None
        self.sent_snf: set[tuple[int, int, int, bytes]] = set()
        self.frames = self.updates = self.reboots = self.boot_read_errors = self.replays = 0
        self.kinds: dict[str, int] = {}

    # every frame both ways passes here
    def _hook(self, direction, addr, frame):
        self.frames += 1
        if direction == "ksn->dev":
            self.last_in = frame
        elif frame[0] == 0x11:
            if self.last_in is not None:
                self.answered.append(self.last_in)
                self.last_in = None
            key = (frame[13], frame[14], int.from_bytes(frame[15:19], "big"), self._dev_key(frame[13], frame[14]))
            assert key not in self.sent_snf, "the device reused an SNF"
            self.sent_snf.add(key)
        return frame

    def _dev_key(self, kind_index, gen) -> bytes:
        k = self.dev.keys[kind_index] if kind_index >> 4 != 4 else self.dev.lookup(self.dev.ksn, 4, 0, gen)
        return k.key if k is not None and k.gen == gen else b"?"

    def reboot(self) -> None:
        """Power back: a new engine from the slot files (boot reads can fail: retried)."""
        self.reboots += 1
        self.fleet.devices.pop(ADDR, None)
        self.dev = None
        for _ in range(50):
            try:
                self.dev = device_class()(ADDR, SETUP, store=self.FwStore(self.fs), rand=self.devrng)
                break
            except OSError:
                self.boot_read_errors += 1
        assert self.dev is not None
        self.fleet.devices[ADDR] = self.dev
        self.check_confirmed()

    def run(self, started) -> None:
        t, sends = started
        while True:
            try:
                self.fleet.run((t, sends))
                return
            except PowerCut:
                self.reboot()
                sends = []

    def peer(self):
        return self.engine.peer(ADDR)

    def check_confirmed(self) -> None:
        """What the KSN holds as acknowledged is on the device (also right after a reboot)."""
        d, p = self.dev, self.peer()
        assert d.enrolled and d.ksn == self.engine.address, "the device forgot its enrolment"
        keys = [p.masters[p.master].raw] + ([p.pending.key.raw] if p.pending else [])
        assert d.master.key in keys, "the device lost the master key"
        for kid, gen in p.held.items():
            kind, idx = map(int, kid.split("/"))
            k = d.keys[kind * 16 + idx]
            assert k is not None, f"the device forgot key {kid}"
            assert k.gen in (gen, self.engine.home_gen[(kind, idx)]), (kid, k.gen, gen)
            assert k.key == self.engine.home[(kind, idx, k.gen)].raw

    def settle(self) -> None:
        """Faults off: SYNC until both sides agree, check everything, replay old frames."""
        self.fs.armed = False
        for _ in range(5):
            t = self.engine.sync(ADDR)
            self.run(t)
            if t[0].status == "done":
                break
        else:
            raise AssertionError("SYNC never completed")
        d, p = self.dev, self.peer()
        assert p.pending is None and d.pending is None
        assert d.master.gen == p.master and d.master.key == p.masters[p.master].raw
        self.check_confirmed()
        for f in self.rng.sample(self.answered, min(25, len(self.answered))):
            assert d.receive(f) == [], "a replayed frame was answered"
            self.replays += 1
        self.fs.armed = True

    def op(self) -> None:
        r = self.rng.random()
        e = self.engine
        if r < 0.70:
            kind = self.rng.choice([KeyKind.USER, KeyKind.MASTER] + ([KeyKind.SP] if (int(KeyKind.SP), 1) in e.home_gen else []))
            for _ in range(5):
                pid = self.rng.choice((1, 2))
                self.run(e.app_get(ADDR, pid, kind=kind, idx=1 if kind == KeyKind.SP else 0))
            name = "app"
        elif r < 0.80:
            if self.peer().pending is not None or self.peer().needs_sync:
                self.settle()
            self.run(e.rotate(ADDR))
            self.updates += 1
            name = "mku"
        elif r < 0.93:
            kind = self.rng.choice((KeyKind.SP, KeyKind.USER, KeyKind.MAKER))
            idx = self.rng.choice((0, 1, 3)) if kind == KeyKind.SP else 0
            e.new_home_key(kind, idx)  # a new generation to install
            self.run(e.provision(ADDR, kind, idx))
            self.updates += 1
            name = f"install-{kind.name.lower()}"
        else:
            self.reboot()  # power cut between frames
            name = "reboot"
        self.kinds[name] = self.kinds.get(name, 0) + 1


@pytest.mark.slow
def test_soak_power_cuts_and_oserrors_never_lose_keys(tmp_path, capsys):
    s = Soak(tmp_path, SEED)
    s.run(s.engine.enrol(ADDR, SETUP))
    assert s.dev.enrolled
    s.fs.armed = True
    start = time.monotonic()
    done = 0
    for i in range(OPS):
        if (time.monotonic() - start) > BUDGET_S:
            break
        try:
            s.op()
        except RuntimeError:  # a transaction still running for the KSN (rotate while busy)
            pass
        done += 1
        if i % 25 == 24:
            s.settle()
    s.settle()
    fs = s.fs
    line = (f"soak seed {SEED}: {done} operations, {s.frames} frames, {s.updates} key updates "
            f"(incl. {s.kinds.get('mku', 0)} master-key updates), {s.reboots} reboots ({fs.cuts} power cuts inside "
            f"a write), {fs.write_errors} write OSErrors, {fs.read_errors + s.boot_read_errors} boot read OSErrors, "
            f"{s.dev.store_errors} store errors seen by the last engine, {s.replays} replays refused, "
            f"{len(s.sent_snf)} device SNFs all distinct, {time.monotonic() - start:.1f} s")
    with capsys.disabled():
        print("\n" + line)
    assert done >= 200 and s.frames >= 2000 and fs.cuts >= 5 and fs.write_errors >= 10 and s.updates >= 40
