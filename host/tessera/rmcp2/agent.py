"""Sans-IO control plane of an SMA, DMA or (host-side) RMA against the session manager
(X.603.1 Amd.1 10.1.1-10.1.5; docs/rmcp2-profile.md B.5-B.7, B.13, B.14).

The adapter calls `start()` when TLS (client certificate) is up, `plain_up()` when the SMA/DMA
has opened its plain TCP link after the SM closed TLS (10.1.1.1), `receive()` with each
complete message and `tick()` with the time; every call returns the bytes to send on the
current link. Nothing here opens sockets, reads clocks or draws randomness (`rand(n)` is
injected).

Ks (B.6, B.14): installed from KEYDELIVER (under K_TLS); the agent hashes forward when an
authenticated message names generation g+1 or g+2, keeps the previous generation for
`ks_grace` after a hash step, and drops it at once when a FRESH key arrives. ACL (10.1.5):
a DMA asks with HRSREQ every `hrs_refresh` seconds and `acl_allows()` refuses an RMA
absent from the last HRSANS.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

log = logging.getLogger("tessera.rmcp2.agent")
N, M = C.NodeType, C.MsgType


@dataclass
class AgentConfig:
    nt: C.NodeType
    session_id: int
    maid: bytes
    cert_der: bytes  # the agent's own certificate (DER): K_TLS is bound to it (B.5)
    service_user_id: bytes | None = None  # RMAs in closed groups (10.1.1.5)
    propose: C.SmaPropose | None = None  # SMA only (11.2.5.2)
    capabilities: tuple[C.Control, ...] = ()  # *_CAPAB of an SMA/DMA (11.2.5.3-5)
    # what this MA can run (B.7, B.13): a SECLIST outside these is answered per 10.1.4
    en_dec: frozenset[int] = frozenset({C.EnDecId.AES_CBC_128, C.EnDecId.AES_CTR_128})
    auth: frozenset[int] = frozenset({C.AuthId.HMAC_SHA1, C.AuthId.HMAC_MD5})
    gk_names: frozenset[int] = frozenset({C.GkName.KDC})
    hrs_refresh: float = 60.0  # B.10 HRS_REFRESH
    hb_interval: float = 30.0  # B.10 T_HB: keeps the link inside the SM's T_IDLE (60 s)
    ks_grace: float = 30.0  # B.6


@dataclass
class Agent:
    cfg: AgentConfig
    rand: Callable[[int], bytes] = os.urandom
    state: str = "new"  # new -> ktls -> subscribed -> (plain) -> policy -> ready | refused | failed
    result: C.Result | None = None
    policy: C.Message | None = None
    policy_result: C.SecReturn | None = None
    errors: Counter = field(default_factory=Counter)
    acl: frozenset[bytes] = frozenset()
    acl_updates: int = 0
    ks_deliveries: int = 0
    _nonce: bytes = field(default=b"", repr=False)
    _ktls: P.ProtKey | None = field(default=None, repr=False)
    _ks: P.ProtKey | None = field(default=None, repr=False)
    _ks_prev: P.ProtKey | None = field(default=None, repr=False)
    _ks_prev_until: float = 0.0
    _suite: P.Suite = P.BOOTSTRAP
    _seq: int = 0
    _windows: dict = field(default_factory=dict, repr=False)
    _plain: bool = False
    _next_hrs: float = 0.0
    _next_hb: float = 0.0
    _missing: list = field(default_factory=list)
    _sent_secagreq: bool = False

    # ------------------------------------------------------------------ adapter API
    @property
    def ks_gen(self) -> int:
        return self._ks.gen if self._ks else 0

    @property
    def ks(self) -> P.ProtKey | None:
        return self._ks

    @property
    def hashed_ktls(self) -> bytes:
        return P.hashed_ktls(self._ktls._raw, self.cfg.session_id) if self._ktls else b""

    def start(self, now: float) -> list[bytes]:
        """TLS is up: KTLSREQ with a fresh nonce (B.5)."""
        self._nonce = self.rand(16)
        self.state = "ktls"
        return [self._msg(M.KTLSREQ, C.KtlsNonce(self._nonce)).encode()]

    def plain_up(self, now: float) -> list[bytes]:
        """An SMA/DMA's plain TCP link to the SM is up: HB under its K_TLS binds the link to
        this MA and makes the SM resend the current Ks (B.14); SECAGREQ once."""
        self._plain = True
        out = [self._seal(self._msg(M.HB), self._ktls)]
        if not self._sent_secagreq:
            out += self._secagreq()
        return out

    def tick(self, now: float) -> list[bytes]:
        if self._ks_prev is not None and now >= self._ks_prev_until:
            self._ks_prev = None
        if self.state != "ready" or (self.cfg.nt != N.RMA and not self._plain):
            return []
        if self.cfg.nt == N.DMA and now >= self._next_hrs:
            self._next_hrs, self._next_hb = now + self.cfg.hrs_refresh, now + self.cfg.hb_interval
            return [self._seal(self._msg(M.HRSREQ), self._ks)]
        if now >= self._next_hb:  # HB (B.3) on its link: liveness, and the SM's T_IDLE stays unexpired
            self._next_hb = now + self.cfg.hb_interval
            return [self._seal(self._msg(M.HB), self._link_key())]
        return []

    def acl_allows(self, hashed_maid: bytes, hashed_ktls: bytes) -> bool:
        """10.1.5: a DMA shall reject an RMA that is not in its ACL."""
        if bytes(hashed_maid) + bytes(hashed_ktls) in self.acl:
            return True
        self._count("RMA not in the ACL")
        return False

    def receive(self, data: bytes, now: float) -> list[bytes]:
        try:
            return self._receive(bytes(data), now)
        except C.Rmcp2Error as e:
            self._count(e.code.name)
            return []

    # ------------------------------------------------------------------ internals
    def _count(self, reason: str) -> None:
        self.errors[reason] += 1
        n = self.errors[reason]
        if n in (1, 10, 100, 1000) or n % 10000 == 0:
            log.warning("rmcp2 %s: %s (%d so far)", self.cfg.nt.name, reason, n)

    def _msg(self, t: C.MsgType, *controls: C.Control) -> C.Message:
        return C.Message(t, self.cfg.nt, self.cfg.session_id, self.cfg.maid, tuple(controls))

    def _seal(self, msg: C.Message, key: P.ProtKey | None) -> bytes:
        self._seq += 1
        return P.seal(msg.encode(), key, self._suite, self._seq, self.rand(16))

    def _link_key(self) -> P.ProtKey:
        """Table 11 / B.7: an RMA talks under K_TLS, an SMA/DMA under Ks once it has it."""
        return self._ktls if self.cfg.nt == N.RMA or not self._plain else self._ks

    def _lookup(self, maid: bytes, sec: P.SecHeader):
        if maid != self.cfg.maid:  # the SM's messages carry the recipient's MAID (B.13)
            return None
        if sec.ref == P.KeyRef.KTLS:
            return self._ktls
        if sec.ref != P.KeyRef.KS or self._ks is None or self.cfg.nt == N.RMA:
            return None
        if sec.gen == self._ks.gen:
            return self._ks
        if self._ks_prev is not None and sec.gen == self._ks_prev.gen:
            return self._ks_prev
        k, g = self._ks, self._ks.gen
        for _ in range(2):  # hash forward at most 2 steps (B.6); committed only after the Tag
            g = P.next_gen(g)
            k = P.ProtKey(P.KeyRef.KS, P.ks_next(k._raw, self.cfg.session_id, g), g)
            if g == sec.gen:
                return k
        return None

    def _window(self, maid: bytes, key: P.ProtKey) -> P.ReplayWindow:
        w = self._windows.get((key.ref, key.gen))
        return w if w is not None else P.ReplayWindow()  # kept only if the Tag verifies

    def _receive(self, data: bytes, now: float) -> list[bytes]:
        if self.state == "ktls":
            return self._ktlsans(data)
        if self._ktls is None:
            raise C.Rmcp2Error(C.ErrorCode.UNEXPECTED_CONTROL, "nothing expected yet")
        _, sec = P.peek(data)
        seen: dict = {}

        def keys(maid, s):
            seen["key"] = self._lookup(maid, s)
            return seen["key"]

        def windows(maid, key):
            seen["win"] = self._window(maid, key)
            return seen["win"]
        msg = C.decode(P.unseal(data, self._suite, keys, windows))
        key = seen["key"]
        self._windows[(key.ref, key.gen)] = seen["win"]
        if msg.session_id != self.cfg.session_id or msg.nt != N.SM:
            self._count("not from the SM of this session")
            return []
        if key.ref == P.KeyRef.KS and key is not self._ks and key is not self._ks_prev:
            self._install_ks(key, hashed=True, now=now)  # B.6: a hash step seen on the wire
        handler = {M.SUBSANS: self._subsans, M.KEYDELIVER: self._keydeliver, M.SECLIST: self._seclist,
                   M.SECALGANS: self._secalgans, M.HRSANS: self._hrsans, M.HB: self._nothing,
                   M.LEAVREQ: self._leavreq}.get(msg.type)
        if handler is None:
            self._count(f"{msg.type.name} not handled by an MA")
            return []
        return handler(msg, key, now)

    def _ktlsans(self, data: bytes) -> list[bytes]:
        msg = C.decode(data)
        if msg.type != M.KTLSANS or msg.maid != self.cfg.maid or msg.session_id != self.cfg.session_id:
            raise C.Rmcp2Error(C.ErrorCode.UNEXPECTED_CONTROL, "KTLSANS expected")
        raw = P.ktls(msg.get(C.KtlsSeed).value, self.cfg.session_id, self.cfg.maid, self._nonce, self.cfg.cert_der)
        self._ktls = P.ProtKey(P.KeyRef.KTLS, raw)
        self._windows[(P.KeyRef.KTLS, 0)] = P.ReplayWindow()
        self.state = "subscribing"
        sui = (C.ServUserIdent(self.cfg.service_user_id),) if self.cfg.service_user_id else ()
        return [self._seal(self._msg(M.SUBSREQ, *sui), self._ktls)]

    def _subsans(self, msg: C.Message, key, now: float) -> list[bytes]:
        self.result = msg.get(C.ResultCtl).value
        if self.result != C.Result.ACCEPTED:
            self.state = "refused"
            return []
        self.state = "subscribed"
        if self.cfg.nt == N.RMA:  # RMAs agree on the policy over the TLS link (figure 95)
            return self._secagreq()
        return []  # SMA/DMA: KEYDELIVER follows, then the SM closes TLS

    def _secagreq(self) -> list[bytes]:
        ctls: tuple = ()
        if self.cfg.nt != N.RMA:
            ctls = ((self.cfg.propose,) if self.cfg.nt == N.SMA else ()) + tuple(self.cfg.capabilities)
        self._sent_secagreq = True
        self.state = "policy"
        return [self._seal(self._msg(M.SECAGREQ, *ctls), self._link_key())]

    def _install_ks(self, key: P.ProtKey, hashed: bool, now: float) -> None:
        if hashed and self._ks is not None:
            self._ks_prev, self._ks_prev_until = self._ks, now + self.cfg.ks_grace
        else:
            self._ks_prev = None  # FRESH: the old key is dead at once (B.14)
        self._ks = key
        self._windows.setdefault((P.KeyRef.KS, key.gen), P.ReplayWindow())

    def _keydeliver(self, msg: C.Message, key, now: float) -> list[bytes]:
        info = msg.get(C.KeyInfo)
        if info.key_type != C.KeyType.KS or self.cfg.nt == N.RMA or key.ref != P.KeyRef.KTLS:
            self._count("KEYDELIVER: only Ks, only to an SMA/DMA, only under its K_TLS")
            return []
        d = C.KeyData.decode(info.key_data)
        if self._ks is not None and d.gen == self._ks.gen and d.key == self._ks._raw:
            return []  # the key it holds (a resynchronisation that found nothing to do)
        self._install_ks(P.ProtKey(P.KeyRef.KS, d.key, d.gen), hashed=False, now=now)
        self._windows.pop((P.KeyRef.KS, d.gen), None)
        self._windows[(P.KeyRef.KS, d.gen)] = P.ReplayWindow()
        self.ks_deliveries += 1
        return []

    def _seclist(self, msg: C.Message, key, now: float) -> list[bytes]:
        """10.1.4: configure the policy; SECALGREQ for what this MA lacks."""
        self.policy = msg
        want = [(C.GkMechDeliver, msg.get(C.GkMech).gk_name, self.cfg.gk_names),
                (C.ConEnDecDeliver, msg.get(C.ConEnDecAlg).value, self.cfg.en_dec),
                (C.GkEnDecDeliver, msg.get(C.GkEnDecAlg).value, self.cfg.en_dec),
                (C.AuthAlgDeliver, msg.get(C.AuthAlg).value, self.cfg.auth)]
        self._missing = [cls(v) for cls, v, have in want if int(v) not in have]
        if self._missing:
            return [self._seal(self._msg(M.SECALGREQ, *self._missing), self._link_key())]
        return self._secagans(C.SecReturn.OK, msg)

    def _secalgans(self, msg: C.Message, key, now: float) -> list[bytes]:
        # Tessera never transfers code (B.13): even AVAILABLE cannot be configured here.
        self._count("policy needs an algorithm this MA cannot run")
        return self._secagans(C.SecReturn.FAILED_CONFIGURATION, self.policy)

    def _secagans(self, ret: C.SecReturn, lst: C.Message) -> list[bytes]:
        out = [self._seal(self._msg(M.SECAGANS, C.SecReturnCtl(ret)), self._link_key())]
        self.policy_result = ret
        if ret == C.SecReturn.OK:  # the link moves to the agreed suite after SECAGANS (B.7)
            self._suite = P.Suite(lst.get(C.GkEnDecAlg).value, lst.get(C.AuthAlg).value)
            self.state = "ready"
        else:
            self.state = "failed"
        return out

    def _hrsans(self, msg: C.Message, key, now: float) -> list[bytes]:
        if self.cfg.nt != N.DMA or key.ref != P.KeyRef.KS:
            self._count("HRSANS: only to a DMA, only under Ks")
            return []
        self.acl = frozenset(msg.get(C.AclList).entries)  # a DMA replaces its ACL (B.8)
        self.acl_updates += 1
        return []

    def _leavreq(self, msg: C.Message, key, now: float) -> list[bytes]:
        self.state = "expelled"
        self._ks = self._ks_prev = None
        return []

    def _nothing(self, msg: C.Message, key, now: float) -> list[bytes]:
        return []
