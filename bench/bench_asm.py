"""ASM benchmarks: prints one Markdown section on stdout, progress on stderr.

The responder and a bare TLS echo server (same TLS profile, same record handling) each run
in their own process; the initiators run here. Ratios are measured in the same run.
"""
from __future__ import annotations

import asyncio
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tessera.asm import codec
from tessera.asm.codec import LEKey
from tessera.asm.initiator import Initiator, RequestRefused
from tessera.asm.net import Profile, TLSStream
from tessera.asm.tls import Credentials, TLSChannel
from tessera.pki import certs

REQ = len(codec.GetTimeRequest(1).encode())  # 24 bytes
RESP = len(codec.GetTimeResponse(1, 0).encode())  # 33 bytes
N_SEQ = 3000
N_LOAD = 200
N_CLIENTS = 50
PER_CLIENT = 40


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- echo server
async def echo_server(creds: Credentials) -> None:
    prof = Profile(creds, server=True)

    async def conn(reader, writer):
        s = TLSStream(reader, writer, TLSChannel(prof.ctx, server=True))
        try:
            await s.handshake()
            buf = bytearray()
            while True:
                buf += await s.recv()
                while len(buf) >= REQ:
                    del buf[:REQ]
                    await s.send(b"\0" * RESP)
        except Exception:
            pass
        finally:
            await s.aclose()

    srv = await asyncio.start_server(conn, "127.0.0.1", 0)
    print(f"port {srv.sockets[0].getsockname()[1]}", flush=True)
    await srv.serve_forever()


async def echo_client(port: int, creds: Credentials, n: int) -> float:
    prof = Profile(creds, server=False)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    s = TLSStream(r, w, TLSChannel(prof.ctx, server=False))
    await s.handshake()
    req = b"\1" * REQ
    t0 = time.perf_counter()
    for _ in range(n):
        await s.send(req)
        got = 0
        while got < RESP:
            got += len(await s.recv())
    dt = time.perf_counter() - t0
    await s.aclose()
    return n / dt


# --------------------------------------------------------------------------- bench
def spawn(args: list[str]) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    m = re.search(r"(?:port |:)(\d+)", line)
    if not m:
        p.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return p, int(m.group(1))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def bench(port_resp: int, port_echo: int, ic: Credentials) -> dict:
    out: dict = {}
    progress(f"GetTime x {N_SEQ} on one connection ...")
    async with Initiator("127.0.0.1", port_resp, creds=ic) as ini:
        for _ in range(100):
            await ini.get_time()
        t0 = time.perf_counter()
        for _ in range(N_SEQ):
            await ini.get_time()
        out["rrp_s"] = N_SEQ / (time.perf_counter() - t0)
        progress(f"bare TLS echo {REQ}->{RESP} bytes x {N_SEQ} ...")
        await echo_client(port_echo, ic, 100)
        out["echo_s"] = await echo_client(port_echo, ic, N_SEQ)
        progress(f"LEKeyLoad of 16 keys x {N_LOAD} ...")
        lat = []
        for _ in range(N_LOAD):
            keys = [LEKey(i + 1, secrets.token_bytes(16), 3600, int.from_bytes(secrets.token_bytes(8), "big")) for i in range(16)]
            t = time.perf_counter()
            r = await ini.le_key_load(keys)
            lat.append(time.perf_counter() - t)
            assert r.response == 0
        out["load_p50"], out["load_p99"] = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
        out["load_s"] = 1 / statistics.mean(lat)
        await ini.le_key_purge_all()

    progress(f"{N_CLIENTS} initiators x {PER_CLIENT} GetTime at once ...")
    lats: list[float] = []
    busy = 0
    conn_lat: list[float] = []

    async def one() -> None:
        nonlocal busy
        t = time.perf_counter()
        async with Initiator("127.0.0.1", port_resp, creds=ic, timeout=2.0, connect_timeout=10) as ini:
            conn_lat.append(time.perf_counter() - t)
            for _ in range(PER_CLIENT):
                t = time.perf_counter()
                try:
                    await ini.get_time()
                except RequestRefused:
                    busy += 1
                lats.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(N_CLIENTS)))
    out["conc_wall"] = time.perf_counter() - t0
    out["conc_p50"], out["conc_p99"], out["conc_max"] = (pct(lats, 0.5) * 1e3, pct(lats, 0.99) * 1e3, max(lats) * 1e3)
    out["conc_n"], out["busy"] = len(lats), busy
    out["hs_p99"] = pct(conn_lat, 0.99) * 1e3
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--echo-server":
        asyncio.run(echo_server(Credentials(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        progress("creating a PKI ...")
        paths = certs.write_chain(certs.create_chain("Bench", [("SM", "initiator"), ("LD", "responder")]), d / "pki")
        ic = Credentials(paths["initiator"], paths["initiator.key"], paths["root"])
        env_py = [sys.executable]
        resp, rport = spawn([*env_py, "-m", "tessera", "-q", "asm", "responder", "--pki", str(d / "pki"), "--port", "0",
                             "--max-connections-per-source", str(N_CLIENTS + 2),
                             "--db", str(d / "resp.db")])
        echo, eport = spawn([*env_py, __file__, "--echo-server", str(paths["responder"]), str(paths["responder.key"]),
                             str(paths["root"])])
        try:
            r = asyncio.run(bench(rport, eport, ic))
        finally:
            for p in (resp, echo):
                p.terminate()
                p.wait(10)
    ok = "within" if r["conc_max"] < 2000 else "OVER"
    print(f"""## ASM (SMPTE 430-6)

Responder (`tessera asm responder`, SQLite security log, in-memory key store) and a bare
echo server on the same TLS profile (TLS 1.0, AES128-SHA, 512-byte records, MemoryBIO record
handling) each in their own process; initiators in the bench process; loopback, {os.cpu_count()} CPUs.

| measure | result |
| --- | --- |
| GetTime RRPs per second, one TLS connection ({N_SEQ} sequential) | {r['rrp_s']:.0f} /s |
| bare TLS echo of the same sizes ({REQ} B -> {RESP} B), same run | {r['echo_s']:.0f} /s |
| ratio GetTime / echo | {r['rrp_s'] / r['echo_s']:.2f} |
| LEKeyLoad of 16 keys ({N_LOAD} loads, incl. the SQLite log record) | p50 {r['load_p50']:.2f} ms, p99 {r['load_p99']:.2f} ms ({r['load_s']:.0f} loads/s) |
| {N_CLIENTS} initiators at once x {PER_CLIENT} GetTime each ({r['conc_n']} RRPs, {r['conc_wall']:.1f} s wall) | p50 {r['conc_p50']:.1f} ms, p99 {r['conc_p99']:.1f} ms, max {r['conc_max']:.1f} ms: {ok} the 2 s budget |
| busy answers during the {N_CLIENTS}-initiator run | {r['busy']} |
| TLS connect + handshake + 430-2 check, p99 of {N_CLIENTS} at once | {r['hs_p99']:.0f} ms |
""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
