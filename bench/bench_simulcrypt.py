"""SimulCrypt bench: CW_provision -> ECM_response round trips per second with 100 STKM
streams over one channel and over 10 channels (10 streams each), against a bare TLV echo
(user-defined message type 0x8F01 carrying the same parameters) over the same connections
in the same run; p99 latency against the generator's max_comp_time.

The STKM generator runs in its own process (the client in this one), on loopback.
Prints one Markdown section on stdout; progress on stderr.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time

from tessera.simulcrypt import stkm
from tessera.simulcrypt.engine import EcmgCaps, EcmResponse, PeerError, ScsConnection, UserMessage
from tessera.simulcrypt.tables import EM, EP

DRM = 0x00010001
STREAMS = 100
DURATION = float(os.environ.get("SC_BENCH_SECONDS", "1.0"))
ROUNDS = 3  # echo and STKM phases alternate; medians reported (the host is shared and noisy)
CAPS = EcmgCaps(delay_start=-200, delay_stop=0, ecm_rep_period=100, max_streams=128, min_cp_duration=1,
                lead_cw=1, cw_per_msg=2, max_comp_time=100)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serve(conn) -> None:
    from tessera.simulcrypt.ecmg import StkmGenerator
    from tessera.simulcrypt.keystore import KeyStore

    ks = KeyStore(":memory:")
    for ecm_id in range(1, STREAMS + 1):
        ks.add("SEK", DRM, ecm_id)

    async def main() -> None:
        g = StkmGenerator(ks, {DRM}, CAPS, echo=True)
        conn.send(await g.start())
        while (cmd := await asyncio.get_running_loop().run_in_executor(None, conn.recv)) != "stop":
            conn.send((g.stats.reads, g.stats.messages))  # "stats"
        conn.send((sorted(g.stats.comp_times), g.stats.refused, g.stats.over_time))
        await g.close()

    asyncio.run(main())


class Client:
    def __init__(self, channel_id: int, stream_ids: range) -> None:
        self.conn = ScsConnection(channel_id, DRM, user_types=frozenset({0x8F01}))
        self.stream_ids = stream_ids
        self.waiting: dict[int, asyncio.Future] = {}
        self.refused = 0  # CW_provisions answered with out of computational resources (max_comp_time)

    async def open(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.task = asyncio.create_task(self._read())
        self.ready = asyncio.get_running_loop().create_future()
        self.conn.setup()
        self._flush()
        await asyncio.wait_for(self.ready, 5)
        for sid in self.stream_ids:
            self.ready = asyncio.get_running_loop().create_future()
            self.conn.stream_setup(sid, sid, 10)
            self._flush()
            await asyncio.wait_for(self.ready, 5)

    def _flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            for ev in self.conn.receive_data(data):
                if isinstance(ev, EcmResponse):
                    key = ev.stream_id
                elif isinstance(ev, UserMessage):
                    key = ev.msg.int(EP.ECM_STREAM_ID)
                elif isinstance(ev, PeerError) and ev.stream_id in self.waiting:
                    key = ev.stream_id  # the generator refused: it could not meet max_comp_time
                    self.refused += 1
                else:
                    if not self.ready.done():
                        self.ready.set_result(ev)
                    continue
                fut = self.waiting.pop(key, None)
                if fut:
                    fut.set_result(None)
            self._flush()

    def params(self, sid: int, cp: int, first: bool) -> list:
        p = [(EP.ECM_CHANNEL_ID, self.conn.channel_id), (EP.ECM_STREAM_ID, sid), (EP.CP_NUMBER, cp),
             (EP.CP_CW_COMBINATION, cp.to_bytes(2, "big") + os.urandom(16)),
             (EP.CP_CW_COMBINATION, ((cp + 1) & 0xFFFF).to_bytes(2, "big") + os.urandom(16))]
        if first:
            p.append((EP.ACCESS_CRITERIA, stkm.AccessCriteria(stkm.Protection.SRTP, os.urandom(18)).encode()))
        return p

    async def loop(self, sid: int, echo: bool, until: float, lat: list[float]) -> None:
        loop = asyncio.get_running_loop()
        cp = 0
        first = True
        while loop.time() < until:
            fut = loop.create_future()
            self.waiting[sid] = fut
            t0 = time.perf_counter()
            self.conn.send(0x8F01 if echo else EM.CW_PROVISION, self.params(sid, cp, first))
            self._flush()
            await fut
            lat.append(time.perf_counter() - t0)
            first = False
            cp = (cp + 1) & 0xFFFF


async def server_stats(pipe) -> tuple[int, int]:
    pipe.send("stats")
    return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


async def phase(clients: list[Client], echo: bool, pipe) -> tuple[float, list[float], float]:
    lat: list[float] = []
    loop = asyncio.get_running_loop()
    # warm-up
    await asyncio.gather(*(c.loop(s, echo, loop.time() + 0.2, []) for c in clients for s in c.stream_ids))
    r0, m0 = await server_stats(pipe)
    t0 = loop.time()
    until = t0 + DURATION
    await asyncio.gather(*(c.loop(s, echo, until, lat) for c in clients for s in c.stream_ids))
    rps = len(lat) / (loop.time() - t0)
    r1, m1 = await server_stats(pipe)
    return rps, sorted(lat), (m1 - m0) / max(1, r1 - r0)


def p(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def bench(port: int, pipe) -> list[tuple]:
    rows = []
    next_channel = 1
    for channels in (1, 10):
        per = STREAMS // channels
        clients = []
        for c in range(channels):
            cl = Client(next_channel, range(1 + c * per, 1 + (c + 1) * per))
            next_channel += 1
            await cl.open(port)
            clients.append(cl)
        res: dict[bool, list] = {True: [], False: []}
        for r in range(ROUNDS):
            for echo in (True, False):
                log(f"{channels} channel(s) x {per} streams, round {r + 1}: {'echo' if echo else 'STKM'} ...")
                res[echo].append(await phase(clients, echo, pipe))
        med = {k: (statistics.median(x[0] for x in v), sorted(y for x in v for y in x[1]),
                   statistics.median(x[2] for x in v)) for k, v in res.items()}
        ratios = [s[0] / e[0] for s, e in zip(res[False], res[True])]
        (rps, lat, mpr), (echo_rps, echo_lat, echo_mpr) = med[False], med[True]
        rows.append((channels, per, rps, echo_rps, p(lat, 0.5), p(lat, 0.99), p(echo_lat, 0.99), mpr, echo_mpr,
                     statistics.median(ratios), min(ratios), max(ratios)))
        for cl in clients:
            cl.conn.close()
            cl._flush()
            cl.writer.close()
    return rows


def main() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(child,), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        rows = asyncio.run(bench(port, parent))
        parent.send("stop")
        comp, refused, over_time = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    print("## SimulCrypt (ECMG <-> SCS)\n")
    print(f"CW_provision -> ECM_response round trips with {STREAMS} STKM streams, each stream keeping one "
          f"request outstanding; {ROUNDS} rounds of {DURATION:.0f} s alternating echo and STKM, medians shown "
          "(ratio = median of the per-round ratios, range in brackets); STKM generator in a separate process on loopback. "
          "Baseline: a bare TLV echo (user-defined message type 0x8F01 with the same parameters) over the same "
          "connections, in the same rounds. Each CW_provision carries 2 TEKs (lead_CW 1, CW_per_msg 2); the "
          "generator builds an AES-CTR + HMAC-SHA-256 STKM with the stream's service key from the key store.\n")
    print("| channels x streams | STKM round trips/s | echo round trips/s | ratio | p50 ms | p99 ms | echo p99 ms | "
          "max_comp_time ms | requests per server read (STKM / echo) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ch, per, rps, erps, p50, p99, ep99, mpr, empr, ratio, rlo, rhi in rows:
        print(f"| {ch} x {per} | {rps:,.0f} | {erps:,.0f} | {ratio:.2f} [{rlo:.2f}-{rhi:.2f}] | {p50:.2f} | {p99:.2f} | {ep99:.2f} | "
              f"{CAPS.max_comp_time} | {mpr:.1f} / {empr:.1f} |")
    if comp:
        print(f"\nSTKM build time inside the generator (CW_provision event -> STKM bytes), {len(comp):,} STKMs: "
              f"median {statistics.median(comp) * 1e6:.0f} us, p99 {p(comp, 0.99):.3f} ms. "
              f"p99 round trip stays {'below' if all(r[5] < CAPS.max_comp_time for r in rows) else 'ABOVE'} "
              f"max_comp_time ({CAPS.max_comp_time} ms) in both layouts. The generator refused {refused:,} "
              f"CW_provisions as unable to meet max_comp_time (out of computational resources, counted as round "
              f"trips) and sent {over_time:,} STKMs later than max_comp_time after reading their CW_provision.")


if __name__ == "__main__":
    main()
