"""The board RMA control plane (firmware/tessera_fw/rmcp2/rma.py): its sans-IO engine against
the SM engine (under CPython through mpshim), and the real MicroPython interpreter with the
socket adapter over mutual TLS against `tessera sm serve` on loopback."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera import mpshim
from tessera.paths import firmware_dir
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import sm as S

from .test_keys_acl import Net
from .test_net import SID as NET_SID
from .test_net import _free_port, _serve, _wait_listening, pki, runner, until  # noqa: F401 (fixture)
from .test_sm import SID, Rand, new_sm

mpshim.install()
from tessera_fw.rmcp2 import rma as R  # noqa: E402

N = C.NodeType
HEAP = 112 * 1024  # the ESP32 board heap of the firmware test harness (tests/mpy_plugin.py)


def policy_session(gp=C.GpAttribute.OPEN, content=C.EnDecId.AES_CTR_128):
    sm = new_sm()
    net = Net(sm)
    net.add("sma", N.SMA, 1).cfg.propose = C.SmaPropose(gp, C.GkMecha.PERIODIC, content)
    net.add("dma0", N.DMA, 10)
    net.admit("sma", 1.0)
    net.admit("dma0", 1.0)
    net.tick(10.0)
    sm.open_session()
    sm.register_service_user_id(b"viewer-1")
    return sm


def drive(sm: S.SessionManager, rma: R.Rma, conn: str, now: float = 20.0) -> list:
    """Carry messages between the SM engine and the firmware RMA engine until it settles."""
    sm.connect(conn, now, cert_der=rma.cert_der)
    sent = []
    todo = [bytes(rma.start())]
    while todo:
        data = todo.pop(0)
        sent.append(C.decode(data).type if data[20] not in (0x81,) else P.peek(data)[1].ref)
        for a in sm.receive(conn, data, now):
            if isinstance(a, S.Send):
                out = rma.receive(a.data)
                if out is not None:
                    todo.append(bytes(out))
    return sent


def fw_rma(n: int, **kw) -> R.Rma:
    return R.Rma(SID.to_bytes(8, "big"), C.make_maid("127.0.0.1", 45000 + n, n), b"board cert %d" % n,
                 Rand(f"rma{n}"), **kw)


def test_board_rma_subscribes_agrees_and_enters_the_acl():
    sm = policy_session()
    rma = fw_rma(1)
    drive(sm, rma, "b1")
    assert R.STATE_NAMES[rma.state] == "ready" and rma.result == 0x01 and rma.sec_return == 0x01
    assert (rma.enc, rma.mac) == (int(sm.policy.gk_en_dec), int(sm.policy.auth))
    assert sm.acl == {P.hashed_maid(SID, rma.maid): rma.hashed_ktls()}
    assert sum(rma.errors) == 0
    before = sum(sm.errors.values())
    for _ in range(3):  # HB keeps the link: authenticated, in the agreed suite, no error counted
        assert sm.receive("b1", bytes(rma.hb()), 21.0) == []
    assert sum(sm.errors.values()) == before and "b1" in sm.links


def test_board_rma_in_a_closed_group():
    sm = policy_session(gp=C.GpAttribute.CLOSED)
    none, wrong, good = fw_rma(2), fw_rma(3, sui=b"viewer-9"), fw_rma(4, sui=b"viewer-1")
    for i, r in enumerate((none, wrong, good)):
        drive(sm, r, f"c{i}")
    assert (R.STATE_NAMES[none.state], none.result) == ("refused", 0x41)
    assert (R.STATE_NAMES[wrong.state], wrong.result) == ("refused", 0x42)
    assert R.STATE_NAMES[good.state] == "ready" and len(sm.acl) == 1


def test_board_rma_refuses_a_policy_it_cannot_run_with_a_clear_result():
    sm = policy_session(content=C.EnDecId.AES_CTR_128)
    rma = fw_rma(5, en_dec=(1,))  # a board without AES-CTR
    drive(sm, rma, "r5")
    assert R.STATE_NAMES[rma.state] == "failed" and rma.sec_return == 0x04  # FAILED CONFIGURATION
    assert rma.missing == 1 and rma.policy[2] == C.EnDecId.AES_CTR_128
    assert rma.maid not in sm.members and sm.acl == {}
    assert sm.errors["policy refused: SEC_RETURN FAILED_CONFIGURATION"] == 1


def test_board_rma_counts_tampered_and_replayed_input():
    sm = policy_session()
    rma = fw_rma(6)
    sm.connect("t", 20.0, cert_der=rma.cert_der)
    out = [a for a in sm.receive("t", bytes(rma.start()), 20.0) if isinstance(a, S.Send)]
    subsreq = bytes(rma.receive(out[0].data))
    ans = [a for a in sm.receive("t", subsreq, 20.0) if isinstance(a, S.Send)][0].data
    bad = bytearray(ans)
    bad[-1] ^= 1
    assert rma.receive(bytes(bad)) is None and rma.errors[16] == 1  # MAC
    assert rma.receive(ans) is not None  # the genuine SUBSANS: SECAGREQ
    assert rma.receive(ans) is None and rma.errors[17] == 1  # REPLAY
    assert rma.receive(b"\x00" * 7) is None and rma.errors[1] == 1  # TRUNCATED


MP_SCRIPT = textwrap.dedent('''
    import gc, sys, os
    gc.collect()
    h0 = gc.mem_alloc()
    from tessera_fw.rmcp2.rma import Rma, STATE_NAMES
    from tessera_fw.rmcp2 import rma_net
    gc.collect()
    h1 = gc.mem_alloc()
    d, port, sid, name, n, sui = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
    def rd(p):
        with open(d + "/" + p, "rb") as f:
            return f.read()
    cert = rd(name + ".der")
    maid = bytes([127, 0, 0, 1, 0xB0, n, 0, n])
    r = Rma(sid, maid, cert, os.urandom, sui=sui.encode() if sui else None)
    gc.collect()
    h2 = gc.mem_alloc()
    link = rma_net.admit(r, "127.0.0.1", port, cert, rd(name + ".key.der"), rd("ca.der"))
    gc.collect()
    print(STATE_NAMES[r.state], r.result, r.sec_return, link.handshake_ms, r.hashed_ktls().hex(), maid.hex(),
          h1 - h0, h2 - h1, gc.mem_alloc() - h2)
    link.close()
''')


def _der_files(pki_dir: Path, names: list[str]) -> None:
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    (pki_dir / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    for n in names:
        c = x509.load_pem_x509_certificate((pki_dir / f"{n}.pem").read_bytes())
        (pki_dir / f"{n}.der").write_bytes(c.public_bytes(serialization.Encoding.DER))
        k = serialization.load_pem_private_key((pki_dir / f"{n}.key").read_bytes(), None)
        path = pki_dir / f"{n}.key.der"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()))


@pytest.mark.slow
def test_board_rma_in_micropython_against_the_real_sm_over_tls(pki, tmp_path):
    mp = shutil.which("micropython", path=str(Path(os.sys.executable).parent))
    assert mp, "the venv's micropython interpreter"
    pki_dir, rogue = pki
    _der_files(pki_dir, ["rma1", "rma2"])
    _der_files(rogue, ["rma0"])
    tp, pp = _free_port(), _free_port()
    db = tmp_path / "sm.sqlite"
    proc = _serve(db, pki_dir, tp, pp)
    env = dict(os.environ, MICROPYPATH=str(firmware_dir()))
    sid = NET_SID.to_bytes(8, "big").hex()
    try:
        _wait_listening(proc)

        async def setup():  # an SMA proposing a closed group, one DMA: the policy gets set
            sma = runner(pki_dir, "sma", N.SMA, 1, tp, pp, gp=C.GpAttribute.CLOSED)
            dma = runner(pki_dir, "dma0", N.DMA, 10, tp, pp)
            tasks = [asyncio.create_task(r.run()) for r in (sma, dma)]
            await until(lambda: sma.agent.state == dma.agent.state == "ready", what="SMA/DMA ready")
            return sma, dma, tasks

        async def main():
            sma, dma, tasks = await setup()
            subprocess.run([sys_exe(), "-m", "tessera", "sm", "service-user", "add", "--db", str(db), "viewer-1"],
                           check=True, env=dict(os.environ, TESSERA_SM_KEY=bytes(range(32)).hex()))
            await asyncio.sleep(1.0)  # the SM reads identifiers every tick (0.5 s)

            def board(name, n, sui="", d=pki_dir):
                return subprocess.run([mp, "-X", f"heapsize={HEAP}", "-c", MP_SCRIPT, str(d), str(tp), sid, name, str(n), sui], env=env,
                                      capture_output=True, text=True, timeout=60)
            good = await asyncio.to_thread(board, "rma1", 1, "viewer-1")
            assert good.returncode == 0, good.stderr
            state, result, ret, hs_ms, hk, maid, h_imp, h_rma, h_tls = good.stdout.split()
            print(f"board RMA over TLS: handshake {hs_ms} ms; heap: imports {h_imp} B, Rma() {h_rma} B, "
                  f"TLS link open and admitted {h_tls} B more")
            assert (state, result, ret) == ("ready", "1", "1")
            missing = await asyncio.to_thread(board, "rma2", 2)
            assert missing.stdout.split()[:2] == ["refused", str(0x41)], missing.stderr
            stranger = await asyncio.to_thread(board, "rma0", 3, "viewer-1", rogue)  # certificate of another CA
            assert stranger.returncode != 0 and "ready" not in stranger.stdout
            entry = P.hashed_maid(NET_SID, bytes.fromhex(maid)) + bytes.fromhex(hk)
            await until(lambda: entry in dma.agent.acl, what="the board RMA in the DMA's ACL")
            for r in (sma, dma):
                r.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            return int(hs_ms)
        hs = asyncio.run(asyncio.wait_for(main(), 120))
        assert hs >= 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def sys_exe() -> str:
    return os.sys.executable


_ = time
