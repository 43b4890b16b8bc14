"""SCPM KSN benchmark: master key updates per second against 1000 simulated devices.

The devices are the FIRMWARE device engine run under CPython (tessera.mpshim) with in-memory
key stores; frames pass in memory, so the figure is the KSN's own throughput plus the
devices' work, and the KSN's share is measured separately (time inside the engine). The KSN
runs on its real SQLite store (keys AES-GCM encrypted), once with synchronous=FULL (the
default: a pending master key survives a power cut) and once with synchronous=OFF. One
update = MKU_START, MKU_RESPONSE, MKU_COMMIT, MKU_COMMIT_ACK: on the KSN one DH key pair
(256-bit exponent), the full public-value check (subgroup test, a 2047-bit exponentiation),
the shared secret, three HMACs, two durable writes (pending key, commit) and the SNF state.
Prints one Markdown section on stdout; progress on stderr.
"""
from __future__ import annotations

import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from tessera.crypto import dh  # noqa: E402
from tessera.scpm.ksn import KsnEngine, check_dh_public  # noqa: E402
from tessera.scpm.sim import Clock, DetRng, device_class, memfs_store  # noqa: E402
from tessera.scpm.store import Store  # noqa: E402

N = 1000


class Timed:
    """Wraps the engine's entry points to add up the time spent inside the KSN."""

    def __init__(self, engine: KsnEngine) -> None:
        self.engine, self.t = engine, 0.0

    def call(self, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.t += time.perf_counter() - t0


def run(durable: bool, workdir: Path) -> dict:
    Device = device_class()
    store = Store(workdir / f"ksn-{durable}.sqlite", storage_key=bytes(32), durable=durable)
    clock = Clock()
    engine = KsnEngine(store, clock=clock)
    timed = Timed(engine)
    devices = {}

    def pump(sends):
        while sends:
            nxt = []
            for s in sends:
                for f in devices[s.addr].receive(s.frame, 0):
                    nxt += timed.call(engine.handle, bytes(f))
            sends = nxt

    t0 = time.perf_counter()
    for i in range(N):
        addr = 0x0B000000 + i
        setup = DetRng(f"s{i}")(16)
        devices[addr] = Device(addr, setup, store=memfs_store(), rand=DetRng(f"d{i}"))
        engine.register(addr)
        t, sends = engine.enrol(addr, setup)
        pump(sends)
        assert t.status == "done", t.error
    enrol_s = time.perf_counter() - t0
    print(f"  enrolled {N} devices in {enrol_s:.1f} s (durable={durable})", file=sys.stderr, flush=True)

    timed.t = 0.0
    per: list[float] = []
    t0 = time.perf_counter()
    for addr in devices:
        k0 = timed.t
        t, sends = timed.call(engine.rotate, addr)
        pump(sends)
        assert t.status == "done" and devices[addr].master.gen == 2, t.error
        per.append(timed.t - k0)
    total = time.perf_counter() - t0
    store.close()
    print(f"  {N} updates in {total:.1f} s, {timed.t:.1f} s in the KSN", file=sys.stderr, flush=True)
    return {"total": total, "ksn": timed.t, "per": per, "enrol": enrol_s}


def dh_costs(n: int = 50) -> dict:
    a = dh.DH()
    b = dh.DH()
    t0 = time.perf_counter()
    for _ in range(n):
        dh.DH()
    keygen = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        check_dh_public(b.public)
    check = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        dh.check_public(b.public_int, full=True)
    pow_check = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        a.shared(b.public, full_check=False)
    shared = (time.perf_counter() - t0) / n
    return {"keygen": keygen, "check": check, "shared": shared, "pow_check": pow_check}


def main() -> int:
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        w = Path(d)
        full = run(True, w)
        off = run(False, w)
    c = dh_costs()
    p50 = statistics.median(full["per"]) * 1e3
    p99 = sorted(full["per"])[int(0.99 * len(full["per"]))] * 1e3
    print("## SCPM KSN\n")
    print(f"Master key updates (profile 6.3) of {N} simulated devices, one after another, on one core: "
          "the host KSN engine on SQLite against the firmware device engine under CPython "
          "(`tessera.mpshim`), frames passed in memory. \"KSN only\" counts the time spent inside the "
          "engine (DH, full public-value check, HMACs, AES, SQLite); the rest is the simulated devices.\n")
    print("| SQLite | updates/s end to end | updates/s KSN only | KSN ms/update p50 / p99 | enrolments/s end to end |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in (("synchronous=FULL (default)", full), ("synchronous=OFF", off)):
        per = sorted(r["per"])
        print(f"| {name} | {N / r['total']:.0f} | {N / r['ksn']:.0f} | "
              f"{statistics.median(per) * 1e3:.2f} / {per[int(0.99 * len(per))] * 1e3:.2f} | {N / r['enrol']:.0f} |")
    print()
    print(f"KSN DH costs per update (group 14): key pair {c['keygen'] * 1e3:.2f} ms (`cryptography`), full "
          f"public-value check {c['check'] * 1e3:.2f} ms, shared secret {c['shared'] * 1e3:.2f} ms; together "
          f"{(c['keygen'] + c['check'] + c['shared']) * 1e3:.2f} ms of the {p50:.2f} ms median (p99 {p99:.2f} ms, "
          f"fsync outliers) a durable update costs the KSN. The subgroup check is a Legendre symbol (for the safe "
          f"prime p = 2q + 1 it equals the test y^q = 1 mod p, which costs {c['pow_check'] * 1e3:.2f} ms as a "
          f"Python exponentiation: {c['pow_check'] / c['check']:.0f}x more).")
    print(f"\nPlatform: {platform.processor() or platform.machine()}, Python {platform.python_version()}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
