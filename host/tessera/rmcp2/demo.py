"""Demo scenario: secure RMCP-2 admission with the virtual boards as receiver agents.

Two sessions on loopback, each an SM (SQLite store, mutual TLS with ECDSA P-256, ephemeral
ports) with an SMA and two DMAs, all through the public API (tessera.api.rmcp2): one SMA
proposes an open group, the other a closed group with one service user identifier
registered. Every virtual board runs the firmware RMA (tessera_fw.rmcp2.rma with the TLS
adapter rma_net.admit) in the real MicroPython interpreter: it is admitted to the open
group; in the closed group the board holding the identifier is admitted and the other is
refused with 0x41 (SERV_USER_ID_MISSING). The DMAs' ACLs (HRSANS) hold exactly the
admitted boards.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.api.boards import Board
from tessera.api.rmcp2 import AclEntry, AsyncMaAgent, AsyncSessionManager, SmSettings, make_sm_pki
from tessera.demo import DemoContext
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

TITLE = "Secure RMCP-2: SM, SMA and two DMAs per session; boards admitted as RMAs to an open and a closed group"
ORDER = 50
DIR = "rmcp2"  # on each board's filesystem: its certificate, key and the CA, in DER

# Runs on the board: admission through the firmware's TLS adapter; one JSON line back.
BOARD_SCRIPT = """
import os, json, hashlib
from tessera_fw.rmcp2.rma import Rma, STATE_NAMES
from tessera_fw.rmcp2 import rma_net
def rd(p):
    with open('{d}/' + p, 'rb') as f:
        return f.read()
cert = rd('rma.der')
r = Rma(bytes.fromhex('{sid}'), bytes.fromhex('{maid}'), cert, os.urandom, sui={sui})
link = rma_net.admit(r, '127.0.0.1', {port}, cert, rd('rma.key.der'), rd('ca.der'))
ms = link.handshake_ms
link.close()
print(json.dumps({{'state': STATE_NAMES[r.state], 'result': r.result, 'sec_return': r.sec_return,
                  'hkf': hashlib.sha256(r.hashed_ktls()).digest()[:8].hex() if r.hashed_ktls() else '', 'ms': ms}}))
"""


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _install_identity(board: Board, pki: Path, name: str) -> None:
    """The board's certificate, key (0600) and the session CA in DER, as mbedTLS loads them."""
    d = board.files / DIR
    d.mkdir(exist_ok=True)
    der = serialization.Encoding.DER
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    (d / "ca.der").write_bytes(ca.public_bytes(der))
    (d / "rma.der").write_bytes(x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes()).public_bytes(der))
    key = serialization.load_pem_private_key((pki / f"{name}.key").read_bytes(), None)
    _private(d / "rma.key.der", key.private_bytes(der, serialization.PrivateFormat.TraditionalOpenSSL,
                                                  serialization.NoEncryption()))


class _Session:
    """An SM serving one session with an SMA (proposing `group`) and two DMAs."""

    def __init__(self, ctx: DemoContext, pki: Path, group: str) -> None:
        self.ctx, self.pki, self.group = ctx, pki, group
        self.sid = secrets.randbits(63) | 1
        self.sm: AsyncSessionManager | None = None
        self.agents: list[AsyncMaAgent] = []

    async def start(self, ident: str | None) -> None:
        # the Security Agree.time runs from the session's creation: made just before serving
        self.sm = AsyncSessionManager.open(self.ctx.workdir / DIR / f"sm-{self.group}.sqlite",
                                           SmSettings(self.sid, agree_time=2.0))
        if ident:
            self.sm.add_service_user(ident)
        ep = await self.sm.serve(self.pki, tick=0.1)
        self.ctx.step(f"{self.group} group: SM for session {self.sid:#018x} on {ep.address} (TLS admission), "
                      f"Ks link on port {ep.plain_port}" + (f"; identifier {ident!r} registered" if ident else ""))
        kw = dict(tick=0.1, retry=0.2, hrs_refresh=0.5)
        self.agents = [AsyncMaAgent("sma", ep, self.sid, self.pki, "sma", group=self.group, instance=1, **kw)]
        self.agents += [AsyncMaAgent("dma", ep, self.sid, self.pki, f"dma{i}", instance=1 + i, **kw) for i in (1, 2)]
        for a in self.agents:
            await a.begin()  # together: every DMA's capabilities count in the agreement
        for a in self.agents:
            adm = await a.start(timeout=30)
            self.ctx.step(f"{self.group} group: {a.name} admitted ({adm.result.name}), policy {adm.policy_result.name}, "
                          f"Ks generation {adm.ks_gen}")
        p = (self.sm.status()).policy
        self.ctx.step(f"{self.group} group: policy {p.group}, content {p.content_alg}, messages {p.gk_alg} + {p.auth}; "
                      "open to RMAs")

    @property
    def dmas(self) -> list[AsyncMaAgent]:
        return [a for a in self.agents if a.role == "dma"]

    async def close(self) -> None:
        for a in self.agents:
            await a.close()
        if self.sm is not None:
            await self.sm.close()


