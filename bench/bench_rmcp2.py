"""Secure RMCP-2 control-plane benchmarks (issue 12): prints one Markdown section on stdout,
progress on stderr. `--quick` runs a few agents only (a smoke run, figures meaningless).

1. Admissions per second. The SM is `tessera sm serve` (SQLite store, synchronous=FULL) in
   its own process; the bare baseline is a TLS server in its own process with the same
   `ssl` context (certs.server_context: ECDSA P-256, mutual TLS, CERT_REQUIRED). The clients
   run here in one asyncio loop, CONC at a time, on the same client context (one RMA
   certificate; each agent has its own MAID). An admission is TLS + KTLSREQ/KTLSANS +
   SUBSREQ/SUBSANS + SECAGREQ/SECLIST + SECAGANS driven by the FIRMWARE RMA engine
   (firmware/tessera_fw/rmcp2/rma.py under tessera.mpshim); it counts once the SM has
   committed the RMA's ACL row (polled read-only in the SM's database); it then keeps its TLS
   link to the end of the run, as an RMA does (10.1.1.1). A bare handshake is
   TLS + one byte echoed (so the server has verified the client certificate, which TLS 1.3
   does after the client's Finished). Rounds alternate bare and admission with fresh MAIDs.
   Besides wall-clock rates the server process's CPU time (/proc) per operation is given:
   it is less sensitive to other load on the machine.
2. Ks re-key fan-out. The SM (SmServer on its SQLite store) runs here; the SMA and N_DMAS
   DMAs (host agent.py, AgentRunner on their plain links) run in a child process that
   reports, per DMA, the CLOCK_MONOTONIC time at which it installed each Ks generation.
   Latency = that time minus the time just before the operator call (`rekey`, `truncate`)
   or the tick that fires the hash step.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import re
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from tessera import mpshim  # noqa: E402
from tessera.rmcp2 import codec as C  # noqa: E402
from tessera.rmcp2 import sm as S  # noqa: E402
from tessera.rmcp2.agent import Agent, AgentConfig  # noqa: E402
from tessera.rmcp2.certs import client_context, make_pki, pki_paths, server_context  # noqa: E402
from tessera.rmcp2.server import AgentRunner, Limits, SmServer, read_message  # noqa: E402
from tessera.rmcp2.store import SmStore, open_engine  # noqa: E402

mpshim.install()
from tessera_fw.rmcp2 import rma as R  # noqa: E402

SID = 0x5E55_B000_0000_0001
N = C.NodeType
NAMES = ["sm", "sma", "dma", "rma"]
STORE_KEY = bytes(range(32))
N_AGENTS, ROUNDS, CONC = 125, 8, 32
HB_EVERY = 20.0  # < the SM's T_IDLE (60 s): held RMA links stay up (B.10 T_HB is 30 s)
N_DMAS, REKEYS, TRUNCATIONS, HASH_STEPS = 100, 10, 3, 5


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def der(pki: Path, name: str) -> bytes:
    return x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes()).public_bytes(serialization.Encoding.DER)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rma_maid(i: int) -> bytes:
    return C.make_maid("127.0.0.2", 40000 + i // 60000, 1 + i % 60000)


def dma_maid(i: int) -> bytes:
    return C.make_maid("127.0.0.3", 42000, 1 + i)


def sma_maid() -> bytes:
    return C.make_maid("127.0.0.3", 41000, 1)


def agent_runner(pki: Path, name: str, nt: C.NodeType, maid: bytes, tls_port: int, plain_port: int,
                 agent_cls: type = Agent) -> AgentRunner:
    propose = C.SmaPropose(C.GpAttribute.OPEN, C.GkMecha.PERIODIC, C.EnDecId.AES_CTR_128) if nt == N.SMA else None
    cfg = AgentConfig(nt, SID, maid, der(pki, name), propose=propose)
    return AgentRunner(agent_cls(cfg), client_context(*pki_paths(pki, name)), "127.0.0.1", tls_port, plain_port,
                       tick=0.5, retry=0.2)


async def until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------- child: bare TLS server
async def bare_server(pki: Path) -> None:
    """Same server context as the SM; after the handshake one byte is echoed, then EOF."""
    ctx = server_context(*pki_paths(pki, "sm"))

    async def handle(reader, writer):
        try:
            b = await reader.read(1)
            writer.write(b)
            await writer.drain()
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx, backlog=128)
    print(srv.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    srv.close()


# ---------------------------------------------------------------------------- child: the SMA and DMAs
class ReportingAgent(Agent):
    """A host DMA/SMA that prints `ks <maid hex> <gen> <monotonic> <seconds in receive>` when it
    installs a Ks."""

    def receive(self, data: bytes, now: float) -> list[bytes]:
        g, t0 = self.ks_gen, time.monotonic()
        out = super().receive(data, now)
        if self.ks_gen != g:
            t1 = time.monotonic()
            print(f"ks {self.cfg.maid.hex()} {self.ks_gen} {t1:.6f} {t1 - t0:.6f}", flush=True)
        return out


async def dma_fleet(pki: Path, tls_port: int, plain_port: int, n: int) -> None:
    runners = [agent_runner(pki, "sma", N.SMA, sma_maid(), tls_port, plain_port, ReportingAgent)]
    runners += [agent_runner(pki, "dma", N.DMA, dma_maid(i), tls_port, plain_port, ReportingAgent) for i in range(n)]
    tasks = []
    for k in range(0, len(runners), 10):  # ten admissions at a time: a loaded machine stays inside T_TLS
        group = runners[k:k + 10]
        tasks += [asyncio.create_task(r.run()) for r in group]
        await until(lambda: all(r.agent.state == "ready" for r in group), 120, "SMA/DMAs ready")
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for r in runners:
        r.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = sum(sum(r.agent.errors.values()) for r in runners)
    print(f"done errors {errors}", flush=True)


# ---------------------------------------------------------------------------- 1. admissions
@dataclass
class AdmissionResult:
    n: int
    rounds: int
    conc: int
    bare_rates: list[float] = field(default_factory=list)  # per round, handshakes/s
    adm_rates: list[float] = field(default_factory=list)  # per round, admissions/s
    bare_cpu: list[float] = field(default_factory=list)  # server CPU s per handshake, per round
    adm_cpu: list[float] = field(default_factory=list)  # SM CPU s per admission, per round
    bare_client_cpu: list[float] = field(default_factory=list)  # this process's CPU s per handshake
    adm_client_cpu: list[float] = field(default_factory=list)  # this process's CPU s per admission
    commits: int = -1  # the SM store's durable transactions over the whole run (its exit log line)
    load: tuple[float, float] = (0.0, 0.0)  # 1-min load average at the start and the end
    sm_counted: int = -1  # lines the SM logged for counted errors (first, 10th, 100th... of each reason)
    bare_ok: int = 0
    bare_failed: int = 0
    ready: int = 0  # firmware RMAs that reached READY
    not_ready: int = 0
    acl_rows: int = 0  # ACL rows in the SM's store after the run
    rma_members: int = 0  # RMA members in the store after the run
    sm_errors: int = 0  # firmware RMA error counters, summed
    held_open: int = 0  # admitted RMAs whose TLS link was still up at the end (10.1.1.1: it stays)
    hbs: int = 0  # HBs the held RMAs sent to stay inside the SM's T_IDLE
    adm_ms: list[float] = field(default_factory=list)  # per admission, connect to SECAGANS sent

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.adm_rates, self.bare_rates)]

    @property
    def cpu_ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.adm_cpu, self.bare_cpu)]


class Drain(threading.Thread):
    """Reads a child's stderr so it never blocks; keeps the last lines for error messages."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.lines, self.counted = stream, [], 0

    def run(self) -> None:
        for line in self.stream:
            self.lines = (self.lines + [line])[-20:]
            self.counted += " so far)" in line  # the SM's counted-error log line (sm.py _count)


