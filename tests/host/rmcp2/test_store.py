"""SQLite store of the session manager (store.py): everything acknowledged comes back after a
restart, key material is sealed at rest, files are 0600, a kill -9 loses nothing."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import sm as S
from tessera.rmcp2 import store as ST

from .test_keys_acl import Net, dmas
from .test_sm import SID, Rand

N, M = C.NodeType, C.MsgType


def cfg(**kw) -> S.SmConfig:
    return S.SmConfig(SID, C.make_maid("127.0.0.1", 26030, 1), **kw)


def stored_session(tmp_path, gp=C.GpAttribute.CLOSED):
    store = ST.SmStore(tmp_path / "sm.sqlite", key=bytes(range(32)))
    sm = ST.open_engine(store, cfg(ks_period=100), now=0.0, rand=Rand("sm"))
    net = Net(sm)
    net.add("sma", N.SMA, 1).cfg.propose = C.SmaPropose(gp, C.GkMecha.PERIODIC, C.EnDecId.AES_CTR_128)
    for i in range(2):
        net.add(f"dma{i}", N.DMA, 10 + i)
    for name in ("sma", "dma0", "dma1"):
        net.admit(name, 1.0)
    net.tick(10.0)
    sm.open_session()
    sm.register_service_user_id(b"user-1")
    net.add("rma0", N.RMA, 100, service_user_id=b"user-1")
    net.admit("rma0", 11.0)
    return store, sm, net


def snapshot(sm: S.SessionManager):
    return (sm.ks.gen, sm._ks_raw, sm.ks_mode, sm.policy, sm.open_to_rmas, sm.service_user_ids, dict(sm.acl),
            {k: (m.nt, m.policy, m.suite, m.hashed_ktls, m.ktls._raw, m.cert_sha256) for k, m in sm.members.items()})


def test_restart_brings_back_sessions_members_ids_acl_and_ks(tmp_path):
    store, sm, net = stored_session(tmp_path)
    net.tick(101.0)  # a hash step: generation 2 with generation 1 in its grace
    assert sm.ks.gen == 2 and len(sm.acl) == 1
    before = snapshot(sm)
    d0 = dmas(net)[0]
    seen = d0._seal(d0._msg(M.HRSREQ), d0.ks)
    assert len(sm.receive(net.conn["dma0"], seen, 102.0)) == 1
    tx_before = sm.members[d0.cfg.maid].tx_seq
    store.close()
    store2 = ST.SmStore(tmp_path / "sm.sqlite", key=bytes(range(32)))
    sm2 = ST.open_engine(store2, now=103.0)
    assert snapshot(sm2) == before
    assert sm2.ks_prev is not None and sm2.ks_prev.gen == 1 and sm2.ks_prev_until == 131.0
    # an MA's message accepted before the restart is a replay after it
    sm2.connect("c", 103.0, tls=False)
    assert isinstance(sm2.receive("c", seen, 103.0)[0], S.Close) and sm2.errors["REPLAY"] == 1
    # the SM never repeats a Seq under a key the receivers still hold
    assert sm2.members[d0.cfg.maid].tx_seq > tx_before
    # the DMA reconnects: HB under its K_TLS binds the link and brings the current Ks; ACL served
    net.sm = sm2
    net.conn.clear()
    net.reconnect_plain("dma0", 104.0)
    assert d0.ks_gen == 2 and d0.errors == {}
    net.to_sm("dma0", [d0._seal(d0._msg(M.HRSREQ), d0.ks)], 104.0)
    assert len(d0.acl) == 1 and d0.errors == {}


def test_service_user_ids_and_re_subscription_after_restart(tmp_path):
    store, sm, net = stored_session(tmp_path)
    store.add_service_user_id(b"user-2")  # the CP's CLI writes the store
    assert store.remove_service_user_id(b"user-1") and not store.remove_service_user_id(b"nobody")
    store.close()
    store2 = ST.SmStore(tmp_path / "sm.sqlite", key=bytes(range(32)))
    sm2 = ST.open_engine(store2, now=20.0)
    assert sm2.service_user_ids == {b"user-2"}
    net.sm = sm2
    net.conn.clear()
    # the RMA lost its TLS link with the restart; with the same certificate it subscribes again
    old_hk = sm2.members[net.agents["rma0"].cfg.maid].hashed_ktls
    rma = net.agents["rma0"]
    rma.cfg.service_user_id = b"user-2"
    rma.state = "new"
    net.admit("rma0", 21.0)
    assert rma.result == C.Result.ACCEPTED and rma.state == "ready"
    assert sm2.acl[P.hashed_maid(SID, rma.cfg.maid)] == rma.hashed_ktls != old_hk
    # another certificate claiming that MAID is refused
    thief = net.add("thief", N.RMA, 100, service_user_id=b"user-2")
    thief.cfg.cert_der = b"another certificate"
    net.admit("thief", 22.0)
    assert thief.state == "ktls" and sm2.errors["MAID in use"] == 1
    store2.close()
    sm3 = ST.open_engine(ST.SmStore(tmp_path / "sm.sqlite", key=bytes(range(32))), now=30.0)
    assert sm3.acl == sm2.acl and len(sm3.acl) == 1


def test_keys_sealed_at_rest_files_0600_and_wrong_storage_key_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ST.ENV_KEY, raising=False)
    db = tmp_path / "sm.sqlite"
    store = ST.SmStore(db)
    sm = ST.open_engine(store, cfg(), now=0.0)
    net = Net(sm)
    net.add("sma", N.SMA, 1)
    net.admit("sma", 1.0)
    store.close()
    for p in (db, tmp_path / "sm.sqlite.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert sm._ks_raw not in raw and sm.members[net.agents["sma"].cfg.maid].ktls._raw not in raw
    with pytest.raises(ST.StoreError, match="wrong SM storage key"):
        ST.SmStore(db, key=bytes(32))
    os.chmod(tmp_path / "sm.sqlite.key", 0o644)
    with pytest.raises(ST.StoreError, match="chmod 600"):
        ST.SmStore(db)
    with pytest.raises(ST.StoreError, match="holds no session"):
        ST.open_engine(ST.SmStore(tmp_path / "other.sqlite", key=bytes(32)))


CHILD = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from tessera.rmcp2 import codec as C, sm as S, store as ST
    from tessera.rmcp2.agent import Agent, AgentConfig
    SID = 0x5E5510000000000A
    store = ST.SmStore(sys.argv[1], key=bytes(range(32)))
    sm = ST.open_engine(store, S.SmConfig(SID, C.make_maid("127.0.0.1", 26030, 1)), now=0.0)
    for i in range(1, 10000):
        a = Agent(AgentConfig(C.NodeType.DMA, SID, C.make_maid("127.0.0.1", 20000 + i, i), b"c%d" % i))
        sm.connect(i, 1.0, cert_der=a.cfg.cert_der)
        out = sm.receive(i, a.start(1.0)[0], 1.0)
        out = sm.receive(i, a.receive(out[0].data, 1.0)[0], 1.0)
        a.receive(out[0].data, 1.0)  # SUBSANS: what the MA was told
        if a.result == C.Result.ACCEPTED:
            print(a.cfg.maid.hex(), flush=True)
''')


def test_kill_9_loses_no_acknowledged_member(tmp_path):
    db = tmp_path / "sm.sqlite"
    here = os.path.dirname(S.__file__).rsplit("/tessera/", 1)[0]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), here], stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for _ in range(25):
            acked.append(bytes.fromhex(child.stdout.readline().strip()))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        rest = child.stdout.read().split()
    acked += [bytes.fromhex(x) for x in rest]  # printed before the kill, read after it
    sm = ST.open_engine(ST.SmStore(db, key=bytes(range(32))), now=2.0)
    missing = [m for m in acked if m not in sm.members]
    assert len(acked) >= 25 and not missing


def test_service_user_cli_add_list_remove(tmp_path, capsys, monkeypatch):
    from tessera.cli import main
    monkeypatch.setenv(ST.ENV_KEY, bytes(range(32)).hex())
    db = str(tmp_path / "sm.sqlite")
    assert main(["sm", "service-user", "list", "--db", db]) == 2  # no database: a clear error, none created
    assert not (tmp_path / "sm.sqlite").exists()
    assert main(["sm", "service-user", "add", "--db", db, "viewer-1"]) == 0
    assert main(["sm", "service-user", "add", "--db", db, "--hex", "00ff"]) == 0
    assert main(["sm", "service-user", "add", "--db", db, "--hex", "zz"]) == 2
    capsys.readouterr()
    assert main(["sm", "service-user", "list", "--db", db]) == 0
    assert capsys.readouterr().out.split() == ["hex:00ff", "viewer-1"]
    assert main(["sm", "service-user", "remove", "--db", db, "viewer-1"]) == 0
    assert main(["sm", "service-user", "remove", "--db", db, "viewer-1"]) == 2
    assert ST.SmStore(db).service_user_ids() == {b"\x00\xff"}
