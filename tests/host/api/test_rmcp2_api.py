"""tessera.api.rmcp2: the SM (store, serving, status, identifiers, operator requests) and the
agents, sync and async, over loopback with real mutual TLS and ephemeral ports; and the
`tessera sm rekey` / `tessera sm truncate` commands against a running `tessera sm serve`."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tessera import (AgentError, AsyncMaAgent, AsyncSessionManager, MaAgent, NoSession, PolicyRefused,
                     RequestRefused, SecReturn, SessionManager, SmError, SmNotServing, SmSettings,
                     SubscriptionRefused, SubsResult, make_sm_pki)

from ..rmcp2.test_net import _free_port, _wait_listening

SID = 0x5E55_3000_0000_0001
KEY = bytes(range(32))
NAMES = ["sm", "sma", "dma1", "dma2", "rma1", "rma2", "rma3"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    paths = make_sm_pki(d, NAMES)
    assert set(paths) == {"ca", *NAMES} and oct((d / "sma.key").stat().st_mode & 0o777) == "0o600"
    return d


def test_sm_and_agents_sync_closed_group(pki, tmp_path):
    with SessionManager.open(tmp_path / "sm.sqlite", SmSettings(SID, agree_time=0.3), key=KEY) as sm:
        assert sm.session_id == SID and sm.status().policy is None
        sm.add_service_user("viewer-1")
        sm.add_service_user(b"\x00\xff")
        assert sm.service_users() == [b"\x00\xff", b"viewer-1"]
        assert sm.remove_service_user(b"\x00\xff") and not sm.remove_service_user(b"\x00\xff")
        with pytest.raises(SmError):
            sm.add_service_user(b"")
        with sm.serve(pki, tick=0.05) as ep:
            common = dict(hrs_refresh=0.2, tick=0.05, retry=0.1)
            with MaAgent("sma", ep, SID, pki, group="closed", instance=1, **common) as sma, \
                    MaAgent("dma", ep, SID, pki, "dma1", instance=2, **common) as dma1, \
                    MaAgent("dma", ep, SID, pki, "dma2", instance=3, **common) as dma2:
                for a in (sma, dma1, dma2):
                    adm = a.start(timeout=30)
                    assert adm.result == SubsResult.ACCEPTED and adm.policy_result == SecReturn.OK
                    assert adm.ks_gen == 1
                with MaAgent("rma", ep, SID, pki, "rma1", instance=10, service_user_id="viewer-1", **common) as rma:
                    adm = rma.start(timeout=30)
                    assert adm.role == "rma" and adm.ks_gen == 0
                    entry = rma.acl_entry
                    st = dma1.wait_for(lambda s: entry in s.acl, 20, "the RMA in the ACL")
                    assert st.acl == (entry,) and dma1.acl_allows(entry)
                    for name, inst, sui, code in (("rma2", 11, None, 0x41), ("rma3", 12, "viewer-9", 0x42)):
                        with MaAgent("rma", ep, SID, pki, name, instance=inst, service_user_id=sui, **common) as r:
                            with pytest.raises(SubscriptionRefused) as ei:
                                r.start(timeout=30)
                            assert ei.value.code == code and f"({code:#04x})" in str(ei.value)

                    st = sm.status()
                    assert st.open_to_rmas and st.policy.group == "closed" and st.ks_gen == 1
                    assert sorted(m.role for m in st.members) == ["DMA", "DMA", "RMA", "SMA"]
                    assert all(m.policy == "ok" for m in st.members) and st.acl == (entry,)
                    assert st.service_user_ids == 1 and st.members[0].address.startswith("127.0.0.1:")

                    r = sm.rekey()
                    assert r.ks_gen == 2 and r.delivered == 3  # SMA and both DMAs on their Ks links
                    for a in (sma, dma1, dma2):
                        a.wait_for(lambda s: s.ks_gen == 2, 10, "the fresh Ks")
                    assert sm.status().ks_mode == "FRESH"

                    t = sm.truncate(certificate=pki / "dma2.pem")
                    assert (t.role, t.ks_gen, t.delivered, t.maid) == ("DMA", 3, 2, dma2.maid)
                    assert dma2.wait_for(lambda s: s.state == "expelled", 10).ks_gen == 0
                    for a in (sma, dma1):
                        a.wait_for(lambda s: s.ks_gen == 3, 10, "the Ks after the truncation")
                    assert "DMA" in [m.role for m in sm.status().members]

                    # content (docs/rmcp2.md): the SMA's source, dma1 linked upstream under the live Ks (gen 3)
                    src = sma.start_source(port=0, tick=0.05)
                    assert dma1.start_tree(port=0, tick=0.05, sma=f"127.0.0.1:{src.port}", upstream={"tick": 0.05})
                    st = src.wait_for_dmas(1, 20)
                    assert st.dmas == (dma1.maid,) and st.kc_gen == 1 and st.port == src.port
                    assert src.send_object(os.urandom(3000)) == 1 and src.stream(b"y" * 100) == 1
                    assert src.status().objects_sent == 1 and src.status().stream_sent == 1
                    ts = dma1.tree_status()
                    assert ts.upstream == "bound" and ts.kc_held == (1,) and ts.content_udp and ts.content_tcp
                    with pytest.raises(AgentError, match="only the SMA"):
                        dma1.start_source(port=0)
                    with pytest.raises(AgentError, match="wants HOST:PORT"):
                        dma1.start_tree(port=0, sma="nowhere")
                    assert dma2.maid not in [m.maid for m in sm.status().members]
                    with pytest.raises(RequestRefused, match="no SMA/DMA with that certificate"):
                        sm.truncate(certificate=pki / "dma2.pem")
                    with pytest.raises(RequestRefused, match="is an RMA"):
                        sm.truncate(rma.maid)
                    assert sm.status().ks_gen == 3  # refused requests changed nothing


def test_async_api_policy_refused_and_not_reachable(pki, tmp_path):
    async def main():
        async with AsyncSessionManager.open(tmp_path / "sm.sqlite", SmSettings(SID, agree_time=0.3), key=KEY) as sm:
            ep = await sm.serve(pki, tick=0.05)
            assert sm.endpoint == ep and ep.tls_port and ep.plain_port
            kw = dict(tick=0.05, retry=0.1)
            async with AsyncMaAgent("sma", ep, SID, pki, content_alg=2, **kw) as sma, \
                    AsyncMaAgent("dma", ep.address, SID, pki, "dma1", plain_port=ep.plain_port, instance=2,
                                 hrs_refresh=0.3, **kw) as dma:
                await asyncio.gather(sma.start(), dma.start())
                with pytest.raises(AgentError, match="only a DMA"):
                    await sma.start_tree(port=0)
                tree_port = await dma.start_tree(port=0)
                assert dma.tree_status().port == tree_port and dma.tree_status().members == ()
                async with AsyncMaAgent("rma", ep, SID, pki, "rma1", instance=10, **kw) as rma:
                    assert (await rma.start()).result == SubsResult.ACCEPTED
                    e = rma.acl_entry
                    await dma.wait_for(lambda st: e in st.acl, 10, "the RMA in the DMA's ACL")
                    assert await _join_tree(tree_port, rma.maid, e.hashed_ktls, dma) == "joined"
                    st = dma.tree_status()
                    assert st.members == (rma.maid,) and st.kg_gen == 1 and st.join_errors == {}
                async with AsyncMaAgent("rma", ep, SID, pki, "rma2", instance=11, **kw) as weak:
                    weak._runner.agent.cfg.en_dec = frozenset({1})  # a board without AES-CTR (the policy's)
                    with pytest.raises(PolicyRefused) as ei:
                        await weak.start()
                    assert ei.value.code == SubsResult.POLICY_REFUSED
                    assert ei.value.sec_return == SecReturn.FAILED_CONFIGURATION
                assert (await sm.rekey()).ks_gen == 2
                await dma.wait_for(lambda s: s.ks_gen == 2, 10)
            port = ep.tls_port
            await sm.stop()
            async with AsyncMaAgent("dma", f"127.0.0.1:{port}", SID, pki, "dma2", **kw) as gone:
                with pytest.raises(AgentError, match="cannot reach the SM"):
                    await gone.start(timeout=10)
    asyncio.run(asyncio.wait_for(main(), 90))


async def _join_tree(port: int, maid: bytes, hashed_ktls: bytes, dma: AsyncMaAgent) -> str:
    """A host RMA's join (tree.JoinClient) on a DMA's tree port, in the agreed suite."""
    from tessera.rmcp2 import codec as C
    from tessera.rmcp2.dmatree import policy_of
    from tessera.rmcp2.server import read_message
    from tessera.rmcp2.tree import JoinClient

    suite = policy_of(dma._runner.agent.policy)[1]
    cli = JoinClient(SID, maid, C.NodeType.RMA, suite, os.urandom, hashed_ktls=hashed_ktls)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(cli.start())
    while cli.state not in ("joined", "refused") and (data := await read_message(r, 20, 1024)) is not None:
        for out in cli.receive(data):
            w.write(out)
    w.close()
    return cli.state


def test_requests_without_a_serving_sm_are_withdrawn(tmp_path):
    with pytest.raises(NoSession):
        SessionManager.open(tmp_path / "none.sqlite", key=KEY)
    assert not (tmp_path / "none.sqlite").exists()
    with SessionManager.open(tmp_path / "sm.sqlite", SmSettings(SID), key=KEY) as sm:
        t0 = time.monotonic()
        with pytest.raises(SmNotServing, match="is `tessera sm serve` running"):
            sm.rekey(timeout=0.3)
        assert time.monotonic() - t0 < 10
        assert sm._store.pending_requests() == []  # withdrawn: a later SM does not act on it
        with pytest.raises(SmError):
            sm.truncate()  # neither MAID nor certificate
        with pytest.raises(SmError, match="another session|holds session"):
            SessionManager.open(tmp_path / "sm.sqlite", SmSettings(SID + 1), key=KEY)
        from tessera.rmcp2.store import MAX_REQUESTS
        for _ in range(MAX_REQUESTS):
            sm._store.add_request("rekey", {}, time.time())
        with pytest.raises(SmError, match="already waiting"):
            sm.rekey(timeout=0.1)  # the bound holds: no unbounded queue in the store


@pytest.mark.slow
def test_cli_rekey_and_truncate_act_on_a_running_sm(pki, tmp_path):
    db = tmp_path / "sm.sqlite"
    env = dict(os.environ, TESSERA_SM_KEY=KEY.hex())
    tessera = [sys.executable, "-m", "tessera", "sm"]

    def cli(*argv, check=True):
        p = subprocess.run([*tessera, *argv, "--db", str(db)], env=env, capture_output=True, text=True, timeout=60)
        if check:
            assert p.returncode == 0, p.stdout + p.stderr
        return p
    tp, pp = _free_port(), _free_port()
    proc = subprocess.Popen([*tessera, "serve", "--db", str(db), "--session-id", f"{SID:x}", "--pki-dir", str(pki),
                             "--tls-port", str(tp), "--plain-port", str(pp), "--agree-time", "0.3"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(proc)

        async def main():
            kw = dict(plain_port=pp, tick=0.05, retry=0.1)
            async with AsyncMaAgent("sma", f"127.0.0.1:{tp}", SID, pki, instance=1, **kw) as sma, \
                    AsyncMaAgent("dma", f"127.0.0.1:{tp}", SID, pki, "dma1", instance=2, **kw) as dma:
                await asyncio.gather(sma.start(), dma.start())
                out = (await asyncio.to_thread(cli, "rekey")).stdout
                assert "fresh Ks: generation 2, sent to 2 connected SMA/DMA(s)" in out, out
                await dma.wait_for(lambda s: s.ks_gen == 2, 10)
                out = (await asyncio.to_thread(cli, "status", "--members")).stdout
                assert "Ks generation 2 (FRESH)" in out and out.count(" policy ok") == 2, out
                maid = re.search(r"DMA \S+ maid ([0-9a-f]{16})", out).group(1)
                bad = await asyncio.to_thread(cli, "truncate", "--maid", "00" * 8, check=False)
                assert bad.returncode == 2 and "no member with MAID" in bad.stderr
                out = (await asyncio.to_thread(cli, "truncate", "--name", "dma1", "--pki-dir", str(pki))).stdout
                assert f"truncated DMA {maid}; fresh Ks generation 3, sent to 1 connected" in out, out
                await dma.wait_for(lambda s: s.state == "expelled", 10)
                await sma.wait_for(lambda s: s.ks_gen == 3, 10)
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_malformed_request_rows_do_not_stop_the_sm(pki, tmp_path):
    """Rows the API would never write (another writer of the store): each is answered
    "failed" and the SM goes on serving; a well-formed request after them is carried out."""
    with SessionManager.open(tmp_path / "sm.sqlite", SmSettings(SID, agree_time=0.3), key=KEY) as sm:
        st = sm._store
        with st._lock:
            st._db.execute("INSERT INTO requests (op, arg, state, created) VALUES ('rekey', 'not json', 'pending', 0)")
        bad = [st.add_request("truncate", {"maid": "zz"}, time.time()), st.add_request("truncate", {}, time.time()),
               st.add_request("explode", {}, time.time())]
        with st._lock:
            st._db.execute("INSERT INTO requests (op, arg, state, created) VALUES ('rekey', '[1]', 'pending', 0)")
        with sm.serve(pki, tick=0.05):
            assert sm.rekey(timeout=10).ks_gen == 2  # answered after every bad row before it
            for rid in bad:
                state, res = st.request(rid)
                assert state == "failed" and res["error"], (rid, state, res)
            assert st.pending_requests() == []