PROFILE_SM: str | None = None  # --profile-sm FILE: run the SM under cProfile, stats written to FILE


def start_sm(pki: Path, db: Path, max_rmas: int, max_conns: int) -> tuple[subprocess.Popen, int, int, Drain]:
    env = dict(os.environ, TESSERA_SM_KEY=STORE_KEY.hex(), PYTHONPATH=str(ROOT / "host"))
    prof = ["-m", "cProfile", "-o", PROFILE_SM] if PROFILE_SM else []
    proc = subprocess.Popen([sys.executable, *prof, "-m", "tessera", "sm", "serve", "--db", str(db), "--session-id",
                             f"{SID:x}", "--pki-dir", str(pki), "--tls-port", "0", "--plain-port", "0",
                             "--agree-time", "0.5", "--max-rmas", str(max_rmas),
                             "--max-conns", str(max_conns)],
                            env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"TLS admission on [^:]+:(\d+), Ks control on [^:]+:(\d+)", line)
        if m:
            d = Drain(proc.stderr)
            d.start()
            return proc, int(m[1]), int(m[2]), d
    raise RuntimeError(f"tessera sm serve did not start (rc {proc.wait()})")


def start_child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "host"))
    return subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, text=True)


def acl_count(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute("SELECT COUNT(*) FROM acl").fetchone()[0]
    finally:
        con.close()


async def _workers(n: int, conc: int, job) -> None:
    it = iter(range(n))

    async def worker():
        for i in it:
            await job(i)
    await asyncio.gather(*(worker() for _ in range(conc)))


async def admissions(pki: Path, work: Path, n: int = N_AGENTS, rounds: int = ROUNDS, conc: int = CONC,
                     hb_every: float = HB_EVERY) -> AdmissionResult:
    res = AdmissionResult(n, rounds, conc)
    load0 = os.getloadavg()[0]
    ctx = client_context(*pki_paths(pki, "rma"))
    rma_der = der(pki, "rma")
    sid = SID.to_bytes(8, "big")
    db = work / "bench-sm.sqlite"
    # every admitted RMA keeps its TLS link (10.1.1.1): n * rounds links at the end, plus the
    # SMA/DMA and those in flight (the default max_conns, 1024, would do for 1000 RMAs)
    sm, tls_port, plain_port, sm_log = start_sm(pki, db, max_rmas=n * rounds + 10, max_conns=n * rounds + conc + 16)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, R.Rma]] = []
    bare = start_child("--bare-server", str(pki))
    bare_port = int(bare.stdout.readline())
    sma = agent_runner(pki, "sma", N.SMA, sma_maid(), tls_port, plain_port)
    dma = agent_runner(pki, "dma", N.DMA, dma_maid(0), tls_port, plain_port)
    tasks = [asyncio.create_task(r.run()) for r in (sma, dma)]

    async def keep_alive():
        while True:
            await asyncio.sleep(hb_every)
            for _, w, rma in list(held):
                w.write(bytes(rma.hb()))
                res.hbs += 1
    tasks.append(asyncio.create_task(keep_alive()))
    try:
        await until(lambda: sma.agent.state == dma.agent.state == "ready", 60, "SMA and DMA ready")
        await asyncio.sleep(0.6)  # the SM opens the session on its next tick after the policy

        async def handshake(i: int) -> None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", bare_port, ssl=ctx)
                writer.write(b"x")
                ok = await reader.read(1) == b"x"
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError, ssl.SSLError):
                ok = False
            res.bare_ok += ok
            res.bare_failed += not ok

        def admit_job(base: int):
            async def admit(i: int) -> None:
                rma = R.Rma(sid, rma_maid(base + i), rma_der, os.urandom)
                t0 = time.perf_counter()
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", tls_port, ssl=ctx)
                    writer.write(bytes(rma.start()))
                    while rma.state in (R.ST_KTLS, R.ST_SUBS, R.ST_POLICY):
                        data = await read_message(reader, 60, 0xFFFF)
                        if data is None:
                            break
                        out = rma.receive(data)
                        if out is not None:
                            writer.write(bytes(out))
                    await writer.drain()
                    if rma.state == R.ST_READY:
                        held.append((reader, writer, rma))  # the RMA stays on its TLS link
                    else:
                        writer.close()
                except (ConnectionError, OSError, ssl.SSLError):
                    pass
                res.adm_ms.append((time.perf_counter() - t0) * 1e3)
                res.ready += rma.state == R.ST_READY
                res.not_ready += rma.state != R.ST_READY
                res.sm_errors += sum(rma.errors)
            return admit

        for r in range(rounds):
            c0, t0, p0 = cpu_seconds(bare.pid), time.perf_counter(), time.process_time()
            await _workers(n, conc, handshake)
            res.bare_rates.append(n / (time.perf_counter() - t0))
            res.bare_cpu.append((cpu_seconds(bare.pid) - c0) / n)
            res.bare_client_cpu.append((time.process_time() - p0) / n)
            progress(f"  round {r + 1}: {res.bare_rates[-1]:.0f} bare TLS handshakes/s")
            base, want = r * n, acl_count(db) + n
            c0, t0, p0 = cpu_seconds(sm.pid), time.perf_counter(), time.process_time()
            await _workers(n, conc, admit_job(base))
            ready_by = time.monotonic() + 60
            while acl_count(db) < want and time.monotonic() < ready_by:  # the last SECAGANS committed
                await asyncio.sleep(0.005)
            res.adm_rates.append(n / (time.perf_counter() - t0))
            res.adm_cpu.append((cpu_seconds(sm.pid) - c0) / n)
            res.adm_client_cpu.append((time.process_time() - p0) / n)
            progress(f"  round {r + 1}: {res.adm_rates[-1]:.0f} admissions/s (firmware RMA engine)")
        await asyncio.sleep(0.1)
        res.held_open = sum(not r.at_eof() and not w.is_closing() for r, w, _ in held)
        res.load = (load0, os.getloadavg()[0])
    finally:
        tasks[-1].cancel()
        for r in (sma, dma):
            r.stop()
        for _, w, _ in held:
            w.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in (sm, bare):
            p.send_signal(signal.SIGTERM)
        for p in (sm, bare):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    sm_log.join(10)
    if sm.returncode != 0:
        raise RuntimeError(f"tessera sm serve exited {sm.returncode}: {''.join(sm_log.lines)}")
    m = re.search(r"(\d+) commits\)", "".join(sm_log.lines))
    res.commits = int(m[1]) if m else -1
    res.sm_counted = sm_log.counted
    store = SmStore(db, key=STORE_KEY)
    res.acl_rows = store.counts()["acl"]
    res.rma_members = store._db.execute("SELECT COUNT(*) FROM members WHERE nt=?", (int(N.RMA),)).fetchone()[0]
    store.close()
    return res