async def _admit(board: Board, session: _Session, n: int, ident: str | None) -> dict:
    maid = C.make_maid("127.0.0.1", 26032, n)
    code = BOARD_SCRIPT.format(d=DIR, sid=session.sid.to_bytes(8, "big").hex(), maid=maid.hex(),
                               sui=repr(ident.encode()) if ident else "None", port=session.sm.endpoint.tls_port)
    res = await asyncio.to_thread(board.eval_json, code)
    # the board's HASHED_KTLS is the Annex E secret W (profile B.11): only a fingerprint of it
    # leaves the board, and the DMAs' ACL entries are matched by that fingerprint
    res["entry"] = (P.hashed_maid(session.sid, maid), bytes.fromhex(res["hkf"])) if res["hkf"] else None
    return res


def _fingerprint(e: AclEntry) -> tuple[bytes, bytes]:
    return e.hashed_maid, hashlib.sha256(e.hashed_ktls).digest()[:8]


def run(ctx: DemoContext) -> None:
    if not ctx.boards:
        raise RuntimeError("no virtual boards (the board scenario must run first)")
    asyncio.run(asyncio.wait_for(_run(ctx), 90))


async def _run(ctx: DemoContext) -> None:
    t0 = time.monotonic()
    boards = [Board.virtual(f"demo-{name}", name) for name in sorted(ctx.boards)]
    pki = ctx.workdir / DIR / "pki"
    names = ["sm", "sma", "dma1", "dma2"] + [f"rma-{b.profile.name}" for b in boards]
    make_sm_pki(pki, names)
    ctx.step(f"PKI: a CA and ECDSA P-256 certificates for {', '.join(names)} (profile B.10)")
    for b in boards:
        _install_identity(b, pki, f"rma-{b.profile.name}")
    holder = boards[0]
    ident = f"viewer-{holder.profile.name}"
    sessions = {"open": _Session(ctx, pki, "open"), "closed": _Session(ctx, pki, "closed")}
    try:
        await sessions["open"].start(None)
        await sessions["closed"].start(ident)
        admitted: dict[str, list[tuple[bytes, bytes]]] = {"open": [], "closed": []}
        for i, b in enumerate(boards):
            for group, s in sessions.items():
                sui = ident if group == "closed" and b is holder else None
                r = await _admit(b, s, 100 + i, sui)
                who = f"{b.profile.name} board ({'identifier ' + repr(sui) if sui else 'no identifier'})"
                if r["state"] == "ready":
                    admitted[group].append(r["entry"])
                    ctx.step(f"{group} group: {who} admitted over TLS (handshake {r['ms']} ms on the board), "
                             "policy agreed (SECAGANS OK)")
                else:
                    ctx.step(f"{group} group: {who} {r['state']}: RESULT {r['result']:#04x}")
                expect_ok = group == "open" or b is holder
                if expect_ok and (r["state"], r["sec_return"]) != ("ready", 1):
                    raise RuntimeError(f"{b.profile.name} board was not admitted to the {group} group: {r}")
                if not expect_ok and (r["state"], r["result"]) != ("refused", int(C.Result.SERV_USER_ID_MISSING)):
                    raise RuntimeError(f"{b.profile.name} board without an identifier was not refused 0x41: {r}")
        for group, s in sessions.items():
            want = set(admitted[group])
            for d in s.dmas:
                st = await d.wait_for(lambda st: {_fingerprint(e) for e in st.acl} == want, 20,
                                      f"the {group} group's ACL")
                ok = all(d.acl_allows(e) for e in st.acl if _fingerprint(e) in want)
                ctx.step(f"{group} group: {d.name} ACL has {_entries(len(st.acl))} (HRSANS under Ks), "
                         f"every admitted board allowed: {ok}")
                if not ok:
                    raise RuntimeError(f"{d.name} refuses an admitted board")
            st = s.sm.status()
            ctx.fact(f"{group} group: {sum(m.role == 'RMA' for m in st.members)} board RMA(s) admitted, "
                     f"both DMAs hold {_entries(len(want))}, Ks generation "
                     f"{st.ks_gen}")
        refused = [b.profile.name for b in boards if b is not holder]
        if refused:
            ctx.fact(f"closed group: {', '.join(refused)} board without a service user identifier refused with "
                     "0x41 (SERV_USER_ID_MISSING)")
        ctx.fact(f"{len(boards)} boards x 2 groups in {time.monotonic() - t0:.1f} s")
    finally:
        for s in sessions.values():
            await s.close()
        for b in boards:
            _cleanup(b)


def _entries(n: int) -> str:
    return f"{n} ACL entr{'y' if n == 1 else 'ies'}"


def _cleanup(board: Board) -> None:
    """Leave the board's filesystem as the board scenario left it (its key file removed)."""
    d = board.files / DIR
    for f in ("rma.key.der", "rma.der", "ca.der"):
        try:
            (d / f).unlink()
        except FileNotFoundError:
            pass
    try:
        d.rmdir()
    except OSError:
        pass



