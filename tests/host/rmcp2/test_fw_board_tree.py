"""The board RMA's tree client (firmware/tessera_fw/rmcp2/board_tree.py) in the real unix-port
micropython with the ESP32 profile's heap (112 KB), from the .mpy files a virtual board is
deployed with: admitted by the SM server over mutual TLS, then joined to a DMA over loopback
TCP (PPROBREQ, Annex E, K_MAS, Kg) and kept on that link as its control link (profile B.15):
Kc and a BACKWARD Kg re-key reach it, HB both ways, the link killed -> a fresh join, a clean
stop -> LEAVREQ under K_MAS; a board not in the DMA's ACL is refused and backs off.

The DMA side is mostly test glue (`TreeDma`) assembled from the product engines
tree.JoinEngine and groupkey.GroupKeyManager with the DMA agent's live ACL (HRSANS from the
SM), which lets the tests cut links, expel and forge at will; the last test runs the board
against the product DMA side, dmatree (what `tessera dma` starts)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tessera import mpshim
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2 import tree as T
from tessera.rmcp2.groupkey import Delivery, GroupKeyManager
from tessera.rmcp2.server import read_message

from .test_fw_rma_board import Lines, board_fs, counters, mpy_dir, start_board  # noqa: F401 (fixture)
from .test_net import SID, Session, pki, until  # noqa: F401 (fixture)

mpshim.install()
from tessera_fw.rmcp2 import keys as K  # noqa: E402
from tessera_fw.rmcp2 import rma_cfg  # noqa: E402

N, M = C.NodeType, C.MsgType
HEAP = 112 * 1024  # the ESP32 profile's heap: SM link + join + keys do not fit its first 56 KB (docs/rmcp2.md)
HB = 0.4  # T_HB of both ends in these tests (B.10: 30 s)
BOARD_MAID = bytes([127, 0, 0, 1, 0xB1, 1, 0, 1])  # board_fs's default
DMA_MAID = C.make_maid("127.0.0.1", 26032, 0x0D01)


class TreeDma:
    """Test-only DMA end of the control link, per the contract of profile B.15 (as the DMA's
    tree service on the p2-wire-dma branch does it): JoinEngine for the join, then on the same
    link KEYDELIVER from the GroupKeyManager, HB every `hb`, LEAVREQ from the RMA answered
    LEAVANS, all under the member's K_MAS naming it; a link closed (or 3 T_HB without an
    authentic message) is a leave (member_left: BACKWARD re-key of the others)."""

    def __init__(self, acl_lookup, suite: P.Suite, mecha=C.GkMecha.BACKWARD, hb: float = HB,
                 drop_members: bool = False) -> None:
        self.suite, self.hb, self.drop_members = suite, hb, drop_members
        self.gk = GroupKeyManager(SID, DMA_MAID, mecha, suite, os.urandom, time.monotonic())
        self.eng = T.JoinEngine(SID, DMA_MAID, acl_lookup=acl_lookup, kg_source=self.gk.current, suite=suite,
                                rand=os.urandom)
        self.writers: dict[bytes, asyncio.StreamWriter] = {}  # member MAID -> its control link
        self.kmas: dict[bytes, list[bytes]] = {}  # every K_MAS each member joined with
        self.hb_in: Counter = Counter()
        self.leavreqs: list[tuple[bytes, int]] = []
        self.leavans: list[tuple[bytes, int]] = []
        self.left: list[bytes] = []
        self._all: set[asyncio.StreamWriter] = set()
        self._ids = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        self.kill()
        await self.server.wait_closed()

    def kill(self) -> None:
        """Every link cut at once, as a DMA process killed (RST, no LEAVREQ)."""
        for w in list(self._all):
            w.transport.abort()

    def send(self, d: Delivery) -> None:
        for w in (self.writers.values() if d.maid is None else [self.writers[d.maid]]):
            w.write(d.data)

    def send_kc(self, gen: int, key: bytes) -> None:
        """A Kc as the SMA's KEYDELIVER re-sealed under the current Kg (B.16, KcRelay's form)."""
        kd = C.KeyData(gen, C.KeyMode.FRESH, 0, key).encode()
        plain = C.Message(M.KEYDELIVER, N.SMA, SID, DMA_MAID, (C.KeyInfo(C.KeyType.KC, kd),)).encode()
        self.send(self.gk.seal_group(plain))

    def expel(self, maid: bytes) -> None:
        """LEAVREQ EXPELLED under the member's K_MAS, naming it (B.15 control link)."""
        req = C.Message(M.LEAVREQ, N.DMA, SID, maid, (C.ResultCtl(C.Result.EXPELLED),)).encode()
        self.writers[maid].write(self._kmas_seal(maid, req))

    def _kmas_seal(self, maid: bytes, plain: bytes) -> bytes:
        m = self.gk._members[maid]  # one Seq counter per K_MAS for all the DMA's messages under it (B.7)
        m.seq += 1
        return P.seal(plain, m.kmas, self.suite, m.seq, os.urandom(16))

    async def _hb(self, w: asyncio.StreamWriter, maid: bytes) -> None:
        while True:
            await asyncio.sleep(self.hb)
            w.write(self._kmas_seal(maid, C.Message(M.HB, N.DMA, SID, maid, ()).encode()))

    async def _serve(self, reader, writer) -> None:
        self._ids += 1
        conn, member, hb_task, window = ("tree", self._ids), None, None, P.ReplayWindow()
        self._all.add(writer)
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await read_message(reader, 3 * self.hb if member else 30.0, T.MAX_MESSAGE)
                if data is None:
                    break  # closed, or 3 T_HB without a message: the member is gone
                if member is None:
                    for out in self.eng.receive(conn, data, loop.time()):
                        writer.write(out)
                    m = next((m for m in self.eng.members().values() if m.conn == conn), None)
                    if m is not None:  # joined: RELANS (Kg under K_MAS) is written; the link stays
                        member = m.maid
                        for d in self.gk.member_joined(member, m.kmas, loop.time()):
                            self.send(d)
                        self.gk._members[member].seq = 1  # RELANS used Seq 1 under this K_MAS
                        self.writers[member] = writer
                        self.kmas.setdefault(member, []).append(m.kmas)
                        hb_task = asyncio.create_task(self._hb(writer, member))
                    await writer.drain()
                    if member is not None and self.drop_members:
                        break  # a DMA that takes members and drops them at once
                    continue
                kmas = self.gk._members[member].kmas
                msg = P.unseal_decode(data, self.suite, lambda m, s: kmas if s.ref == P.KeyRef.KMAS and m == member
                                      else None, lambda m, k: window)
                assert msg.nt == N.RMA and msg.maid == member
                if msg.type == M.HB:
                    self.hb_in[member] += 1
                elif msg.type == M.LEAVANS:  # the answer to expel()
                    self.leavans.append((member, msg.get(C.ResultCtl).value))
                elif msg.type == M.LEAVREQ:
                    self.leavreqs.append((member, msg.get(C.ResultCtl).value))
                    ans = C.Message(M.LEAVANS, N.DMA, SID, member, (C.ResultCtl(C.Result.LEAVE_NORMAL),)).encode()
                    writer.write(self._kmas_seal(member, ans))
                    await writer.drain()
                    break
        except (ConnectionError, OSError, C.Rmcp2Error):
            pass
        finally:
            if hb_task is not None:
                hb_task.cancel()
            self._all.discard(writer)
            self.eng.drop(conn)
            if member is not None and self.writers.get(member) is writer:
                del self.writers[member]
                self.eng.remove(member)
                self.left.append(member)
                for d in self.gk.member_left(member, loop.time()):
                    try:
                        self.send(d)
                    except KeyError:
                        pass
            writer.close()