# ---------------------------------------------------------------------------- 2. Ks fan-out
@dataclass
class FanoutResult:
    n_dmas: int
    cases: dict[str, list[list[float]]] = field(default_factory=dict)  # case -> per event, per-DMA latency (s)
    sm_call: dict[str, list[float]] = field(default_factory=dict)  # case -> the engine call's own time (s)
    dma_handling: list[float] = field(default_factory=list)  # a DMA's receive() of the message that moved its Ks (s)
    missing: int = 0  # DMAs that did not report a generation they should hold
    child_errors: int = -1


async def fanout(pki: Path, work: Path, n_dmas: int = N_DMAS, rekeys: int = REKEYS, truncations: int = TRUNCATIONS,
                 hash_steps: int = HASH_STEPS) -> FanoutResult:
    res = FanoutResult(n_dmas)
    store = SmStore(work / "fanout-sm.sqlite", key=STORE_KEY)
    engine = open_engine(store, S.SmConfig(SID, C.make_maid("127.0.0.1", 26030, 1), agree_time=0.5), now=time.time())
    srv = SmServer(engine, store, server_context(*pki_paths(pki, "sm")), "127.0.0.1", 0, 0,
                   Limits(max_conns=n_dmas + 64))
    await srv.start()
    sm = srv.sm
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--dma-fleet", str(pki), str(srv.tls_port), str(srv.plain_port), str(n_dmas),
        stdout=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT / "host")))
    seen: dict[int, dict[bytes, float]] = {}  # generation -> DMA MAID -> install time
    ready = asyncio.Event()

    async def read_child():
        async for raw in child.stdout:
            parts = raw.decode().split()
            if parts[:1] == ["ready"]:
                ready.set()
            elif parts[:1] == ["ks"]:
                seen.setdefault(int(parts[2]), {})[bytes.fromhex(parts[1])] = float(parts[3])
                res.dma_handling.append(float(parts[4]))
            elif parts[:2] == ["done", "errors"]:
                res.child_errors = int(parts[2])
    reader = asyncio.create_task(read_child())
    dmas = {dma_maid(i) for i in range(n_dmas)}
    try:
        await asyncio.wait_for(ready.wait(), 180)
        await until(lambda: all(m in sm.members and sm.members[m].link in sm.links for m in dmas), 60,
                    "every DMA on its plain link")

        async def event(case: str, fire) -> None:
            await asyncio.sleep(0.05)  # let the previous event's stragglers settle
            gen = sm.ks.gen + 1
            t0 = time.monotonic()
            actions = fire()  # the engine: new Ks journalled (fsync), KEYDELIVER/HB sealed per DMA
            res.sm_call.setdefault(case, []).append(time.monotonic() - t0)
            srv._act(actions)
            try:
                await until(lambda: dmas <= seen.get(gen, {}).keys(), 30, f"{case}: generation {gen} at every DMA")
            except RuntimeError:
                res.missing += len(dmas - seen.get(gen, {}).keys())
            got = seen.get(gen, {})
            res.cases.setdefault(case, []).append([got[m] - t0 for m in dmas if m in got])

        for _ in range(rekeys):
            await event("fresh Ks (rekey)", lambda: sm.rekey(time.time(), "bench"))
        for i in range(truncations):
            gone = dma_maid(n_dmas - 1 - i)
            dmas.discard(gone)
            await event("truncation of one DMA", lambda: sm.truncate(gone, time.time()))

        def hash_tick():
            sm.ks_since -= sm.cfg.ks_period  # the Ks period has passed: this tick hashes forward
            return sm.tick(time.time())
        for _ in range(hash_steps):
            await event("hash step (tick)", hash_tick)
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), 30)
        except asyncio.TimeoutError:
            child.kill()
            await child.wait()
        await asyncio.wait_for(reader, 10)
        await srv.close()
    return res


