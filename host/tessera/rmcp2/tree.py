"""Tree join on the DMA (PMA) side and the host-side join client (RMA or CMA), sans-IO
(X.603.1 Amd.1 10.2.3, 10.2.4, Annex E; docs/rmcp2-profile.md B.11, B.15).

`JoinEngine.receive(conn, data, now)` takes one complete message from link `conn` (any
hashable the adapter picks) and returns the messages to send back on it; `tick(now)`
expires pending authentications after T_ANNEXE; `drop(conn)` forgets a closed link.
Clock and randomness are injected; nothing here opens sockets.

- From an RMA (in clear, Table 11 N/A / figure 100 note): PPROBREQ with PROBE_AUTH is
  checked against the ACL and answered PPROBANS (no state kept but a bounded nonce cache);
  RELREQ pass 1 -> RELANS pass 2; RELREQ pass 3 -> RELANS under the new K_MAS with
  AUTH_ANS OK and KEY_MATERIAL(Kg) from `kg_source()`. The RMA becomes a member only then.
- From another DMA (a CMA) every message is under Ks; W = annexe.rm_secret(Ks), and the
  final RELANS (under Ks) has no key. The child DMA goes into `children()`.
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

from tessera.crypto.dh import DH
from tessera.crypto.mac import ct_equal
from tessera.rmcp2 import annexe as E
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P
from tessera.rmcp2.upstream import KsSeq

log = logging.getLogger("tessera.rmcp2.tree")
N, M = C.NodeType, C.MsgType
Fail = E.Fail

T_ANNEXE = 20.0  # B.10: two ~2.6 s exponentiations on a Pico W, plus AES and the network
MAX_PENDING = 128  # one run holds ~1 KB (its DH pair and transcript hash)
MAX_MEMBERS = 2000  # as the ACL (B.8)
MAX_CHILDREN = 64
PROBE_CACHE = 4096
MAX_MESSAGE = 1024  # a join message is at most 20 + 4 + 3 + 1 + 304 + envelope


@dataclass(frozen=True)
class Member:
    """An authenticated RMA (or child DMA): its MAID, HASHED_MAID and K_MAS (never shown)."""

    maid: bytes
    hashed_maid: bytes
    kmas: bytes = field(repr=False)
    joined_at: float = 0.0
    conn: Hashable = field(default=None, compare=False)


@dataclass
class _Pending:
    server: E.Server
    nt: C.NodeType
    conn: Hashable
    deadline: float
    ks_gen: int = 0


def acl_index(entries) -> dict[bytes, bytes]:
    """HASHED_MAID -> HASHED_KTLS from ACL_DATA entries (B.8), e.g. `Agent.acl`."""
    return {bytes(e[:16]): bytes(e[16:32]) for e in entries}


def agent_acl_lookup(agent) -> Callable[[bytes], bytes | None]:
    """`acl_lookup` over a DMA agent's live ACL (agent.Agent: `acl`, `acl_updates`), indexed
    again whenever an HRSANS replaced it (B.14: every HRS_REFRESH)."""
    seen, index = -1, {}

    def lookup(hashed_maid: bytes) -> bytes | None:
        nonlocal seen, index
        if seen != agent.acl_updates:
            seen, index = agent.acl_updates, acl_index(agent.acl)
        return index.get(bytes(hashed_maid))

    return lookup


class _Seq:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        if self.n > P.SEQ_MAX:  # B.7: a new key generation (or re-join) is due
            raise C.Rmcp2Error(C.ErrorCode.REPLAY, "sequence numbers exhausted")
        return self.n


class JoinEngine:
    """The DMA's join engine (module docstring)."""

    def __init__(self, session_id: int, maid: bytes, *, acl_lookup: Callable[[bytes], bytes | None],
                 kg_source: Callable[[], tuple[int, bytes]], suite: P.Suite,
                 rand: Callable[[int], bytes],
                 ks_lookup: Callable[[int], P.ProtKey | None] | None = None,
                 ks_current: Callable[[], P.ProtKey | None] | None = None,
                 t_annexe: float = T_ANNEXE, max_pending: int = MAX_PENDING,
                 max_members: int = MAX_MEMBERS, status: Callable[[], tuple[int, int, int]] | None = None,
                 on_join: Callable[[Member, float], bool] | None = None,
                 on_child: Callable[[Member, float], bool] | None = None, ks_seq_base: int = 1) -> None:
        self.sid, self.maid = session_id, C._check_maid(maid)
        self.hashed = P.hashed_maid(session_id, maid)
        self.acl_lookup, self.kg_source, self.suite, self.rand = acl_lookup, kg_source, suite, rand
        self.ks_lookup, self.ks_current = ks_lookup, ks_current
        self.t_annexe, self.max_pending, self.max_members = t_annexe, max_pending, max_members
        self._status = status
        self.on_join = on_join  # an RMA passed pass 3: called before kg_source(); False refuses it (BUSY)
        self.on_child = on_child  # a child DMA passed pass 3: called before its RELANS; False refuses it (BUSY)
        self.errors: Counter = Counter()
        self._pending: dict[bytes, _Pending] = {}
        self._members: dict[bytes, Member] = {}
        self._children: dict[bytes, Member] = {}
        self._probes: OrderedDict[bytes, None] = OrderedDict()
        self._ks_windows: OrderedDict[tuple, P.ReplayWindow] = OrderedDict()
        # one Seq under Ks per generation, from a base above what an earlier process sent (B.15
        # "Replay windows and Seq": a child keeps its window for the parent's life of its process)
        self._ks_seq = KsSeq(ks_seq_base)

    # ------------------------------------------------------------------ state views
    def members(self) -> dict[bytes, Member]:
        """MAID -> Member for every authenticated RMA (for the relay and key layers)."""
        return dict(self._members)

    def children(self) -> dict[bytes, Member]:
        return dict(self._children)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def remove(self, maid: bytes) -> Member | None:
        """Forget a member (leave / expulsion: the key layer then re-keys per GK_MECHA)."""
        return self._members.pop(bytes(maid), None) or self._children.pop(bytes(maid), None)

    # ------------------------------------------------------------------ adapter API
    def tick(self, now: float) -> None:
        for maid in [m for m, p in self._pending.items() if now >= p.deadline]:
            del self._pending[maid]
            self._count(Fail.TIMEOUT)

    def drop(self, conn: Hashable) -> None:
        for maid in [m for m, p in self._pending.items() if p.conn == conn]:
            del self._pending[maid]

    def receive(self, conn: Hashable, data: bytes, now: float) -> list[bytes]:
        self.tick(now)
        try:
            if len(data) > MAX_MESSAGE:
                raise C.Rmcp2Error(C.ErrorCode.OVERSIZE, f"{len(data)} bytes")
            if len(data) >= 1 and data[0] & 0x0F == N.DMA:
                return self._from_dma(conn, data, now)
            return self._from_rma(conn, data, now)
        except C.Rmcp2Error as e:
            self._count(e.code)
        except E.AnnexeError as e:
            self._count(e.reason)
        return []

    # ------------------------------------------------------------------ internals
    def _count(self, reason) -> None:
        name = reason.name
        self.errors[name] += 1
        n = self.errors[name]
        if n in (1, 10, 100, 1000) or n % 10000 == 0:  # rate-limited as B.13
            log.warning("join refused: %s (%d so far)", name, n)

    def _reply(self, t: C.MsgType, to: bytes, *controls: C.Control) -> bytes:
        return C.Message(t, N.DMA, self.sid, to, controls).encode()

    def _status_ctl(self) -> C.Status:
        if self._status is not None:
            ch, mem, gen = self._status()
        else:
            ch, mem, gen = len(self._children), len(self._members), 0
        return C.Status(min(ch, 0xFFFF), min(mem, 0xFFFF), gen)

    def _fail(self, reason: Fail, maid: bytes, msg: str = "") -> list[bytes]:
        """RELANS AUTH_ANS ERROR in clear (no K_MAS exists to protect it) and count why."""
        self._count(reason)
        self._pending.pop(maid, None)
        return [self._reply(M.RELANS, maid, C.AuthAns(C.SecReturn.ERROR))]

    def _from_rma(self, conn: Hashable, data: bytes, now: float) -> list[bytes]:
        msg = C.decode(data)
        if msg.session_id != self.sid or msg.nt != N.RMA:
            raise C.Rmcp2Error(C.ErrorCode.VALUE, "another session")
        if msg.type == M.PPROBREQ:
            return self._probe(msg)
        return self._relreq(conn, msg, now, None)

    def _relreq(self, conn: Hashable, msg: C.Message, now: float, ks: P.ProtKey | None) -> list[bytes]:
        """Passes 1 and 3 of an RMA (ks None: W from the ACL, the result with Kg under K_MAS)
        or of a child DMA (W from the Ks that carried the message; the caller seals under Ks)."""
        who = "an RMA" if ks is None else "a DMA"
        if msg.type != M.RELREQ:
            raise E.AnnexeError(Fail.LAYOUT, f"{msg.type.name} from {who} on a join link")
        ma = msg.get(C.Auth).ma_auth
        if ma is None:
            raise E.AnnexeError(Fail.LAYOUT, "RELREQ without MA_AUTH")
        if ma.pass_no == 1:
            id_c, _, _ = E.parse_pass1(ma.data)
            if not ct_equal(id_c, P.hashed_maid(self.sid, msg.maid)):
                return self._fail(Fail.IDENTITY, msg.maid)
            if ks is not None:
                return self._pass1(conn, msg.maid, N.DMA, E.rm_secret(ks._raw, self.sid), ma.data, now, ks.gen)
            w = self.acl_lookup(id_c)
            if w is None:  # 10.1.5: a DMA shall reject an RMA not in its ACL
                return self._fail(Fail.NOT_IN_ACL, msg.maid)
            return self._pass1(conn, msg.maid, N.RMA, w, ma.data, now, 0)
        if ma.pass_no != 3:
            raise E.AnnexeError(Fail.LAYOUT, f"MA_AUTH pass {ma.pass_no} in RELREQ")
        kmas = self._pass3(conn, msg.maid, ma.data)
        if isinstance(kmas, Fail):
            return self._fail(kmas, msg.maid)
        table, bound = (self._members, self.max_members) if ks is None else (self._children, MAX_CHILDREN)
        if msg.maid not in table and len(table) >= bound:
            return self._fail(Fail.BUSY, msg.maid)
        table[msg.maid] = member = Member(msg.maid, P.hashed_maid(self.sid, msg.maid), kmas, now, conn)
        if ks is None and self.on_join is not None and not self.on_join(member, now):
            del table[msg.maid]  # the key layer refused it (its group is full)
            return self._fail(Fail.BUSY, msg.maid)
        if ks is not None and self.on_child is not None and not self.on_child(member, now):
            del table[msg.maid]
            return self._fail(Fail.BUSY, msg.maid)
        if ks is not None:
            log.info("child DMA %s joined", msg.maid.hex())
            return [self._reply(M.RELANS, msg.maid, C.AuthAns(C.SecReturn.OK))]
        gen, kg = self.kg_source()
        km = C.KeyMaterial(C.KeyType.KG, C.KeyData(gen, C.KeyMode.FRESH, 0, kg).encode())
        plain = self._reply(M.RELANS, msg.maid, C.AuthAns(C.SecReturn.OK, km))
        log.info("RMA %s joined (Kg gen %d)", msg.maid.hex(), gen)
        return [P.seal(plain, P.ProtKey(P.KeyRef.KMAS, kmas), self.suite, 1, self.rand(16))]

    def _probe(self, msg: C.Message) -> list[bytes]:
        pa = msg.get(C.ProbeAuth)
        res = C.Result.ACCEPTED
        if not ct_equal(pa.hashed_maid, P.hashed_maid(self.sid, msg.maid)):
            self._count(Fail.IDENTITY)
            res = C.Result.REJECTED
        else:
            w = self.acl_lookup(pa.hashed_maid)
            key = pa.hashed_maid + pa.nonce
            if w is None:
                self._count(Fail.NOT_IN_ACL)
                res = C.Result.NOT_IN_ACL
            elif not ct_equal(P.probe_proof(w, self.sid, pa.nonce), pa.proof) or key in self._probes:
                self._count(Fail.PROBE)
                res = C.Result.REJECTED
            else:
                self._probes[key] = None  # remembered only once the proof verified
                if len(self._probes) > PROBE_CACHE:
                    self._probes.popitem(last=False)
        if res != C.Result.ACCEPTED:
            return [self._reply(M.PPROBANS, msg.maid, C.ResultCtl(res))]
        return [self._reply(M.PPROBANS, msg.maid, C.ResultCtl(res), self._status_ctl())]

    def _pass1(self, conn, maid: bytes, nt: C.NodeType, w: bytes, data: bytes, now: float, ks_gen: int) -> list[bytes]:
        # one live run per MAID and per link: a new pass 1 replaces the older run (an attacker
        # replaying a victim's pass 1 must then race every retry, rather than hold the slot
        # for T_ANNEXE with one message); beyond max_pending runs a new one is refused
        self._pending.pop(maid, None)
        for m in [m for m, p in self._pending.items() if p.conn == conn]:
            del self._pending[m]
        if len(self._pending) >= self.max_pending:
            self._count(Fail.BUSY)
            return [self._reply(M.RELANS, maid, C.AuthAns(C.SecReturn.ERROR))]
        srv = E.Server(self.sid, self.hashed, w, self.suite.enc, self.rand(16), DH(self.rand(32)))
        try:
            p2 = srv.pass1(data)
        except E.AnnexeError as e:
            return self._fail(e.reason, maid)
        self._pending[maid] = _Pending(srv, nt, conn, now + self.t_annexe, ks_gen)
        return [self._reply(M.RELANS, maid, C.AuthAns(C.SecReturn.RETRANSMISSION_REQ, ma_auth=C.MaAuth(2, p2)))]

    def _pass3(self, conn, maid: bytes, data: bytes) -> bytes | Fail:
        """K_MAS, or why pass 3 failed (the run is over either way)."""
        p = self._pending.get(maid)
        if p is None or p.conn != conn:
            return Fail.NO_PENDING  # replayed, after T_ANNEXE, or from another link
        del self._pending[maid]
        try:
            return p.server.pass3(data)
        except E.AnnexeError as e:
            return e.reason

    # ---------------------------------------------------------------- DMA (CMA) side
    def ks_unseal(self, data: bytes) -> tuple[C.Message, P.ProtKey]:
        """One message under Ks from a DMA: opened and checked against its window per (MAID,
        Ks generation), a window kept only once the Tag verified. Raises Rmcp2Error."""
        if self.ks_lookup is None or self.ks_current is None:
            raise C.Rmcp2Error(C.ErrorCode.KEY, "no Ks: this engine serves RMAs only")

        def keys(maid, sec):
            return self.ks_lookup(sec.gen) if sec.ref == P.KeyRef.KS else None

        pending: dict = {}

        def windows(maid, key):  # created here, kept only once the Tag verified
            pending["w"] = w = self._ks_windows.get((bytes(maid), key.gen)) or P.ReplayWindow()
            pending["k"] = key
            return w

        msg = P.unseal_decode(data, self.suite, keys, windows)
        key = pending["k"]
        self._ks_windows[(msg.maid, key.gen)] = pending["w"]
        if len(self._ks_windows) > 4 * MAX_CHILDREN:
            self._ks_windows.popitem(last=False)
        if msg.session_id != self.sid:
            raise C.Rmcp2Error(C.ErrorCode.VALUE, "another session")
        return msg, key

    def _from_dma(self, conn, data: bytes, now: float) -> list[bytes]:
        msg, key = self.ks_unseal(data)
        if msg.type == M.PPROBREQ:
            return [self.ks_seal(self._reply(M.PPROBANS, msg.maid, C.ResultCtl(C.Result.ACCEPTED), self._status_ctl()))]
        return [self.ks_seal(r) for r in self._relreq(conn, msg, now, key)]

    def ks_seal(self, plain: bytes) -> bytes:
        """A message to a child DMA under the current Ks (this engine's Seq under Ks)."""
        ks = self.ks_current() if self.ks_current is not None else None
        if ks is None:
            raise C.Rmcp2Error(C.ErrorCode.KEY, "no Ks")
        return P.seal(plain, ks, self.suite, self._ks_seq.next(ks), self.rand(16))


