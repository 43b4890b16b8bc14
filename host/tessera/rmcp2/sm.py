"""Sans-IO session manager engine: admission (subscription) and security-policy agreement
(X.603.1 Amd.1 10.1.1, 10.1.3, 10.1.4; docs/rmcp2-profile.md B.5, B.7, B.13).

No sockets, clocks or randomness inside: an adapter calls `connect()` when a TLS session
with a verified client certificate is up (or a plain TCP link for the Ks-protected phase),
`receive()` with each complete message, `tick()` with the time, and carries out the `Send`
and `Close` actions returned. Randomness comes from the injected `rand(n)`.

Session key Ks (10.1.2.1; profile B.6, B.14): created at bootstrap, delivered under K_TLS at
admission, hashed forward every `ks_period`, replaced by a fresh random key when a DMA is
truncated or an SMA/DMA leaves abnormally, and then delivered by KEYDELIVER to the SMA and
every DMA under each one's own K_TLS. ACL (10.1.5): HRSREQ answered by HRSANS under Ks.

An optional `journal` (the SQLite store, store.py) is told every state change before the
engine acts on it, so that what was acknowledged survives a crash.

Not built: leave/termination of RMAs and everything of part 2.
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
    admit_timeout: float = 10.0  # T_ADMIT (B.10: board-speed RMA admission measured <= 0.34 s)
    secagans_timeout: float = 10.0  # T_SECAGANS (B.10: measured, see the profile)
    ks_period: int = 3600  # B.6
    ks_grace: float = 30.0  # B.6: previous generation accepted after a hash step
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
    ks_pending: bool = False  # a fresh Ks this member has not been sent yet (B.14)
    link: object = None
    tx_seq: int = 0
    tx_reserved: int = 0  # Seq values up to here may have been used (journalled before use)
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
        self.ks_mode = C.KeyMode.FRESH
        self.ks_since = now  # when the current generation came into force
        self.ks_prev: P.ProtKey | None = None  # previous generation, during the grace after a hash step
        self.ks_prev_until = 0.0
        self.journal = None  # store.Journal or None (set by the adapter / store.restore)
        self._now = now
        self._admitting: object = None
        self.policy: Policy | None = None
        self.open_to_rmas = False
        self.errors: Counter[str] = Counter()
        self.acl: dict[bytes, bytes] = {}  # hashed MAID -> hashed K_TLS (10.1.5, B.8)

    # ------------------------------------------------------------------ operator / CP API
    def register_service_user_id(self, ident: bytes) -> None:
        """The content provider registers a service user identifier (10.1.1.5)."""
        if not 1 <= len(ident) <= 253:
            raise ValueError("a service user identifier is 1..253 bytes (profile A.6)")
        self._j("add_service_user_id", bytes(ident))
        self.service_user_ids.add(bytes(ident))

    def remove_service_user_id(self, ident: bytes) -> bool:
        """Withdraw an identifier; members already admitted stay (10.1.1.5 checks at SUBSREQ)."""
        if bytes(ident) not in self.service_user_ids:
            return False
        self._j("remove_service_user_id", bytes(ident))
        self.service_user_ids.discard(bytes(ident))
        return True

    def open_session(self) -> None:
        """Open the session to RMAs (10.1.1.3: the announcement is out of scope)."""
        if self.policy is None:
            raise ValueError("the security policy is not set yet (10.1.4.2 follows 10.1.4.1)")
        self.open_to_rmas = True
        self._j("put_session", self)

    def rekey(self, now: float, reason: str = "operator request") -> list:
        """A fresh random Ks (no hashing), KEYDELIVER to the SMA and every DMA (figure 93)."""
        log.warning("rmcp2 sm: fresh Ks: %s", reason)
        gen = P.next_gen(self.ks.gen)
        self.ks_prev = None  # no grace: a truncated DMA's key must stop working at once (B.14)
        self._set_ks(self.rand(16), gen, C.KeyMode.FRESH, now)
        out: list = []
        for m in self.members.values():
            if m.nt != N.RMA:
                m.ks_pending = True
                out += self._deliver_ks(m)
        return out

    def truncate(self, maid: bytes, now: float) -> list:
        """Expel an SMA/DMA (LEAVREQ EXPELLED under its K_TLS, 10.2.5) and replace Ks."""
        m = self.members.get(bytes(maid))
        if m is None or m.nt == N.RMA:
            raise ValueError("no such SMA/DMA in the session")
        out: list = []
        link = self.links.get(m.link)
        if link is not None:
            out.append(self._seal(m, link, self._msg(M.LEAVREQ, m.maid, C.ResultCtl(C.Result.EXPELLED)), m.ktls))
        out += self._remove(m, "truncated by the operator")
        return out + self.rekey(now, "a DMA was truncated")

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
        self._now = now
        out: list = []
        for link in list(self.links.values()):
            if link.member is None and now - link.opened > self.cfg.admit_timeout:
                out += self._drop(link, "admission deadline")
        if self.policy is None and now - self.created >= self.cfg.agree_time:
            out += self._select_policy(now)
        for m in list(self.members.values()):  # _refuse_policy removes members
            if m.policy == "sent" and now > m.policy_deadline:
                out += self._refuse_policy(m, "no SECAGANS before the deadline")
        if self.ks_prev is not None and now >= self.ks_prev_until:
            self.ks_prev = None
            self._prune_windows()
            self._j("put_ks", self)
        if now - self.ks_since >= self.cfg.ks_period:
            out += self._hash_step(now)
        return out

    def receive(self, conn: object, data: bytes, now: float) -> list:
        link = self.links.get(conn)
        if link is None:
            return []
        self._now = now
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

    def _j(self, op: str, *args) -> None:
        if self.journal is not None:
            getattr(self.journal, op)(*args)

    def _seal(self, m: Member, link: Link, msg: C.Message, key: P.ProtKey | None = None) -> Send:
        """Protect a message for `link` per profile B.7: K_TLS on a TLS link, Ks otherwise
        (or the key given). Seq values are reserved in the journal before use, so a restarted
        SM never repeats one under a key a receiver still holds."""
        m.tx_seq += 1
        if m.tx_seq > m.tx_reserved and m.hashed_maid:
            m.tx_reserved = m.tx_seq + 255
            self._j("put_member", m)
        key = key or (m.ktls if link.tls else self.ks)
        return Send(link.conn, P.seal(msg.encode(), key, m.suite, m.tx_seq, self.rand(16)))

    def _set_ks(self, raw: bytes, gen: int, mode: C.KeyMode, now: float) -> None:
        self._ks_raw, self.ks, self.ks_mode, self.ks_since = raw, P.ProtKey(P.KeyRef.KS, raw, gen), mode, now
        for m in self.members.values():
            if m.nt != N.RMA:
                m.windows[(P.KeyRef.KS, gen)] = P.ReplayWindow()
        self._prune_windows()
        self._j("put_ks", self)  # before any message under the new generation leaves

    def _prune_windows(self) -> None:
        keep = {self.ks.gen} | ({self.ks_prev.gen} if self.ks_prev else set())
        for m in self.members.values():
            for k in [k for k in m.windows if k[0] == P.KeyRef.KS and k[1] not in keep]:
                del m.windows[k]

    def _hash_step(self, now: float) -> list:
        """B.6: Ks(g+1) = H(Ks(g)); the old generation stays valid for ks_grace. Each
        connected SMA/DMA gets an HB under the new generation, which tells it to hash forward."""
        old = self.ks
        gen = P.next_gen(old.gen)
        self.ks_prev, self.ks_prev_until = old, now + self.cfg.ks_grace
        self._set_ks(P.ks_next(self._ks_raw, self.cfg.session_id, gen), gen, C.KeyMode.HASHED, now)
        out = []
        for m in self.members.values():
            link = self.links.get(m.link)
            if m.nt != N.RMA and link is not None and not link.tls:
                out.append(self._seal(m, link, self._msg(M.HB, m.maid)))
        return out

    def _keydeliver(self, m: Member, link: Link) -> Send:
        """KEYDELIVER of the current Ks under the member's own K_TLS (10.1.2.1, B.14)."""
        kd = C.KeyData(self.ks.gen, self.ks_mode, self.cfg.ks_period, self._ks_raw).encode()
        return self._seal(m, link, C.Message(M.KEYDELIVER, N.SM, self.cfg.session_id, m.maid,
                                             (C.KeyInfo(C.KeyType.KS, kd),)), m.ktls)

    def _deliver_ks(self, m: Member) -> list:
        link = self.links.get(m.link)
        if link is None or link.tls:
            return []  # delivered when the member next authenticates on a plain link
        m.ks_pending = False
        return [self._keydeliver(m, link)]

    def _remove(self, m: Member, why: str) -> list:
        self.members.pop(m.maid, None)
        self.acl.pop(m.hashed_maid, None)
        self._j("drop_member", m.maid)
        link = self.links.get(m.link)
        return self._drop(link, why) if link else []

    def _msg(self, t: C.MsgType, maid: bytes, *controls: C.Control) -> C.Message:
        return C.Message(t, N.SM, self.cfg.session_id, maid, tuple(controls))

    def _receive(self, link: Link, data: bytes, now: float) -> list:
        if link.tls and link.ktls is None:
            return self._ktlsreq(link, data)
        if link.tls:
            plain = P.unseal(data, link.member.suite if link.member else P.BOOTSTRAP, self._tls_key(link),
                             lambda maid, key: link.window)
        else:
            _, sec = P.peek(data)
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
        else:  # the Tag verified under Ks or the member's K_TLS (_ks_key: admitted SMA/DMA only)
            member = self.members[msg.maid]
            self._j("put_window", member, sec.ref, sec.gen)
            if link.member is not None and link.member.maid != member.maid:
                # Ks proves only "one of the SMA/DMAs" (B.13): a link stays with its member
                self._count("MAID differs from the link's member")
                return []
            link.member = member
        if msg.maid != member.maid:
            self._count("MAID differs from the admitted one")
            return []
        member.link = link.conn
        out = self._deliver_ks(member) if member.ks_pending else []
        if not link.tls and sec.ref == P.KeyRef.KTLS:
            if msg.type != M.HB:
                self._count("only HB is accepted under K_TLS on a plain link")
                return out
            return out or [self._keydeliver(member, link)]  # resynchronise its Ks (B.14)
        handler = {M.SECAGREQ: self._secagreq, M.SECALGREQ: self._secalgreq, M.SECAGANS: self._secagans,
                   M.HRSREQ: self._hrsreq, M.HB: self._hb}.get(msg.type)
        if handler is None:
            self._count(f"{msg.type.name} not handled by this SM")
            return out
        return out + handler(member, link, msg, now)

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
        if m is None or m.nt == N.RMA:
            return None
        if sec.ref == P.KeyRef.KTLS:
            return m.ktls  # a member's own key: binds a new plain link to it (B.14)
        if sec.ref != P.KeyRef.KS:
            return None
        if sec.gen == self.ks.gen:
            return self.ks
        if self.ks_prev is not None and sec.gen == self.ks_prev.gen and self._now < self.ks_prev_until:
            return self.ks_prev
        return None

    def _ks_window(self, maid: bytes, key: P.ProtKey) -> P.ReplayWindow:
        # made at admission (_subsreq): receiving never creates state (profile B.7)
        return self.members[maid].windows[(key.ref, key.gen)]

    def _ktlsreq(self, link: Link, data: bytes) -> list:
        """B.5: KTLSREQ in clear inside TLS; answer with the seed, derive K_TLS."""
        msg = C.decode(data)
        if msg.type != M.KTLSREQ or msg.session_id != self.cfg.session_id or link.cert_der is None:
            raise C.Rmcp2Error(C.ErrorCode.UNEXPECTED_CONTROL, "KTLSREQ first, on a TLS link")
        if not self._maid_free(msg.maid, link.cert_der):
            self._count("MAID in use")
            return self._drop(link, "MAID in use")
        nonce = msg.get(C.KtlsNonce).value
        seed = self.rand(32)
        raw = P.ktls(seed, self.cfg.session_id, msg.maid, nonce, link.cert_der)
        link.maid = msg.maid
        link.ktls = P.ProtKey(P.KeyRef.KTLS, raw)
        link.hashed_ktls = P.hashed_ktls(raw, self.cfg.session_id)
        return [Send(link.conn, self._msg(M.KTLSANS, msg.maid, C.KtlsSeed(seed)).encode())]

    def _maid_free(self, maid: bytes, cert_der: bytes | None) -> bool:
        """A MAID is free, or held by a member with the same certificate and no live link
        (it lost its connection, or the SM restarted): it may subscribe again (B.13)."""
        m = self.members.get(maid)
        return m is None or (m.link not in self.links and m.cert_sha256 == hashlib.sha256(cert_der or b"").digest())

    def _subsreq(self, link: Link, msg: C.Message) -> list:
        """10.1.1.2-10.1.1.5: admission of the SMA, DMAs and RMAs."""
        self._admitting = link.conn
        result = self._admission_result(msg)
        temp = Member(msg.maid, msg.nt, link.ktls, b"", b"", b"")
        if result != C.Result.ACCEPTED:
            self._count(f"SUBSREQ refused: {result.name}")
            out = [self._seal(temp, link, self._msg(M.SUBSANS, msg.maid, C.ResultCtl(result)))]
            return out + self._drop(link, result.name)
        sid = self.cfg.session_id
        old = self.members.pop(msg.maid, None)
        if old is not None:  # re-subscription with the same certificate: the old state goes
            self.acl.pop(old.hashed_maid, None)
            self._j("drop_member", old.maid)
            self._count("re-subscription of a known MAID")
        m = Member(msg.maid, msg.nt, link.ktls, hashlib.sha256(link.cert_der or b"").digest(),
                   P.hashed_maid(sid, msg.maid), link.hashed_ktls, link=link.conn)
        m.windows[(P.KeyRef.KTLS, 0)] = link.window  # one K_TLS window across its links
        if msg.nt != N.RMA:
            m.windows[(P.KeyRef.KS, self.ks.gen)] = P.ReplayWindow()
            if self.ks_prev is not None:
                m.windows[(P.KeyRef.KS, self.ks_prev.gen)] = P.ReplayWindow()
        self.members[msg.maid] = m
        link.member = m
        m.tx_reserved = 256  # its first Seq block, journalled with the row: _seal need not write again
        self._j("put_member", m)  # before SUBSANS ACCEPTED leaves
        out = [self._seal(m, link, self._msg(M.SUBSANS, msg.maid, C.ResultCtl(C.Result.ACCEPTED)))]
        if msg.nt != N.RMA:  # Ks under K_TLS to the SMA and DMAs only (10.1.1.1, 10.1.2.1)
            out.append(self._keydeliver(m, link))
            out += self._drop(link, "Ks delivered: the TLS session closes (10.1.1.1)")
        return out

    def _admission_result(self, msg: C.Message) -> C.Result:
        if not self._maid_free(msg.maid, self.links[self._admitting].cert_der):
            return C.Result.MAID_IN_USE
        old = self.members.get(msg.maid)
        if old is not None and old.nt != msg.nt:
            return C.Result.MAID_IN_USE
        if msg.nt == N.SMA:
            sma = self.sma  # one SMA per session (10.1.1.2); the same SMA may subscribe again (B.13)
            return C.Result.NOT_ALLOWED if sma is not None and sma.maid != msg.maid else C.Result.ACCEPTED
        if msg.nt == N.DMA:
            return C.Result.ACCEPTED  # invitation is out of scope (10.1.1.3): TLS identity suffices
        if not self.open_to_rmas:
            return C.Result.NOT_ALLOWED
        # RMAs <= members: count them (O(members)) only when the session could be full
        if len(self.members) >= self.cfg.max_rmas and \
                sum(m.nt == N.RMA for m in self.members.values()) >= self.cfg.max_rmas:
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
        names = [c.value for c in msg.all(C.GkMechCapab)]
        if names and not set(names) & set(USABLE_GK_NAME):
            return self._refuse_gk_name(m, link, names)
        if self.policy is not None and has_capab:
            self._count("capabilities after the policy is set (11.2.5.1 g)")
        m.secagreq = msg
        if self.policy is None:
            self._j("put_member", m)
            if now - self.created >= self.cfg.agree_time:
                return self._select_policy(now)  # the time has passed already: select now
            return []  # answered when the Security Agree.time has passed
        return [self._seclist(m, now)]  # journals the member, SECAGREQ included, before SECLIST leaves

    def _seclist(self, m: Member, now: float) -> Send:
        assert self.policy is not None
        m.policy = "sent"
        m.policy_deadline = now + self.cfg.secagans_timeout
        self._j("put_member", m)
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
        self._j("put_session", self)
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
        self._j("put_member", m)
        return []

    def _hrsreq(self, m: Member, link: Link, msg: C.Message, now: float) -> list:
        """10.1.5: the ACL (hashed MAID, hashed K_TLS of every RMA that agreed on the policy)
        to a DMA, under Ks. Entries in a fixed order so equal ACLs give equal messages."""
        if m.nt != N.DMA or link.tls:
            self._count("HRSREQ not from a DMA on its Ks link")
            return []
        entries = tuple(sorted(hm + hk for hm, hk in self.acl.items()))[:C.MAX_ACL]
        return [self._seal(m, link, self._msg(M.HRSANS, m.maid, C.AclList(entries)))]

    def _hb(self, m: Member, link: Link, msg: C.Message, now: float) -> list:
        return []  # liveness only; the authenticated message already bound the link

    def _refuse_gk_name(self, m: Member, link: Link, names: list) -> list:
        """B.16: an SMA/DMA that can run only group-key mechanisms other than KDC cannot be
        in a Tessera session: LEAVREQ RESULT POLICY_REFUSED under its K_TLS, then it leaves."""
        listed = ", ".join(f"{C.GkName(n).name} ({int(n):#04x})" for n in names)
        log.warning("rmcp2 sm: %s %s refused: GK_NAME %s; Tessera runs KDC (0x01) only",
                    m.nt.name, m.maid.hex(), listed)
        bye = self._seal(m, link, self._msg(M.LEAVREQ, m.maid, C.ResultCtl(C.Result.POLICY_REFUSED)), m.ktls)
        return [bye] + self._refuse_policy(m, f"GK_NAME {listed} (KDC only)")

    def _refuse_policy(self, m: Member, why: str) -> list:
        """An MA that cannot run the policy leaves the session (10.1.4); an SMA/DMA leaving
        holds Ks, so Ks is replaced (figure 93: "something abnormal")."""
        self._count(f"policy refused: {why}")
        m.policy = "failed"
        out = self._remove(m, "policy refused")
        if m.nt != N.RMA:
            out += self.rekey(self._now, f"{m.nt.name} left the session: {why}")
        return out


def _best(reqs: list[C.Message], cls: type, usable: tuple) -> C.IntEnum:
    """B.13: among the usable algorithms, the one listed by most MAs, then the lowest sum of
    PREFER (an MA that did not list it counts 7), then the lowest code."""
    def score(alg) -> tuple[int, int, int]:
        held = [next((c.prefer for c in r.all(cls) if c.value == alg), None) for r in reqs]
        return (-sum(p is not None for p in held), sum(p if p is not None else _ABSENT for p in held), int(alg))
    return min(usable, key=score)