# ---------------------------------------------------------------------------- report
def report(adm: AdmissionResult, fan: FanoutResult | None, quick: bool) -> str:
    med = statistics.median
    out = ["## Secure RMCP-2 control plane\n"]
    if quick:
        out.append("**`--quick` smoke run: a few agents only; these figures are not the benchmark.**\n")
    ratio = med(adm.ratios)
    out.append(
        f"**Admissions.** {adm.n} firmware RMAs per round (`tessera_fw/rmcp2/rma.py` under CPython via "
        f"`tessera.mpshim`), {adm.conc} at a time from one asyncio loop, against `tessera sm serve` (SQLite, "
        f"synchronous=FULL) in its own process; {adm.rounds} rounds alternating with the same number of bare TLS "
        "handshakes (TLS + one byte echoed) against a TLS server in its own process with the same server and "
        "client `ssl` contexts (ECDSA P-256, mutual TLS). An admission = TLS, KTLSREQ/KTLSANS, SUBSREQ/SUBSANS, "
        "SECAGREQ/SECLIST, SECAGANS, counted once the SM has committed the RMA's ACL row. Each admitted RMA keeps "
        f"its TLS link to the end of the run (10.1.1.1; {adm.n * adm.rounds} links at the end, HB every "
        f"{HB_EVERY:.0f} s to stay inside T_IDLE); a bare connection closes after its echo. Server CPU = the "
        "server process's user+system time per operation (/proc), which other load on the machine disturbs less "
        f"than the wall clock. Load average (1 min) at the start / end: {adm.load[0]:.1f} / {adm.load[1]:.1f} "
        f"on {os.cpu_count()} CPUs.\n")
    out.append("| measure | result |")
    out.append("| --- | --- |")
    out.append(f"| bare TLS handshakes/s (per round) | {', '.join(f'{x:.0f}' for x in adm.bare_rates)} |")
    out.append(f"| admissions/s (per round) | {', '.join(f'{x:.0f}' for x in adm.adm_rates)} |")
    out.append(f"| **ratio admissions / bare handshakes** (median of rounds; target >= 0.5) | "
               f"**{ratio:.2f}** [{min(adm.ratios):.2f}-{max(adm.ratios):.2f}] |")
    out.append(f"| server CPU per bare handshake / per admission | {med(adm.bare_cpu) * 1e3:.2f} ms / "
               f"{med(adm.adm_cpu) * 1e3:.2f} ms (ratio {med(adm.cpu_ratios):.2f}) |")
    out.append(f"| client process CPU per bare handshake / per admission | {med(adm.bare_client_cpu) * 1e3:.2f} ms / "
               f"{med(adm.adm_client_cpu) * 1e3:.2f} ms |")
    out.append(f"| SM store commits (fsync'd transactions) per admission, whole run incl. setup | "
               f"{adm.commits / (adm.n * adm.rounds):.2f} ({adm.commits} for {adm.n * adm.rounds}) |")
    out.append(f"| admission time, connect to SECAGANS sent, p50 / p99 ({adm.conc} in flight) | "
               f"{pct(adm.adm_ms, 0.5):.1f} / {pct(adm.adm_ms, 0.99):.1f} ms |")
    out.append(f"| accounting: RMAs READY / not / ACL rows / RMA members in the store | {adm.ready} / "
               f"{adm.not_ready} / {adm.acl_rows} / {adm.rma_members} (of {adm.n * adm.rounds}); bare handshakes "
               f"failed {adm.bare_failed}; RMA error counters {adm.sm_errors}; RMA links still open at the end "
               f"{adm.held_open} ({adm.hbs} HBs sent to keep them); error lines logged by the SM {adm.sm_counted} |")
    out.append("")
    if fan is None:
        return "\n".join(out)
    out.append(
        f"**Ks fan-out to {fan.n_dmas} DMAs.** The SM (`SmServer`, SQLite synchronous=FULL) in this process; the "
        f"SMA and {fan.n_dmas} DMAs (host `agent.py`, `AgentRunner` on their plain links) in a child process that "
        "stamps each Ks installation with CLOCK_MONOTONIC. Latency from just before the operator call (or the "
        "tick that fires the hash step) until a DMA holds the new generation; the SM's journal write of the new Ks "
        "(fsync) comes first and is included. \"all DMAs\" = the last DMA of each event. The DMAs share one "
        "process and handle their KEYDELIVER (or HB) one after another "
        f"({fan.n_dmas} x {med(fan.dma_handling) * 1e3:.2f} ms p50 in `receive()`, besides the reads), so the "
        "spread from the first DMA to the last is partly theirs; the SM's own part is the engine call (column) and "
        "writing to the links. "
        "Truncation = LEAVREQ to the DMA, its removal from the store, then a fresh Ks to the rest.\n")
    out.append("| event | events | per DMA p50 / p99 / max (ms) | all DMAs p50 / max (ms) | SM engine call p50 (ms) |")
    out.append("| --- | ---: | ---: | ---: | ---: |")
    for case, evs in fan.cases.items():
        flat = [x * 1e3 for ev in evs for x in ev]
        last = [max(ev) * 1e3 for ev in evs if ev]
        out.append(f"| {case} | {len(evs)} | {pct(flat, 0.5):.1f} / {pct(flat, 0.99):.1f} / {max(flat):.1f} | "
                   f"{med(last):.1f} / {max(last):.1f} | {med(fan.sm_call[case]) * 1e3:.1f} |")
    out.append(f"\nAccounting: {fan.missing} DMA deliveries missing; agent error counters {fan.child_errors}.")
    out.append(f"\nPlatform: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"Python {platform.python_version()}, shared with other work (wall-clock figures are noisy).")
    return "\n".join(out)


async def run_all(quick: bool, agents: int = N_AGENTS, rounds: int = ROUNDS,
                  skip_fanout: bool = False) -> tuple[AdmissionResult, FanoutResult | None]:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        pki = work / "pki"
        make_pki(pki, NAMES)
        if quick:
            adm = await admissions(pki, work, n=20, rounds=1, conc=4)
            fan = await fanout(pki, work, n_dmas=5, rekeys=2, truncations=1, hash_steps=1)
        else:
            adm = await admissions(pki, work, n=agents, rounds=rounds)
            if skip_fanout:
                return adm, None
            progress(f"  Ks fan-out to {N_DMAS} DMAs ...")
            fan = await fanout(pki, work)
    return adm, fan


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few agents only: a smoke run")
    p.add_argument("--agents", type=int, default=N_AGENTS, help=f"RMAs per admission round (default {N_AGENTS})")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"admission rounds (default {ROUNDS})")
    p.add_argument("--skip-fanout", action="store_true", help="admissions only (for profiling)")
    p.add_argument("--profile-sm", metavar="FILE", help="run tessera sm serve under cProfile, stats to FILE")
    p.add_argument("--bare-server", metavar="PKI", help=argparse.SUPPRESS)
    p.add_argument("--dma-fleet", nargs=4, metavar=("PKI", "TLS", "PLAIN", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    global PROFILE_SM
    PROFILE_SM = args.profile_sm
    if args.bare_server:
        asyncio.run(bare_server(Path(args.bare_server)))
        return 0
    if args.dma_fleet:
        pki, tp, pp, n = args.dma_fleet
        asyncio.run(dma_fleet(Path(pki), int(tp), int(pp), int(n)))
        return 0
    adm, fan = asyncio.run(run_all(args.quick, args.agents, args.rounds, args.skip_fanout))
    print(report(adm, fan, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