async def host_member(port: int, maid: bytes, w: bytes, suite: P.Suite):
    """A host RMA joined to the DMA, its link left open (closing it is its leave)."""
    cli = T.JoinClient(SID, maid, N.RMA, suite, os.urandom, hashed_ktls=w)
    r, wr = await asyncio.open_connection("127.0.0.1", port)
    wr.write(cli.start())
    while cli.state not in ("joined", "refused"):
        data = await read_message(r, 20.0, T.MAX_MESSAGE)
        assert data is not None, cli.state
        for out in cli.receive(data):
            wr.write(out)
    assert cli.state == "joined"
    return wr


def tree_fs(tmp_path, pki_dir, sm_port: int, dma_port: int, name: str = "rma1", **cfg):
    return board_fs(tmp_path, pki_dir, sm_port, name, hb_s=HB, dma=["127.0.0.1", dma_port], dma_maid=DMA_MAID.hex(),
                    **cfg)


async def board_and_dma(s: Session, tmp_path, pki_dir, mpy: Path, acl_lookup, links: int, heap: int = HEAP,
                        drop_members: bool = False, **cfg) -> tuple[TreeDma, Lines]:
    """A TreeDma started with `acl_lookup` and a board (.mpy, `heap`) configured to join it."""
    dma = TreeDma(acl_lookup, s.dmas()[0]._suite, drop_members=drop_members)
    await dma.start()
    fs = tree_fs(tmp_path, pki_dir, s.server.tls_port, dma.port, **cfg)
    return dma, Lines(await start_board(fs, mpy, links, heap))


