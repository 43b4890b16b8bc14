"""Sans-IO session manager engine: admission (subscription) and security-policy agreement
(X.603.1 Amd.1 10.1.1, 10.1.3, 10.1.4; docs/rmcp2-profile.md B.5, B.7, B.13).

No sockets, clocks or randomness inside: an adapter calls `connect()` when a TLS session
with a verified client certificate is up (or a plain TCP link for the Ks-protected phase),
`receive()` with each complete message, `tick()` with the time, and carries out the `Send`
and `Close` actions returned. Randomness comes from the injected `rand(n)`.

Not built yet: the asyncio adapter, SQLite store, Ks hash schedule, ACL service
(HRSREQ/HRSANS), leave/termination and everything of part 2.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

log = logging.getLogger("tessera.rmcp2.sm")
N, M, T = C.NodeType, C.MsgType, C.CtlType

# What Tessera's MAs and boards can run (profile B.7, B.13): messages and content use AES-128
# in CBC or CTR mode; MACs are HMAC-SHA1 or HMAC-MD5; the group key mechanism is KDC-style.
USABLE_EN_DEC = (C.EnDecId.AES_CBC_128, C.EnDecId.AES_CTR_128)
USABLE_AUTH = (C.AuthId.HMAC_SHA1, C.AuthId.HMAC_MD5)
USABLE_GK_NAME = (C.GkName.KDC,)
_ABSENT = 7  # preference score of an MA that did not list an algorithm (worse than any PREFER)


@dataclass(frozen=True)
class Send:
    conn: object
    data: bytes


@dataclass(frozen=True)
class Close:
    conn: object
    reason: str


@dataclass
class SmConfig:
    session_id: int
    maid: bytes  # the SM's own MAID (B.1)
    agree_time: float = 10.0  # Security Agree.time (10.1.4.1; B.10)
    admit_timeout: float = 20.0  # T_ADMIT (B.10)
    secagans_timeout: float = 30.0  # T_SECAGANS (B.10)
    ks_period: int = 3600  # B.6
    max_rmas: int = 2000  # B.8
    max_links: int = 4096
    modules: frozenset[int] = frozenset()  # algorithm codes whose modules the SM can hand out (B.3 SECALGANS)


@dataclass
class Policy:
    """The agreed security policy (Table 10)."""

    gp_attribute: C.GpAttribute
    gk_mecha: C.GkMecha
    gk_name: C.GkName
    con_en_dec: C.EnDecId
    gk_en_dec: C.EnDecId
    auth: C.AuthId

    @property
    def suite(self) -> P.Suite:
        return P.Suite(self.gk_en_dec, self.auth)

    def controls(self) -> tuple[C.Control, ...]:
        return (C.GkMech(self.gp_attribute, self.gk_mecha, self.gk_name), C.AuthMech(),
                C.ConEnDecAlg(self.con_en_dec), C.GkEnDecAlg(self.gk_en_dec), C.AuthAlg(self.auth))


@dataclass
class Member:
    """An admitted MA (created only after its SUBSREQ authenticated under its K_TLS)."""

    maid: bytes
    nt: C.NodeType
    ktls: P.ProtKey = field(repr=False)
    cert_sha256: bytes
    hashed_maid: bytes
    hashed_ktls: bytes = field(repr=False)
    secagreq: C.Message | None = None
    policy: str = "none"  # none -> sent -> ok | failed
    policy_deadline: float = 0.0
    suite: P.Suite = P.BOOTSTRAP
    link: object = None
    tx_seq: int = 0
    windows: dict = field(default_factory=dict, repr=False)


@dataclass
class Link:
    """One transport connection. tls=True: a TLS session whose client certificate the
    adapter verified; False: plain TCP for the Ks phase of the SMA and DMAs."""

    conn: object
    tls: bool
    cert_der: bytes | None
    opened: float
    maid: bytes | None = None
    ktls: P.ProtKey | None = field(default=None, repr=False)
    hashed_ktls: bytes = field(default=b"", repr=False)
    member: Member | None = None
    window: P.ReplayWindow = field(default_factory=P.ReplayWindow)


class SessionManager:
    def __init__(self, config: SmConfig, rand: Callable[[int], bytes] = os.urandom, now: float = 0.0) -> None:
        self.cfg = config
        self.rand = rand
        self.created = now
        self.links: dict[object, Link] = {}
        self.members: dict[bytes, Member] = {}
        self.service_user_ids: set[bytes] = set()
        self._ks_raw = rand(16)  # created at bootstrap (10.1.2.1)
        self.ks = P.ProtKey(P.KeyRef.KS, self._ks_raw, 1)
        self.policy: Policy | None = None
        self.open_to_rmas = False
        self.errors: Counter[str] = Counter()
        self.acl: dict[bytes, bytes] = {}  # hashed MAID -> hashed K_TLS (10.1.5, B.8)

    # ------------------------------------------------------------------ operator / CP API
    def register_service_user_id(self, ident: bytes) -> None:
        """The content provider registers a service user identifier (10.1.1.5)."""
        if not 1 <= len(ident) <= 253:
            raise ValueError("a service user identifier is 1..253 bytes (profile A.6)")
        self.service_user_ids.add(bytes(ident))

    def open_session(self) -> None:
        """Open the session to RMAs (10.1.1.3: the announcement is out of scope)."""
        if self.policy is None:
            raise ValueError("the security policy is not set yet (10.1.4.2 follows 10.1.4.1)")
        self.open_to_rmas = True

    @property
    def sma(self) -> Member | None:
        return next((m for m in self.members.values() if m.nt == N.SMA), None)

    # ------------------------------------------------------------------ transport events
    def connect(self, conn: object, now: float, cert_der: bytes | None = None, tls: bool = True) -> list:
        if len(self.links) >= self.cfg.max_links:
            self._count("links full")
            return [Close(conn, "too many connections")]
        self.links[conn] = Link(conn, tls, cert_der, now)
        return []

    def disconnect(self, conn: object) -> None:
        link = self.links.pop(conn, None)
        if link and link.member and link.member.link is conn:
            link.member.link = None

    def tick(self, now: float) -> list:
        out: list = []
        for link in list(self.links.values()):
            if link.member is None and now - link.opened > self.cfg.admit_timeout:
                out += self._drop(link, "admission deadline")
        if self.policy is None and now - self.created >= self.cfg.agree_time:
            out += self._select_policy(now)
        for m in list(self.members.values()):  # _refuse_policy removes members
            if m.policy == "sent" and now > m.policy_deadline:
                out += self._refuse_policy(m, "no SECAGANS before the deadline")
        return out

    def receive(self, conn: object, data: bytes, now: float) -> list:
        link = self.links.get(conn)
        if link is None:
            return []
        try:
            return self._receive(link, bytes(data), now)
        except C.Rmcp2Error as e:
            return self._reject(link, e)

    # ------------------------------------------------------------------ internals
    def _count(self, reason: str) -> None:
        self.errors[reason] += 1
        if self.errors[reason] in (1, 10, 100, 1000) or self.errors[reason] % 10000 == 0:
            log.warning("rmcp2 sm: %s (%d so far)", reason, self.errors[reason])

    def _reject(self, link: Link, e: C.Rmcp2Error) -> list:
        self._count(e.code.name)
        if link.member is None:  # nothing authenticated on this link: no reason to keep it
            return self._drop(link, e.code.name)
        return []

    def _drop(self, link: Link, reason: str) -> list:
        self.disconnect(link.conn)
        return [Close(link.conn, reason)]

    def _seal(self, m: Member | None, link: Link, msg: C.Message) -> Send:
        """Protect a message for `link` per profile B.7: K_TLS on a TLS link, Ks otherwise."""
        if m is None:
            raise AssertionError("sealing needs a member or a link key")
        m.tx_seq += 1
        key, suite = (m.ktls, m.suite) if link.tls else (self.ks, m.suite)
        return Send(link.conn, P.seal(msg.encode(), key, suite, m.tx_seq, self.rand(16)))

    def _msg(self, t: C.MsgType, maid: bytes, *controls: C.Control) -> C.Message:
        return C.Message(t, N.SM, self.cfg.session_id, maid, tuple(controls))

    def _receive(self, link: Link, data: bytes, now: float) -> list:
        if link.tls and link.ktls is None:
            return self._ktlsreq(link, data)
        if link.tls:
            plain = P.unseal(data, link.member.suite if link.member else P.BOOTSTRAP, self._tls_key(link),
                             lambda maid, key: link.window)
        else:
            plain = P.unseal(data, self._ks_suite(data), self._ks_key, self._ks_window)
        msg = C.decode(plain)
        if msg.session_id != self.cfg.session_id:
            self._count("session id")
            return []
        if link.tls:
            if link.member is None:
                if msg.type != M.SUBSREQ:
                    raise C.Rmcp2Error(C.ErrorCode.UNEXPECTED_CONTROL, "SUBSREQ first")
                return self._subsreq(link, msg)
            member = link.member
        else:  # the Tag verified under Ks, which _ks_key gives only for an admitted SMA/DMA
            member = link.member = self.members[msg.maid]
        if msg.maid != member.maid:
            self._count("MAID differs from the admitted one")
            return []
        member.link = link.conn
        handler = {M.SECAGREQ: self._secagreq, M.SECALGREQ: self._secalgreq, M.SECAGANS: self._secagans}.get(msg.type)
        if handler is None:
            self._count(f"{msg.type.name} not handled by this SM")
            return []
        return handler(member, link, msg, now)

    def _tls_key(self, link: Link):
        def lookup(maid: bytes, sec: P.SecHeader):
            if maid != link.maid or sec.ref != P.KeyRef.KTLS:
                return None
            return link.ktls
        return lookup

    def _ks_suite(self, data: bytes) -> P.Suite:
        m = self.members.get(bytes(data[12:20]))
        return m.suite if m else P.BOOTSTRAP

    def _ks_key(self, maid: bytes, sec: P.SecHeader):
        m = self.members.get(maid)
        if m is None or m.nt == N.RMA or sec.ref != P.KeyRef.KS or sec.gen != self.ks.gen:
            return None
        return self.ks

    def _ks_window(self, maid: bytes, key: P.ProtKey) -> P.ReplayWindow:
        # made at admission (_subsreq): receiving never creates state (profile B.7)
        return self.members[maid].windows[(key.ref, key.gen)]

    def _ktlsreq(self, link: Link, data: bytes) -> list:
        """B.5: KTLSREQ in clear inside TLS; answer with the seed, derive K_TLS."""
        msg = C.decode(data)
        if msg.type != M.KTLSREQ or msg.session_id != self.cfg.session_id or link.cert_der is None:
            raise C.Rmcp2Error(C.ErrorCode.UNEXPECTED_CONTROL, "KTLSREQ first, on a TLS link")
        if msg.maid in self.members:
            self._count("MAID in use")
            return self._drop(link, "MAID in use")
        nonce = msg.get(C.KtlsNonce).value
        seed = self.rand(32)
        raw = P.ktls(seed, self.cfg.session_id, msg.maid, nonce, link.cert_der)
        link.maid = msg.maid
        link.ktls = P.ProtKey(P.KeyRef.KTLS, raw)
        link.hashed_ktls = P.hashed_ktls(raw, self.cfg.session_id)
        return [Send(link.conn, self._msg(M.KTLSANS, msg.maid, C.KtlsSeed(seed)).encode())]

    def _subsreq(self, link: Link, msg: C.Message) -> list:
        """10.1.1.2-10.1.1.5: admission of the SMA, DMAs and RMAs."""
        result = self._admission_result(msg)
        temp = Member(msg.maid, msg.nt, link.ktls, b"", b"", b"")
        if result != C.Result.ACCEPTED:
            self._count(f"SUBSREQ refused: {result.name}")
            out = [self._seal(temp, link, self._msg(M.SUBSANS, msg.maid, C.ResultCtl(result)))]
            return out + self._drop(link, result.name)
        sid = self.cfg.session_id
        m = Member(msg.maid, msg.nt, link.ktls, hashlib.sha256(link.cert_der or b"").digest(),
                   P.hashed_maid(sid, msg.maid), link.hashed_ktls, link=link.conn)
        if msg.nt != N.RMA:
            m.windows[(P.KeyRef.KS, self.ks.gen)] = P.ReplayWindow()
        self.members[msg.maid] = m
        link.member = m
        out = [self._seal(m, link, self._msg(M.SUBSANS, msg.maid, C.ResultCtl(C.Result.ACCEPTED)))]
        if msg.nt != N.RMA:  # Ks under K_TLS to the SMA and DMAs only (10.1.1.1, 10.1.2.1)
            kd = C.KeyData(self.ks.gen, C.KeyMode.FRESH, self.cfg.ks_period, self._ks_raw).encode()
            out.append(self._seal(m, link, C.Message(M.KEYDELIVER, N.SM, sid, msg.maid,
                                                     (C.KeyInfo(C.KeyType.KS, kd),))))
            out += self._drop(link, "Ks delivered: the TLS session closes (10.1.1.1)")
        return out

    def _admission_result(self, msg: C.Message) -> C.Result:
        if msg.maid in self.members:
            return C.Result.MAID_IN_USE
        if msg.nt == N.SMA:
            return C.Result.NOT_ALLOWED if self.sma else C.Result.ACCEPTED
        if msg.nt == N.DMA:
            return C.Result.ACCEPTED  # invitation is out of scope (10.1.1.3): TLS identity suffices
        if not self.open_to_rmas:
            return C.Result.NOT_ALLOWED
        if sum(m.nt == N.RMA for m in self.members.values()) >= self.cfg.max_rmas:
            return C.Result.SESSION_FULL
        if self.policy and self.policy.gp_attribute == C.GpAttribute.CLOSED:
            sui = msg.get(C.ServUserIdent)
            if sui is None:
                return C.Result.SERV_USER_ID_MISSING  # Table 23
            if sui.ident not in self.service_user_ids:
                return C.Result.SERV_USER_ID_NOT_RECOGNIZED  # Table 23
        return C.Result.ACCEPTED

    def _secagreq(self, m: Member, link: Link, msg: C.Message, now: float) -> list:
        """10.1.4: SMA and DMAs before the policy (with capabilities), RMAs and late DMAs after."""
        if m.nt == N.RMA and not link.tls:
            raise C.Rmcp2Error(C.ErrorCode.UNEXPECTED_CONTROL, "RMA security agreement is under K_TLS")
        has_capab = any(isinstance(c, (C.GkMechCapab, C.EnDecCapab, C.AuthAlgCapab)) for c in msg.controls)
        if self.policy is not None and has_capab:
            self._count("capabilities after the policy is set (11.2.5.1 g)")
        m.secagreq = msg
        if self.policy is None:
            if now - self.created >= self.cfg.agree_time:
                return self._select_policy(now)  # the time has passed already: select now
            return []  # answered when the Security Agree.time has passed
        return [self._seclist(m, now)]

    def _seclist(self, m: Member, now: float) -> Send:
        assert self.policy is not None
        m.policy = "sent"
        m.policy_deadline = now + self.cfg.secagans_timeout
        link = self.links.get(m.link)
        return self._seal(m, link, self._msg(M.SECLIST, m.maid, *self.policy.controls()))

    def _select_policy(self, now: float) -> list:
        """Profile B.13: the SM's selection after the Security Agree.time."""
        sma = self.sma
        if sma is None or sma.secagreq is None:
            return []  # nothing to agree on without the SMA's proposal; wait
        reqs = [m.secagreq for m in self.members.values() if m.secagreq is not None and m.nt != N.RMA]
        prop = sma.secagreq.get(C.SmaPropose)
        assert prop is not None  # the decoder enforces it for the SMA (11.2.5.1 g)
        content = prop.con_en_dec_id if prop.con_en_dec_id in USABLE_EN_DEC else \
            _best(reqs, C.EnDecCapab, USABLE_EN_DEC)
        self.policy = Policy(prop.gp_attribute, prop.gk_mecha, _best(reqs, C.GkMechCapab, USABLE_GK_NAME), content,
                             _best(reqs, C.EnDecCapab, USABLE_EN_DEC), _best(reqs, C.AuthAlgCapab, USABLE_AUTH))
        log.info("rmcp2 sm: policy %s", self.policy)
        return [self._seclist(m, now) for m in self.members.values()
                if m.secagreq is not None and m.link in self.links]

    def _secalgreq(self, m: Member, link: Link, msg: C.Message, now: float) -> list:
        """SECALGREQ answered with SECALGANS (B.3): a module is AVAILABLE only if the SM
        holds it (config.modules); the transfer itself is outside RMCP-2 (10.1.4.1)."""
        if m.policy != "sent":
            self._count("SECALGREQ outside the agreement")
            return []
        ctls: list[C.Control] = []
        for c in msg.controls:
            ok = int(c.value) in self.cfg.modules
            ctls += [c, C.DeliverResultCtl(C.DeliverResult.AVAILABLE if ok else C.DeliverResult.NOT_DELIVERABLE)]
        return [self._seal(m, link, self._msg(M.SECALGANS, m.maid, *ctls))]

    def _secagans(self, m: Member, link: Link, msg: C.Message, now: float) -> list:
        if m.policy != "sent":
            self._count("SECAGANS without SECLIST")
            return []
        ret = msg.get(C.SecReturnCtl).value
        if ret != C.SecReturn.OK:
            return self._refuse_policy(m, f"SEC_RETURN {ret.name}")
        assert self.policy is not None
        m.policy = "ok"
        m.suite = self.policy.suite  # the link moves to the agreed algorithms (B.7)
        if m.nt == N.RMA:
            self.acl[m.hashed_maid] = m.hashed_ktls  # 10.1.5
        return []

    def _refuse_policy(self, m: Member, why: str) -> list:
        """An MA that cannot run the policy leaves the session (10.1.4)."""
        self._count(f"policy refused: {why}")
        m.policy = "failed"
        self.members.pop(m.maid, None)
        self.acl.pop(m.hashed_maid, None)
        link = self.links.get(m.link)
        return self._drop(link, "policy refused") if link else []


def _best(reqs: list[C.Message], cls: type, usable: tuple) -> C.IntEnum:
    """B.13: among the usable algorithms, the one listed by most MAs, then the lowest sum of
    PREFER (an MA that did not list it counts 7), then the lowest code."""
    def score(alg) -> tuple[int, int, int]:
        held = [next((c.prefer for c in r.all(cls) if c.value == alg), None) for r in reqs]
        return (-sum(p is not None for p in held), sum(p if p is not None else _ABSENT for p in held), int(alg))
    return min(usable, key=score)
