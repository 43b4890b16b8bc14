"""The SM and agents over loopback with real mutual TLS (ECDSA P-256), ephemeral ports and the
SQLite store: refusals at TLS, open and closed groups, 0x41/0x42, the policy agreement end to
end, Ks re-keys reaching every DMA, and kill -9 / SIGTERM of `tessera sm serve`."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import sm as S
from tessera.rmcp2.agent import Agent, AgentConfig
from tessera.rmcp2.certs import client_context, make_pki, pki_paths, server_context
from tessera.rmcp2.server import AgentRunner, Limits, SmServer
from tessera.rmcp2.store import SmStore, open_engine

SID = 0x5E55_2000_0000_0001
N = C.NodeType
NAMES = ["sm", "sma", "dma0", "dma1", "dma2", "rma0", "rma1", "rma2", "rma3"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, NAMES)
    rogue = tmp_path_factory.mktemp("rogue")
    make_pki(rogue, ["rma0"])  # same names, another CA: not trusted by the SM
    return d, rogue


def der(pki_dir, name: str) -> bytes:
    return x509.load_pem_x509_certificate((pki_dir / f"{name}.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER)


def runner(pki_dir, name: str, nt: C.NodeType, i: int, tls_port: int, plain_port: int, **kw) -> AgentRunner:
    gp = kw.pop("gp", C.GpAttribute.OPEN)
    propose = C.SmaPropose(gp, C.GkMecha.PERIODIC, C.EnDecId.AES_CTR_128) if nt == N.SMA else None
    cfg = AgentConfig(nt, SID, C.make_maid("127.0.0.1", 42000 + i, i), der(pki_dir, name), propose=propose,
                      hrs_refresh=0.3, **kw)
    return AgentRunner(Agent(cfg), client_context(*pki_paths(pki_dir, name)), "127.0.0.1", tls_port, plain_port,
                       tick=0.05, retry=0.1)


async def until(cond, timeout: float = 20.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


class Session:
    """An SM server with an SMA and DMAs, all in this event loop."""

    def __init__(self, pki_dir, tmp_path, gp=C.GpAttribute.OPEN, n_dmas: int = 2, limits: Limits | None = None,
                 **cfg) -> None:
        self.pki = pki_dir
        self.store = SmStore(tmp_path / "sm.sqlite", key=bytes(range(32)))
        engine = open_engine(self.store, S.SmConfig(SID, C.make_maid("127.0.0.1", 26030, 1), agree_time=0.5, **cfg),
                             now=time.time())
        self.server = SmServer(engine, self.store, server_context(*pki_paths(pki_dir, "sm")), "127.0.0.1", 0, 0,
                               limits or Limits(tick=0.05, max_conns=64))
        self.gp, self.n_dmas = gp, n_dmas
        self.tasks: list[asyncio.Task] = []
        self.runners: dict[str, AgentRunner] = {}

    async def __aenter__(self):
        await self.server.start()
        self.spawn("sma", N.SMA, 1, gp=self.gp)
        for i in range(self.n_dmas):
            self.spawn(f"dma{i}", N.DMA, 10 + i)
        await until(lambda: all(r.agent.state == "ready" for r in self.runners.values()),
                    what=lambda: f"SMA/DMAs ready: {[(n, r.agent.state, r.agent.errors, r.links) for n, r in self.runners.items()]}"
                    f" SM {self.server.sm.errors} policy {self.server.sm.policy}")
        await until(lambda: self.server.sm.open_to_rmas, what="session open")
        return self

    async def __aexit__(self, *exc):
        for r in self.runners.values():
            r.stop()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.close()

    def spawn(self, name: str, nt: C.NodeType, i: int, **kw) -> AgentRunner:
        r = self.runners[name] = runner(self.pki, name, nt, i, self.server.tls_port, self.server.plain_port, **kw)
        self.tasks.append(asyncio.create_task(r.run()))
        return r

    async def rma(self, name: str, i: int, **kw) -> Agent:
        r = self.spawn(name, N.RMA, i, **kw)
        await until(lambda: r.agent.state in ("ready", "refused", "failed"), what=f"{name} admission")
        return r.agent

    def dmas(self) -> list[Agent]:
        return [r.agent for n, r in self.runners.items() if n.startswith("dma")]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_an_ma_without_a_valid_certificate_is_refused_at_tls(pki, tmp_path):
    pki_dir, rogue = pki

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            port = s.server.tls_port
            no_cert = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
            no_cert.check_hostname = False
            rogue_ctx = client_context(*pki_paths(rogue, "rma0"))
            rogue_ctx.load_verify_locations(str(pki_dir / "ca.pem"))  # trusts the SM, but the SM does not trust it
            for ctx in (no_cert, rogue_ctx):
                a = Agent(AgentConfig(N.RMA, SID, C.make_maid("127.0.0.1", 43000, 1), b"x"))
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                    w.write(a.start(0.0)[0])
                    await w.drain()
                    got = await asyncio.wait_for(r.read(100), 10)
                    assert got == b"", "the SM must not answer an unauthenticated peer"
                except (ssl.SSLError, ConnectionError):
                    pass  # TLS 1.3: the alert may arrive as an error on the client's first read
            await until(lambda: sum(v for k, v in s.server.sm.errors.items() if k.startswith("TLS handshake")) == 2,
                        what="two refused handshakes")
            assert len(s.server.sm.members) == 2  # the SMA and the DMA only
            assert all(link.member is not None for link in s.server.sm.links.values())  # no state for the refused
            # everyone else is served meanwhile: an honest RMA is admitted
            assert (await s.rma("rma1", 101)).state == "ready"
    run(main())


def test_connections_are_bounded_and_silent_peers_time_out(pki, tmp_path):
    async def main():
        lim = Limits(tick=0.05, max_conns=6, tls_timeout=1.5, idle_timeout=1.5)
        async with Session(pki[0], tmp_path, n_dmas=1, limits=lim) as s:
            srv = s.server
            assert srv.conns == 2  # the SMA's and the DMA's plain links
            silent = [await asyncio.open_connection("127.0.0.1", srv.tls_port) for _ in range(4)]
            await until(lambda: srv.conns == 6, what="four silent TCP peers counted")
            r, w = await asyncio.open_connection("127.0.0.1", srv.tls_port)
            assert await asyncio.wait_for(r.read(1), 5) == b"" and srv.refused == 1  # over the bound: closed
            w.close()
            assert srv.sm.links.keys() == {c for c, link in srv.sm.links.items() if link.member}  # no state for them
            for rd, _ in silent:  # T_TLS: each silent peer is dropped without a handshake
                assert await asyncio.wait_for(rd.read(1), 10) == b""
            await until(lambda: srv.conns == 2, what="silent peers released")
            assert sum(v for k, v in srv.sm.errors.items() if k.startswith("TLS handshake")) == 4
            # a plain-link peer that sends half a message is dropped after T_IDLE
            r, w = await asyncio.open_connection("127.0.0.1", srv.plain_port)
            w.write(b"\x45\xad\x00\x30")
            assert await asyncio.wait_for(r.read(1), 10) == b""
            assert (await s.rma("rma3", 103)).state == "ready"  # others served throughout
            for _, wr in silent:
                wr.close()
    run(main())


def test_open_group_policy_agreement_and_acl_end_to_end(pki, tmp_path):
    async def main():
        async with Session(pki[0], tmp_path) as s:
            sm = s.server.sm
            assert sm.policy.gp_attribute == C.GpAttribute.OPEN
            assert all(r.agent.policy_result == C.SecReturn.OK for r in s.runners.values())
            ok = await s.rma("rma0", 100)
            assert ok.state == "ready" and ok.result == C.Result.ACCEPTED and ok.ks is None
            # an RMA that cannot run the agreed content algorithm refuses with a clear result
            weak = await s.rma("rma1", 101, en_dec=frozenset({C.EnDecId.AES_CBC_128}))
            assert weak.state == "failed" and weak.policy_result == C.SecReturn.FAILED_CONFIGURATION
            entry = P.hashed_maid(SID, ok.cfg.maid) + ok.hashed_ktls
            await until(lambda: all(entry in d.acl for d in s.dmas()), what="ACL at every DMA")
            assert all(len(d.acl) == 1 for d in s.dmas())  # the refusing RMA is not in it
            assert weak.cfg.maid not in sm.members
    run(main())


def test_closed_group_refusals_0x41_0x42_and_registered_identifier(pki, tmp_path):
    async def main():
        async with Session(pki[0], tmp_path, gp=C.GpAttribute.CLOSED) as s:
            s.store.add_service_user_id(b"viewer-1")  # what `tessera sm service-user add` does
            await until(lambda: b"viewer-1" in s.server.sm.service_user_ids, what="identifier picked up")
            missing = await s.rma("rma0", 100)
            unknown = await s.rma("rma1", 101, service_user_id=b"viewer-9")
            good = await s.rma("rma2", 102, service_user_id=b"viewer-1")
            assert (missing.state, int(missing.result)) == ("refused", 0x41)
            assert (unknown.state, int(unknown.result)) == ("refused", 0x42)
            assert good.state == "ready" and good.result == C.Result.ACCEPTED
            assert [m.nt for m in s.server.sm.members.values()].count(N.RMA) == 1
    run(main())


def test_ks_rekeys_reach_every_dma(pki, tmp_path):
    async def main():
        async with Session(pki[0], tmp_path, n_dmas=3) as s:
            sm, srv = s.server.sm, s.server
            everyone = [s.runners["sma"].agent, *s.dmas()]
            srv._act(sm.rekey(time.time(), "test"))
            await until(lambda: all(a.ks_gen == 2 and a.ks._raw == sm._ks_raw for a in everyone), what="fresh Ks")
            # truncating a DMA: the others get generation 3, it is expelled and cannot follow
            gone = s.runners["dma2"].agent
            srv._act(sm.truncate(gone.cfg.maid, time.time()))
            rest = everyone[:-1]
            await until(lambda: all(a.ks_gen == 3 and a.ks._raw == sm._ks_raw for a in rest), what="Ks after truncation")
            await until(lambda: gone.state == "expelled", what="LEAVREQ to the truncated DMA")
            assert gone.ks is None and gone.cfg.maid not in sm.members
            # a hash step (Ks period passed): every remaining DMA and the SMA follow by hashing
            sm.ks_since -= sm.cfg.ks_period
            await until(lambda: all(a.ks_gen == 4 and a.ks._raw == sm._ks_raw for a in rest), what="hash step")
            assert sm.ks_mode == C.KeyMode.HASHED
    run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(db, pki_dir, tls_port: int, plain_port: int) -> subprocess.Popen:
    env = dict(os.environ, TESSERA_SM_KEY=bytes(range(32)).hex())
    return subprocess.Popen([sys.executable, "-m", "tessera", "sm", "serve", "--db", str(db), "--session-id",
                             f"{SID:x}", "--pki-dir", str(pki_dir), "--tls-port", str(tls_port), "--plain-port",
                             str(plain_port), "--agree-time", "0.5"], env=env, stderr=subprocess.PIPE, text=True)


class _Log:
    """A child's stderr read by a thread, so that a test waits for a line with a deadline
    (a blocking `for line in p.stderr` hangs for ever when the line never comes) and shows
    the whole log when it fails."""

    def __init__(self, name: str, p: subprocess.Popen) -> None:
        import threading

        self.name, self.p, self.lines, self.cv = name, p, [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stderr:
            with self.cv:
                self.lines.append(line.rstrip())
                self.cv.notify_all()
        with self.cv:
            self.lines.append(None)  # EOF
            self.cv.notify_all()

    def wait(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """The first line matching `pattern` (from the start of the log)."""
        deadline = time.monotonic() + timeout
        i = 0
        with self.cv:
            while True:
                while i < len(self.lines):
                    line = self.lines[i]
                    i += 1
                    if line is None:
                        raise AssertionError(f"{self.name} ended (rc {self.p.poll()}) before /{pattern}/:\n{self}")
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no /{pattern}/ within {timeout:.0f} s:\n{self}")
                self.cv.wait(left)

    def __str__(self) -> str:
        return "\n".join(f"  {self.name}| {ln}" for ln in self.lines if ln is not None)


def _wait_listening(proc: subprocess.Popen) -> _Log:
    """The SM's log, once it listens; its stderr stays drained (a pipe nobody reads would
    block the SM once full)."""
    log = _Log("sm", proc)
    log.wait(r"TLS admission on", 30)
    return log


@pytest.mark.slow
def test_kill_9_of_tessera_sm_serve_loses_nothing_and_sigterm_stops_it(pki, tmp_path):
    pki_dir = pki[0]
    db = tmp_path / "sm.sqlite"
    tp, pp = _free_port(), _free_port()
    proc = _serve(db, pki_dir, tp, pp)
    try:
        _wait_listening(proc)

        async def first():
            sma = runner(pki_dir, "sma", N.SMA, 1, tp, pp)
            dma = runner(pki_dir, "dma0", N.DMA, 10, tp, pp)
            rma = runner(pki_dir, "rma0", N.RMA, 100, tp, pp)
            tasks = [asyncio.create_task(r.run()) for r in (sma, dma)]
            await until(lambda: sma.agent.state == dma.agent.state == "ready", what="SMA/DMA ready")
            tasks.append(asyncio.create_task(rma.run()))
            await until(lambda: len(dma.agent.acl) == 1, what="the RMA in the DMA's ACL")
            proc.send_signal(signal.SIGKILL)  # while every agent is connected
            proc.wait(10)
            for r in (sma, dma, rma):
                r.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            return sma.agent, dma.agent, rma.agent
        sma, dma, rma = run(first())
        assert proc.returncode == -signal.SIGKILL
        proc = _serve(db, pki_dir, tp, pp)
        log = _wait_listening(proc)

        async def second():
            # the same DMA (its K_TLS and Ks as before the kill) reconnects its plain link
            r = AgentRunner(dma, client_context(*pki_paths(pki_dir, "dma0")), "127.0.0.1", tp, pp, tick=0.05,
                            retry=0.1)
            before = dma.acl_updates
            t = asyncio.create_task(r.run_plain())
            await until(lambda: dma.acl_updates > before, what="HRSANS after the restart")
            assert dma.acl == frozenset({P.hashed_maid(SID, rma.cfg.maid) + rma.hashed_ktls}) and not dma.errors
            r.stop()
            await t
        run(second())
        assert dma.ks_gen == sma.ks_gen == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.wait(r"stopped", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = SmStore(db, key=bytes(range(32)))
    assert store.counts()["members"] == 3 and store.counts()["acl"] == 1


@pytest.mark.slow
def test_cli_sma_dma_rma_against_tessera_sm_serve(pki, tmp_path):
    pki_dir = pki[0]
    tp, pp, sma_tree = _free_port(), _free_port(), _free_port()
    obj = tmp_path / "object.bin"
    obj.write_bytes(os.urandom(5000))
    sm = _serve(tmp_path / "sm.sqlite", pki_dir, tp, pp)
    procs = [sm]
    try:
        _wait_listening(sm)
        common = ["--sm", f"127.0.0.1:{tp}", "--plain-port", str(pp), "--session-id", f"{SID:x}", "--pki-dir",
                  str(pki_dir)]

        def agent(*argv) -> _Log:
            p = subprocess.Popen([sys.executable, "-m", "tessera", *argv, *common], stderr=subprocess.PIPE, text=True)
            procs.append(p)
            return _Log(argv[0], p)
        # the SMA's tree service on a port picked free now; it sends one object once the DMA linked
        sma = agent("sma", "--group", "closed", "--instance", "1", "--tree-port", str(sma_tree), "--object", str(obj))
        dma = agent("dma", "--name", "dma0", "--instance", "2", "--tree-port", "0", "--sma", f"127.0.0.1:{sma_tree}")
        for a in (sma, dma):
            a.wait(r"state ready.*policy OK, Ks generation 1")
        # the DMA's tree service (docs/rmcp2.md) logs its port, before or after "ready"
        tree_port = int(dma.wait(r"DMA: tree port (\d+)").group(1))
        with socket.create_connection(("127.0.0.1", tree_port), 10) as s:  # a join answered there:
            stranger = C.make_maid("127.0.0.1", 1, 1)  # an RMA not in the DMA's ACL
            s.sendall(C.Message(C.MsgType.PPROBREQ, N.RMA, SID, stranger,
                                (C.ProbeAuth(P.hashed_maid(SID, stranger), bytes(8), bytes(8)),)).encode())
            s.settimeout(10)
            ans = C.decode(s.recv(1024))
            assert ans.type == C.MsgType.PPROBANS and ans.get(C.ResultCtl).value == C.Result.NOT_IN_ACL
        # the DMA linked upstream (PPROBREQ + CONTENT_ADDR under Ks): the object went
        n = sma.wait(re.escape(f"object {obj} (5000 B) sent to ") + r"(\d+) DMA", 60).group(1)
        assert n == "1", f"{sma}\n{dma}"
        rma = agent("rma", "--name", "rma0", "--instance", "3")
        assert rma.p.wait(30) == 2
        rma.wait(r"SERV_USER_ID_MISSING \(0x41\)", 10)
        for a in (sma, dma):
            a.p.send_signal(signal.SIGTERM)
            assert a.p.wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_cli_sma_refuses_a_missing_content_file_at_once(tmp_path, capsys, caplog):
    """`tessera sma --object FILE` with no such FILE ends at once with exit 2 and says which
    file, instead of being admitted, linking DMAs and then failing silently in the background."""
    from tessera import cli

    t0 = time.monotonic()
    assert cli.main(["sma", "--session-id", "1", "--pki-dir", str(tmp_path), "--object", str(tmp_path / "nope.bin")]) == 2
    out = capsys.readouterr().err + caplog.text
    assert f"no such file to send: {tmp_path / 'nope.bin'}" in out
    assert time.monotonic() - t0 < 5