def dma_agent_lookup(s: Session, extra: dict):
    agent = s.dmas()[0]
    live = T.agent_acl_lookup(agent)
    return agent, lambda h: extra.get(bytes(h)) or live(h)


@pytest.mark.slow
def test_board_joins_its_dma_keeps_the_control_link_and_rejoins(pki, tmp_path, mpy_dir, capsys):
    pki_dir = pki[0]
    other = C.make_maid("127.0.0.2", 46001, 1)
    other_w = os.urandom(16)

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            agent, lookup = dma_agent_lookup(s, {P.hashed_maid(SID, other): other_w})
            dma = TreeDma(lookup, agent._suite)
            await dma.start()
            con = Lines(await start_board(tree_fs(tmp_path, pki_dir, s.server.tls_port, dma.port), mpy_dir, 3, HEAP))
            sm = s.server.sm
            try:
                await until(lambda: con.count("joined DMA") == 1 or con.proc.returncode is not None, timeout=30,
                            what=lambda: "\n".join(con.lines))
                assert con.count("ready") == 1 and con.count("joined DMA") == 1, "\n".join(con.lines)
                join_line = next(ln for ln in con.lines if "joined DMA" in ln)
                assert f"(Kg gen {dma.gk.current()[0]})" in join_line
                assert BOARD_MAID in dma.eng.members() and BOARD_MAID in dma.writers
                # 10.1.1.1: the TLS session to the SM ends once the board authenticated to its
                # DMA; the SM keeps the member and its ACL entry
                await until(lambda: not any(ln.member and ln.member.maid == BOARD_MAID for ln in sm.links.values()),
                            what="the board's SM link closed after the join")
                assert BOARD_MAID in sm.members and P.hashed_maid(SID, BOARD_MAID) in sm.acl

                # a Kc under Kg, then another member leaves: BACKWARD sends a fresh Kg under K_MAS
                other_link = await host_member(dma.port, other, other_w, agent._suite)
                await until(lambda: other in dma.writers, what="the host member")
                dma.send_kc(7, os.urandom(16))
                await until(lambda: con.count("Kc gen 7") == 1, what=lambda: "\n".join(con.lines))
                gen0 = dma.gk.current()[0]
                other_link.close()
                await until(lambda: other in dma.left, what="the host member's leave")
                assert dma.gk.current()[0] == gen0 + 1 and dma.gk.rotations["backward"] == 1
                await until(lambda: con.count(f"Kg gen {gen0 + 1} from the DMA") == 1,
                            what=lambda: "\n".join(con.lines))
                await asyncio.sleep(3 * HB)  # HBs both ways keep the link past 3 T_HB
                assert dma.hb_in[BOARD_MAID] >= 2 and con.count("DMA link lost") == 0, "\n".join(con.lines)
                # forged messages on the control link (a valid header, 40-80 random bytes under a
                # made-up key, and a Kg delivery under K_MAS with its Tag flipped): counted, ignored
                w = dma.writers[BOARD_MAID]
                hdr = C.Message(M.HB, N.DMA, SID, BOARD_MAID, ()).encode()
                for n in (40, 60, 80):
                    w.write(bytes([hdr[0], M.KEYDELIVER]) + (20 + n).to_bytes(2, "big") + hdr[4:] + os.urandom(n))
                real = dma.gk.resync(BOARD_MAID).data
                w.write(real[:-1] + bytes([real[-1] ^ 1]))
                await asyncio.sleep(4 * HB)  # the HBs that follow still count the DMA alive
                assert con.count("DMA link lost") == 0 and con.count(f"Kg gen {gen0 + 1} from") == 1

                # the DMA's links are cut: the board joins again with a fresh Annex E
                dma.kill()
                await until(lambda: con.count("joined DMA") == 2 or con.proc.returncode is not None, timeout=20,
                            what=lambda: "\n".join(con.lines))
                assert con.count("DMA link lost") == 1 and con.count("joined DMA") == 2, "\n".join(con.lines)
                await until(lambda: BOARD_MAID in dma.writers, what="the re-joined board")
                assert len(dma.kmas[BOARD_MAID]) == 2 and dma.kmas[BOARD_MAID][0] != dma.kmas[BOARD_MAID][1]
                assert con.count("ready") == 1  # re-joined without a new admission

                # the DMA ends the membership (LEAVREQ EXPELLED): answered LEAVANS, then the
                # board waits the longest backoff and is admitted and joined again
                dma.expel(BOARD_MAID)
                await until(lambda: dma.leavans, what="LEAVANS at the DMA")
                assert dma.leavans == [(BOARD_MAID, C.Result.ACCEPTED)]
                await until(lambda: con.count("joined DMA") == 3 or con.proc.returncode is not None, timeout=20,
                            what=lambda: "\n".join(con.lines))
                assert con.count("ended the membership (LEAVREQ 0x21)") == 1 and con.count("ready") == 2
                await until(lambda: BOARD_MAID in dma.writers, what="the board back after the expulsion")
                await asyncio.sleep(HB)

                # a clean stop: LEAVREQ (LEAVE_NORMAL) under the new K_MAS, answered LEAVANS
                con.proc.send_signal(signal.SIGINT)
                await asyncio.wait_for(con.proc.wait(), 10)
                await until(lambda: dma.leavreqs, what="LEAVREQ at the DMA")
                assert dma.leavreqs == [(BOARD_MAID, C.Result.LEAVE_NORMAL)]
                await until(lambda: BOARD_MAID not in dma.eng.members(), what="the board removed")
            finally:
                err = await con.stop()
                await dma.close()
            assert "Traceback" not in err, err
            assert con.count("LEAVANS received") == 1, "\n".join(con.lines)
            c = counters(next(ln for ln in reversed(con.lines) if "|" in ln))
            assert (c["links"], c["admitted"], c["joined"], c["dma_drops"]) == (2, 2, 3, 1), "\n".join(con.lines)
            assert c["kg"] == 1 and c["kc"] == 1 and c["left"] == 1 and c["expelled"] == 1, "\n".join(con.lines)
            assert c["errors"] == 4, "\n".join(con.lines)  # the four forged messages, nothing else
            # a join right after an admission may come before the DMA's next HRSANS brought the
            # board's ACL entry (NOT_IN_ACL, retried after the backoff)
            assert c["joins"] == 3 + c["join_refused"] and c["join_refused"] <= 4 and c["join_errors"] == 0, \
                "\n".join(con.lines)
            assert c["dma_hb_sent"] >= 2 and c["dma_hb_in"] >= 2
            with capsys.disabled():
                print("\n".join(con.lines))
                print(f"\nboard tree client at -X heapsize={HEAP // 1024}K (.mpy): heap in use when joined with the SM "
                      f"link still open {counters(join_line)['heap']} B; after the re-join (SM link closed) "
                      f"{counters(next(ln for ln in reversed(con.lines) if 'joined DMA' in ln))['heap']} B")

    asyncio.run(asyncio.wait_for(main(), 90))