# ------------------------------------------------------------------------ client side
class JoinClient:
    """Host-side join client: an RMA (W = its HASHED_KTLS, messages in clear, Kg in the
    final RELANS under K_MAS) or a CMA (a DMA joining a PMA: everything under Ks).

    start() gives PPROBREQ; receive(data) returns what to send next. `state`: probe ->
    pass1 -> pass3 -> joined | refused; `fail` says why when refused."""

    def __init__(self, session_id: int, maid: bytes, nt: C.NodeType, suite: P.Suite,
                 rand: Callable[[int], bytes], *, hashed_ktls: bytes | None = None,
                 ks: P.ProtKey | None = None, dh: DH | None = None, ks_seq: KsSeq | None = None) -> None:
        if (nt == N.RMA) == (hashed_ktls is None) or (nt == N.DMA) == (ks is None):
            raise ValueError("an RMA joins with its HASHED_KTLS, a DMA with Ks")
        self.sid, self.maid, self.nt, self.suite, self.rand = session_id, maid, nt, suite, rand
        self.hashed = P.hashed_maid(session_id, maid)
        self._ks = ks
        self._w = hashed_ktls if nt == N.RMA else E.rm_secret(ks._raw, session_id)  # type: ignore[union-attr]
        self._dh = dh
        self._cli: E.Client | None = None
        self._seq = _Seq()
        self._ks_seq = ks_seq  # a CMA's Seq under Ks kept across its joins (the PMA's window outlives a link)
        self._win = P.ReplayWindow()
        self.state = "new"
        self.fail: Fail | None = None
        self.kmas: bytes | None = None
        self.kg: C.KeyData | None = None
        self.status: C.Status | None = None
        self.parent: bytes | None = None

    def _out(self, t: C.MsgType, *controls: C.Control) -> bytes:
        plain = C.Message(t, self.nt, self.sid, self.maid, controls).encode()
        if self.nt == N.RMA:
            return plain
        seq = self._ks_seq.next(self._ks) if self._ks_seq is not None else self._seq.next()  # type: ignore[arg-type]
        return P.seal(plain, self._ks, self.suite, seq, self.rand(16))  # type: ignore[arg-type]

    def start(self) -> bytes:
        self.state = "probe"
        if self.nt == N.DMA:
            return self._out(M.PPROBREQ)
        nonce = self.rand(8)
        return self._out(M.PPROBREQ, C.ProbeAuth(self.hashed, nonce, P.probe_proof(self._w, self.sid, nonce)))

    def _refuse(self, why: Fail) -> list[bytes]:
        self.state, self.fail = "refused", why
        return []

    def _open(self, data: bytes) -> C.Message:
        if self.nt == N.DMA:
            ks = self._ks
            return P.unseal_decode(data, self.suite, lambda m, s: ks if s.ref == P.KeyRef.KS and s.gen == ks.gen else None,
                                   lambda m, k: self._win)
        if self.state == "pass3":  # the result comes under K_MAS, or in clear when refused
            if len(data) > C.HEADER_LEN + P.SEC_LEN and data[C.HEADER_LEN] == P.KeyRef.KMAS:
                kmas = P.ProtKey(P.KeyRef.KMAS, self._cli.kmas)  # type: ignore[union-attr,arg-type]
                return P.unseal_decode(data, self.suite, lambda m, s: kmas if s.ref == P.KeyRef.KMAS else None,
                                       lambda m, k: self._win)
        return C.decode(data)

    def receive(self, data: bytes) -> list[bytes]:
        msg = self._open(data)
        if msg.session_id != self.sid or msg.maid != self.maid or msg.nt != N.DMA:
            raise E.AnnexeError(Fail.LAYOUT, "not from a DMA to this MA")
        if self.state == "probe" and msg.type == M.PPROBANS:
            if msg.get(C.ResultCtl).value != C.Result.ACCEPTED:
                return self._refuse(Fail.NOT_IN_ACL if msg.get(C.ResultCtl).value == C.Result.NOT_IN_ACL else Fail.REFUSED)
            self.status = msg.get(C.Status)
            dh = self._dh or DH(self.rand(32))
            self._cli = E.Client(self.sid, self.hashed, self._w, self.suite.enc, self.rand(16), dh)
            self.state = "pass1"
            return [self._out(M.RELREQ, C.Auth(ma_auth=C.MaAuth(1, self._cli.pass1())))]
        if msg.type != M.RELANS or self.state not in ("pass1", "pass3"):
            raise E.AnnexeError(Fail.LAYOUT, f"{msg.type.name} in state {self.state}")
        ans = msg.get(C.AuthAns)
        if ans.auth_result == C.SecReturn.ERROR:
            return self._refuse(Fail.REFUSED)
        if self.state == "pass1":
            if ans.auth_result != C.SecReturn.RETRANSMISSION_REQ or ans.ma_auth is None or ans.ma_auth.pass_no != 2:
                raise E.AnnexeError(Fail.LAYOUT, "pass 2 expected")
            try:
                vc = self._cli.pass2(ans.ma_auth.data)  # type: ignore[union-attr]
            except E.AnnexeError as e:  # a server without our W (or a tampered pass 2): stop
                return self._refuse(e.reason)
            self.parent = self._cli.id_s  # type: ignore[union-attr]
            self.state = "pass3"
            return [self._out(M.RELREQ, C.Auth(ma_auth=C.MaAuth(3, vc)))]
        if ans.auth_result != C.SecReturn.OK or ans.ma_auth is not None:
            raise E.AnnexeError(Fail.LAYOUT, "final RELANS expected")
        if self.nt == N.RMA:
            if len(data) <= C.HEADER_LEN or data[C.HEADER_LEN] != P.KeyRef.KMAS or ans.key is None \
                    or ans.key.key_type != C.KeyType.KG:
                raise E.AnnexeError(Fail.LAYOUT, "the final RELANS carries Kg under K_MAS")
            self.kg = C.KeyData.decode(ans.key.key_data)
        self.kmas = self._cli.kmas  # type: ignore[union-attr]
        self.state = "joined"
        return []