@pytest.mark.slow
def test_board_not_in_the_dma_acl_is_refused_and_backs_off(pki, tmp_path, mpy_dir):
    """A fixed, empty ACL at the DMA: every join refused NOT_IN_ACL at the probe, with the
    growing backoff, the SM link held meanwhile (10.1.1.1); after 6 refusals the board
    admits again at the SM."""
    pki_dir = pki[0]

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            dma, con = await board_and_dma(s, tmp_path, pki_dir, mpy_dir, lambda h: None, 2, backoff_s=[0.1, 0.4])
            try:
                await until(lambda: con.count("join refused") >= 2, timeout=30, what=lambda: "\n".join(con.lines))
                # still admitted at the SM while it retries the join
                assert any(ln.member and ln.member.maid == BOARD_MAID for ln in s.server.sm.links.values())
                t0 = time.monotonic()
                await asyncio.wait_for(con.proc.wait(), 30)
                spent = time.monotonic() - t0
            finally:
                await con.stop()
                await dma.close()
            c = counters(con.last())
            assert (c["links"], c["admitted"], c["joins"], c["join_refused"], c["joined"]) == (2, 2, 12, 12, 0), con.lines
            assert con.count("join refused by DMA") == 12 and con.count("(reason 2)") == 12, "\n".join(con.lines)
            assert dma.eng.errors["NOT_IN_ACL"] == 12 and not dma.eng.members()
            # waits after refusals 0.1 0.2 0.4 0.4 0.4 per admission (each at least half): from
            # the second refusal on at least 0.7 s
            assert spent >= 0.7, spent

    asyncio.run(asyncio.wait_for(main(), 90))