# ------------------------------------------------------------------------ asyncio adapter
class JoinServer:
    """The DMA's tree-control listener (B.10 port 26032; 0 picks one): a thin asyncio
    adapter around one JoinEngine. Messages are framed by their header Length (A.4, as the
    SM's links); at most `max_conns` links (one more is closed at once), each closed after
    `idle` seconds without a complete message; the engine's clock is the loop's."""

    def __init__(self, engine: JoinEngine, host: str = "127.0.0.1", port: int = 0,
                 max_conns: int = 256, idle: float = 60.0) -> None:
        self.engine, self.host, self.port = engine, host, port
        self.max_conns, self.idle = max_conns, idle
        self.conns = 0
        self.refused_conns = 0
        self._server = None
        self._ids = 0

    async def start(self) -> None:
        import asyncio

        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("DMA tree control listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        import asyncio

        from tessera.rmcp2.server import read_message

        if self.conns >= self.max_conns:
            self.refused_conns += 1
            writer.close()
            return
        self.conns += 1
        self._ids += 1
        conn = ("tree", self._ids)
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await read_message(reader, self.idle, MAX_MESSAGE)
                if data is None:
                    break
                for out in self.engine.receive(conn, data, loop.time()):
                    writer.write(out)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.conns -= 1
            self.engine.drop(conn)
            writer.close()