def test_rmcp2_json_dma_keys_are_validated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"sm_host": "10.0.0.2", "session_id": "0123456789abcdef", "maid": "0a0000020ab20001"}
    (tmp_path / "rmcp2.json").write_text(json.dumps(good))
    assert rma_cfg.load()["dma"] is None
    (tmp_path / "rmcp2.json").write_text(json.dumps({**good, "dma": ["10.0.0.3", 26032], "dma_maid": DMA_MAID.hex()}))
    cfg = rma_cfg.load()
    assert cfg["dma"] == ("10.0.0.3", 26032) and cfg["dma_maid"] == DMA_MAID
    assert cfg["dmas"] == (("10.0.0.3", 26032, DMA_MAID),) and cfg["content"] == (0, 0)
    for bad, word in (({"dma": ["10.0.0.3"]}, "dma"), ({"dma": ["", 1]}, "dma"), ({"dma": ["h", 0]}, "dma"),
                      ({"dma": "10.0.0.3:26032"}, "dma"), ({"dma": ["h", 1]}, "dma_maid"),
                      ({"dma": ["h", 1], "dma_maid": "0d01"}, "dma_maid")):
        (tmp_path / "rmcp2.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(ValueError, match=word):
            rma_cfg.load()


class _Ring:
    def __init__(self):
        self.got = []

    def install(self, gen, key16):
        self.got.append((gen, bytes(key16)))


def test_keys_hands_control_messages_under_kmas_to_the_control_link():
    """keys.py (under CPython): HB, LEAVREQ, LEAVANS under K_MAS from the parent DMA naming this
    RMA come out as `mtype`/`result`; the same naming another MA, this RMA's own messages
    reflected back (NT RMA), and a replay are refused."""
    suite = P.Suite(C.EnDecId.AES_CTR_128, C.AuthId.HMAC_SHA1)
    kmas, kg = os.urandom(16), os.urandom(16)
    k = K.Keys(SID.to_bytes(8, "big"), BOARD_MAID, _Ring(), enc=2, auth=1)
    k.joined(DMA_MAID, kmas, 3, kg)
    key = P.ProtKey(P.KeyRef.KMAS, kmas)

    def sealed(t, seq, maid=BOARD_MAID, nt=N.DMA, controls=(C.ResultCtl(C.Result.EXPELLED),)):
        return P.seal(C.Message(t, nt, SID, maid, controls).encode(), key, suite, seq, os.urandom(16))

    assert k.receive(sealed(M.HB, 1, controls=()), 0) == 0 and (k.mtype, k.result) == (0xAD, 0)
    assert k.receive(sealed(M.LEAVREQ, 2), 0) == 0 and (k.mtype, k.result) == (0xAB, 0x21)
    assert k.receive(sealed(M.LEAVANS, 3, controls=(C.ResultCtl(C.Result.LEAVE_NORMAL),)), 0) == 0
    assert (k.mtype, k.result) == (0xAC, 0x20) and sum(k.errors) == 0
    assert k.receive(sealed(M.LEAVREQ, 2), 0) == 0 and k.mtype == 0 and k.errors[17] == 1  # replayed
    assert k.receive(sealed(M.LEAVREQ, 4, maid=DMA_MAID), 0) == 0 and k.mtype == 0 and k.errors[14] == 1
    assert k.receive(sealed(M.LEAVREQ, 5, nt=N.RMA), 0) == 0 and k.mtype == 0 and k.errors[0] == 1  # reflected
    kd = C.KeyData(4, C.KeyMode.FRESH, 0, os.urandom(16)).encode()
    ok = sealed(M.KEYDELIVER, 6, controls=(C.KeyInfo(C.KeyType.KG, kd),))
    assert k.receive(ok, 0) == 2 and k.kg_gen() == 4 and k.mtype == 0x24


@pytest.mark.slow
def test_tree_client_does_not_fit_the_esp32_56k_area_and_says_so(pki, tmp_path, mpy_dir):
    """The admitted board (48-50 KB in use) has no room to load the tree client in the
    ESP32's initial 56 KB heap area: it says so on its console and waits the longest
    backoff, with no traceback (docs/rmcp2.md "Board tree client", heap)."""
    pki_dir = pki[0]

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            dma, con = await board_and_dma(s, tmp_path, pki_dir, mpy_dir, lambda h: None, 2, 56 * 1024,
                                           backoff_s=[0.1, 0.2])
            try:
                await asyncio.wait_for(con.proc.wait(), 30)
            finally:
                err = await con.stop()
                await dma.close()
            assert "Traceback" not in err and con.proc.returncode == 0, err
            assert con.count("no heap for the tree client") == 2 and con.count("ready") == 2, "\n".join(con.lines)
            assert not dma.eng.members() and sum(dma.eng.errors.values()) == 0

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.slow
def test_board_backs_off_from_a_dma_that_drops_it_after_each_join(pki, tmp_path, mpy_dir):
    """Each join accepted, the link closed right after RELANS: a link shorter than 3 T_HB
    counts as a failed join, so the board backs off and after 6 goes back to the SM."""
    pki_dir = pki[0]

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            # the SM's own ACL (no HRSANS lag: every join is accepted)
            dma, con = await board_and_dma(s, tmp_path, pki_dir, mpy_dir, lambda h: s.server.sm.acl.get(bytes(h)), 1,
                                           drop_members=True, backoff_s=[0.05, 0.2])
            try:
                await asyncio.wait_for(con.proc.wait(), 40)
            finally:
                err = await con.stop()
                await dma.close()
            assert "Traceback" not in err, err
            c = counters(con.last())
            assert (c["links"], c["joins"], c["joined"], c["dma_drops"]) == (1, 6, 6, 6), "\n".join(con.lines)
            assert len(dma.left) == 6

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.slow
def test_board_against_the_dma_tree_service_of_a_real_dma_agent(pki, tmp_path, mpy_dir):
    """The board's tree client against the product DMA side (dmatree.TreeCore/DmaTreeServer,
    what `tessera dma` starts), built from a real DMA agent's live ACL, policy and Ks: the two
    ends of the B.15 control link were written apart, so this is where they must agree. The
    board joins, a Kc from the SMA (KEYDELIVER under the DMA's live Ks, re-sealed under Kg)
    reaches it, HB both ways keep the link past 3 T_HB, and SIGINT is a LEAVREQ the DMA
    answers and counts as a leave."""
    from tessera.rmcp2 import dmatree as D
    from tessera.rmcp2.contentkey import KcSchedule

    pki_dir = pki[0]

    async def main():
        async with Session(pki_dir, tmp_path, n_dmas=1) as s:
            agent = s.dmas()[0]
            loop = asyncio.get_running_loop()
            core = D.from_agent(agent, os.urandom, loop.time(), t_hb=HB)
            srv = D.DmaTreeServer(core, port=0, tick=0.05)
            await srv.start()
            fs = board_fs(tmp_path, pki_dir, s.server.tls_port, hb_s=HB, dma=["127.0.0.1", srv.port],
                          dma_maid=agent.cfg.maid.hex())
            con = Lines(await start_board(fs, mpy_dir, 1, HEAP))
            try:
                await until(lambda: con.count("joined DMA") == 1 or con.proc.returncode is not None, timeout=60,
                            what=lambda: "\n".join(con.lines))
                assert con.count("joined DMA") == 1, "\n".join(con.lines)
                await until(lambda: BOARD_MAID in core.members(), what="the board a member of the DMA's tree")
                mecha, suite = D.policy_of(agent.policy)
                sma = KcSchedule(SID, C.make_maid("127.0.0.1", 40001, 1), os.urandom, 0.0, ks_suite=suite)
                srv._send(core.kc_from_sma(sma.keydeliver(agent.cfg.maid, 1, agent.ks), loop.time()))
                await until(lambda: con.count("Kc gen 1 from the DMA") == 1, what=lambda: "\n".join(con.lines))
                await asyncio.sleep(4 * HB)  # HB both ways: neither side takes the other as gone
                assert BOARD_MAID in core.members() and con.count("DMA link lost") == 0, "\n".join(con.lines)
                con.proc.send_signal(signal.SIGINT)
                await asyncio.wait_for(con.proc.wait(), 10)
                await until(lambda: BOARD_MAID not in core.members(), what="the board's leave at the DMA")
            finally:
                err = await con.stop()
                await srv.close()
            assert "Traceback" not in err, err
            assert con.count("LEAVANS received") == 1, "\n".join(con.lines)
            c = counters(next(ln for ln in reversed(con.lines) if "|" in ln))
            assert c["kc"] == 1 and c["errors"] == 0 and c["dma_hb_in"] >= 2, "\n".join(con.lines)

    asyncio.run(asyncio.wait_for(main(), 90))
