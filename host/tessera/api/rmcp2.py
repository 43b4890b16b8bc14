"""Secure RMCP-2 (ITU-T X.603.1 Amd.1): the session manager (SM) and the control planes of
the sender, dedicated and (host) receiver agents, with results as values and refusals as
exceptions carrying the protocol's result code.

    make_sm_pki("pki", ["sm", "sma", "dma1", "rma1"])
    with SessionManager.open("sm.sqlite", create=SmSettings(0x5E55_0001)) as sm:
        sm.add_service_user("viewer-1")                  # closed groups (10.1.1.5)
        with sm.serve("pki") as ep:                      # TLS admission + Ks link, in a thread
            with MaAgent("sma", ep, sm.session_id, "pki", group="closed") as sma:
                print(sma.start())                       # Admission(role='sma', ...)
            print(sm.status().acl)

`AsyncSessionManager` and `AsyncMaAgent` are the same API for asyncio code. A fresh Ks and
the truncation of a DMA go to the SM that serves the store, in this process or in another
one (`tessera sm serve`), as request rows it carries out on its next tick (docs/rmcp2.md,
"Operator requests"). Key material never appears in a value, a message or a log line.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera.api._sync import _ThreadLoop
from tessera.errors import TesseraError
from tessera.rmcp2 import codec as _C

TLS_PORT, PLAIN_PORT, TREE_PORT = 26030, 26031, 26032  # profile B.10 (defined by this project)
SubsResult = _C.Result
"""SUBSANS RESULT codes: Table 23 (0x41, 0x42) and those of profile B.9."""
SecReturn = _C.SecReturn
"""SEC_RETURN codes (Table 24)."""
Role = Literal["sma", "dma", "rma"]
_ROLES = {"sma": _C.NodeType.SMA, "dma": _C.NodeType.DMA, "rma": _C.NodeType.RMA}


# ---------------------------------------------------------------------------- errors
class SmError(TesseraError):
    """A session manager operation failed: the store, the session, or an operator request."""


class NoSession(SmError):
    """No session in the store at that path (and `create=` was not given)."""


class SmNotServing(SmError):
    """An operator request (fresh Ks, truncate) was not taken up: no SM serves the store."""


class RequestRefused(SmError):
    """The serving SM refused an operator request (e.g. no such SMA/DMA to truncate)."""


class AgentError(TesseraError):
    """An agent could not take part: the SM unreachable, TLS refused, no answer in time."""


class SubscriptionRefused(AgentError):
    """The SM answered SUBSREQ with a refusal. `code` is the RESULT (a SubsResult), e.g.
    SERV_USER_ID_MISSING (0x41) or SERV_USER_ID_NOT_RECOGNIZED (0x42) in a closed group."""

    def __init__(self, code: _C.Result) -> None:
        self.code = code
        super().__init__(f"the SM refused the subscription: {code.name} ({int(code):#04x})")


class PolicyRefused(AgentError):
    """This agent cannot run the agreed security policy: it answered SECAGANS with
    `sec_return` (FAILED_CONFIGURATION) and left the session; `code` is POLICY_REFUSED."""

    def __init__(self, sec_return: _C.SecReturn | None) -> None:
        self.code = _C.Result.POLICY_REFUSED
        self.sec_return = sec_return
        what = sec_return.name if sec_return is not None else "no SECLIST"
        super().__init__(f"this MA cannot run the agreed security policy (SECAGANS {what})")


# ---------------------------------------------------------------------------- values
@dataclass(frozen=True)
class SmSettings:
    """A new session: its 64-bit ID and the settings of clause 10.1.4 / profile B.10."""

    session_id: int
    host: str = "127.0.0.1"  # IPv4 address in the SM's MAID (B.1)
    port: int = TLS_PORT  # port in the SM's MAID
    agree_time: float = 10.0  # Security Agree.time (10.1.4.1), seconds
    ks_period: int = 3600  # seconds between Ks hash steps (B.6)
    max_rmas: int = 2000  # RMAs admitted (B.8)


@dataclass(frozen=True)
class SmEndpoint:
    """Where a serving SM listens: TLS admission and the plain Ks link (B.10)."""

    host: str
    tls_port: int
    plain_port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.tls_port}"


@dataclass(frozen=True)
class AclEntry:
    """One ACL entry (10.1.5): hashed MAID and hashed K_TLS of an admitted RMA (16 bytes each).
    The hashed K_TLS is the RMA's Annex E secret W (profile B.11): it is kept out of repr, and
    a script should not print or log it."""

    hashed_maid: bytes
    hashed_ktls: bytes = field(repr=False)


@dataclass(frozen=True)
class MemberInfo:
    maid: bytes
    role: str  # "SMA", "DMA", "RMA"
    policy: str  # "none", "sent", "ok", "failed": its part in the policy agreement
    hashed_maid: bytes = field(repr=False)

    @property
    def address(self) -> str:
        """The MAID as IPv4:port/instance (B.1)."""
        ip, port, inst = _C.parse_maid(self.maid)
        return f"{ip}:{port}/{inst}"


@dataclass(frozen=True)
class PolicyInfo:
    """The agreed security policy (Table 10), by name."""

    group: str  # "open" or "closed"
    gk_mecha: str
    gk_name: str
    content_alg: str
    gk_alg: str
    auth: str


@dataclass(frozen=True)
class SmStatus:
    session_id: int
    open_to_rmas: bool
    policy: PolicyInfo | None
    ks_gen: int
    ks_mode: str  # "FRESH" or "HASHED": how the current Ks generation came about (B.6)
    members: tuple[MemberInfo, ...]
    acl: tuple[AclEntry, ...]
    service_user_ids: int


@dataclass(frozen=True)
class Rekeyed:
    ks_gen: int
    delivered: int  # SMA/DMAs the new Ks was sent to at once (the others get it when they reconnect)


@dataclass(frozen=True)
class Truncated:
    maid: bytes
    role: str
    ks_gen: int  # the fresh Ks that replaced the one the truncated MA held
    delivered: int


@dataclass(frozen=True)
class Admission:
    role: str
    maid: bytes
    result: _C.Result  # ACCEPTED
    policy_result: _C.SecReturn | None  # OK
    ks_gen: int  # 0 for an RMA (Ks goes to the SMA and DMAs only)


@dataclass(frozen=True)
class AgentStatus:
    role: str
    state: str  # new, ktls, subscribing, subscribed, policy, ready, refused, failed, expelled
    result: _C.Result | None
    policy_result: _C.SecReturn | None
    ks_gen: int
    ks_deliveries: int
    acl: tuple[AclEntry, ...]  # a DMA's ACL from the last HRSANS
    acl_updates: int
    errors: dict[str, int]


@dataclass(frozen=True)
class TreeStatus:
    """A DMA's tree service (docs/rmcp2.md, "Part 2: the DMA's tree service")."""

    port: int
    members: tuple[bytes, ...]  # MAIDs of the joined RMAs, each with its control link open
    kg_gen: int
    rotations: dict[str, int]  # Kg re-keys so far: forward, backward, periodic
    left: dict[str, int]  # members gone, by why: leavreq, closed, heartbeat, expelled, slow, dma_stop
    join_errors: dict[str, int]
    content_udp: int = 0  # the relay's content ports (B.17), given to the SMA in CONTENT_ADDR
    content_tcp: int = 0
    subscribers: tuple[bytes, ...] = ()  # members that announced a content address (B.4 CONTENT_ADDR)
    upstream: str = "none"  # the link to the SMA: none (no --sma), down, probing, bound, refused
    kc_held: tuple[int, ...] = ()  # Kc generations received from the SMA (current, next)
    relay: dict[str, int] = field(default_factory=dict)  # the relay's counters
    is_hma: bool = False  # this DMA multicasts for its multicast-enabled area (B.18)
    hma_state: str = "none"  # none (no --mcast), soliciting, follower, waiting, hma, stopped
    parent: str = "none"  # the link to a parent DMA (B.15 "Child DMA"): none (no --parent), down, probing, bound, refused
    children: tuple[bytes, ...] = ()  # child DMAs whose control link to this DMA is up


@dataclass(frozen=True)
class SourceStatus:
    """The SMA's content source (docs/rmcp2.md, "Content: SMA -> DMA -> RMA")."""

    port: int  # the SMA's tree port DMAs link to
    dmas: tuple[bytes, ...]  # MAIDs of the DMAs bound now
    kc_gen: int  # the Kc content is encrypted under now
    kc_next: int  # the Kc announced and not yet in use (0: none)
    urgent_rotations: int  # Kc rotations asked by KCREQ
    stream_sent: int
    objects_sent: int
    sender: dict[str, int]  # udp_sent, udp_dropped, tcp_bytes, tcp_connect_failed, ...


def make_sm_pki(directory: str | Path, names: list[str], days: int = 365) -> dict[str, Path]:
    """A CA (`ca.pem`) and, per name, an ECDSA P-256 certificate `<name>.pem` with its key
    `<name>.key` (mode 0600) for mutual TLS (profile B.10). Returns name -> certificate path."""
    from tessera.rmcp2.certs import make_pki

    return make_pki(directory, names, days=days)


def _ident(ident: bytes | str) -> bytes:
    b = ident.encode() if isinstance(ident, str) else bytes(ident)
    if not 1 <= len(b) <= 253:
        raise SmError("a service user identifier is 1..253 bytes (profile A.6)")
    return b


def _policy(p: list | None) -> PolicyInfo | None:
    if not p:
        return None
    return PolicyInfo(_C.GpAttribute(p[0]).name.lower(), _C.GkMecha(p[1]).name, _C.GkName(p[2]).name,
                      _C.EnDecId(p[3]).name, _C.EnDecId(p[4]).name, _C.AuthId(p[5]).name)


def _cert_sha256(path: str | Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise SmError(f"cannot read the certificate {path}: {e}") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# ---------------------------------------------------------------------------- the SM
class _SmBase:
    """What both SM handles share: the store, status, identifiers, operator requests."""

    def __init__(self, store: Any, key: bytes | None) -> None:
        self._store = store
        self._key = key
        self.path: Path = store.path

    @classmethod
    def open(cls, db: str | Path | None = None, create: SmSettings | None = None, *, key: bytes | None = None,
             session_required: bool = True):
        """Open the SM store at `db` (default $TESSERA_VAR/rmcp2-sm.sqlite). `create` makes
        the session when the store holds none (its bootstrap Ks journalled at once); a store
        that holds another session is refused. `session_required=False` opens (or makes) a
        store without a session, for the content provider's identifiers registered before
        the session is created. `key`: the 32-byte storage key, else TESSERA_SM_KEY or
        `<db>.key` (made 0600)."""
        from tessera.rmcp2 import sm as S
        from tessera.rmcp2.store import SmStore, default_db, open_engine

        path = Path(db) if db else default_db()
        if create is None and session_required and not path.exists():
            raise NoSession(f"no SM database at {path} (`tessera sm serve --session-id ...` or, in a script, "
                            "SessionManager.open(path, create=SmSettings(...)) makes one)")
        try:
            store = SmStore(path, key=key)
        except TesseraError as e:
            raise SmError(str(e)) from None
        try:
            held = store.session()
            if held is None and create is None:
                if session_required:
                    raise NoSession(f"{path} holds no session")
            elif held is None:
                try:
                    maid = _C.make_maid(create.host, create.port, 1)
                except ValueError as e:
                    raise SmError(str(e)) from None
                cfg = S.SmConfig(create.session_id, maid, agree_time=create.agree_time, ks_period=create.ks_period,
                                 max_rmas=create.max_rmas)
                open_engine(store, cfg, now=time.time())
            elif create is not None and create.session_id != held["session_id"]:
                raise SmError(f"{path} holds session {held['session_id']:#x}, not {create.session_id:#x}")
        except BaseException:
            store.close()
            raise
        return cls(store, key)

    @property
    def session_id(self) -> int:
        held = self._store.session()
        if held is None:
            raise NoSession(f"{self.path} holds no session yet")
        return int(held["session_id"])

    def status(self) -> SmStatus:
        """The session as the store holds it (a serving SM journals every change at once)."""
        v = self._store.overview()
        st = v["state"] or {}
        gen, mode, _ = v["ks"] or (0, int(_C.KeyMode.FRESH), 0.0)
        members = tuple(MemberInfo(m, _C.NodeType(nt).name, pol, hm) for m, nt, pol, hm in v["members"])
        return SmStatus(self.session_id, bool(st.get("open")), _policy(st.get("policy")), gen,
                        _C.KeyMode(mode).name, members, tuple(AclEntry(a, b) for a, b in v["acl"]),
                        len(self._store.service_user_ids()))

    # ------------------------------------------------------------ service user identifiers
    def add_service_user(self, ident: bytes | str) -> None:
        """Register a service user identifier (10.1.1.5; text is UTF-8). A serving SM picks it
        up within a tick."""
        try:
            self._store.add_service_user_id(_ident(ident))
        except TesseraError as e:
            raise SmError(str(e)) from None

    def service_users(self) -> list[bytes]:
        return sorted(self._store.service_user_ids())

    def remove_service_user(self, ident: bytes | str) -> bool:
        """Withdraw an identifier (RMAs admitted with it stay); False if it was not registered."""
        return self._store.remove_service_user_id(_ident(ident))

    # ------------------------------------------------------------ operator requests
    def _ask(self, op: str, arg: dict) -> int:
        try:
            return self._store.add_request(op, arg, time.time())
        except TesseraError as e:
            raise SmError(str(e)) from None

    def _answer(self, rid: int) -> dict | None:
        got = self._store.request(rid)
        if got is None or got[0] == "pending":
            return None
        self._store.withdraw_request(rid, answered=True)
        state, res = got
        if state != "done":
            raise RequestRefused((res or {}).get("error", "refused"))
        return res or {}

    def _polls(self, rid: int, op: str, timeout: float) -> Generator[float, None, dict]:
        """Look for the answer to request `rid`: yields the pause before the next look (the
        sync and async waits sleep it their way) and returns the answer. After `timeout` a
        request still pending is withdrawn (SmNotServing); one the SM took up meanwhile is
        answered within its tick."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self._answer(rid)
            if r is not None:
                return r
            yield 0.05
        if self._store.withdraw_request(rid):
            raise SmNotServing(f"no SM serving {self.path} took up the {op} request within {timeout:g} s "
                               "(is `tessera sm serve` running on this store?)")
        for _ in range(100):
            r = self._answer(rid)
            if r is not None:
                return r
            yield 0.05
        raise SmNotServing(f"the SM took up the {op} request but did not answer")

    @staticmethod
    def _truncate_arg(maid: bytes | None, certificate: str | Path | None) -> dict:
        if (maid is None) == (certificate is None):
            raise SmError("name the SMA/DMA to truncate by its MAID or by its certificate")
        if maid is not None:
            if len(maid) != 8:
                raise SmError("a MAID is 8 bytes (B.1)")
            return {"maid": bytes(maid).hex()}
        return {"cert_sha256": _cert_sha256(certificate)}

    @staticmethod
    def _rekeyed(r: dict) -> Rekeyed:
        return Rekeyed(r["ks_gen"], r["delivered"])

    @staticmethod
    def _truncated(r: dict) -> Truncated:
        return Truncated(bytes.fromhex(r["maid"]), r["role"], r["ks_gen"], r["delivered"])

    def _close_store(self) -> None:
        self._store.close()


def _server(store_path: Path, key: bytes | None, pki_dir: str | Path, name: str, host: str, tls_port: int,
            plain_port: int, max_conns: int, hold: bool, tick: float):
    from tessera.rmcp2.certs import pki_paths, server_context
    from tessera.rmcp2.server import Limits, SmServer
    from tessera.rmcp2.store import SmStore, open_engine

    cert, kf, ca = pki_paths(pki_dir, name)
    ctx = server_context(cert, kf, ca)
    store = SmStore(store_path, key=key)  # the server's own connection: it closes it when it stops
    try:
        engine = open_engine(store, None, now=time.time())
    except BaseException:
        store.close()
        raise
    return SmServer(engine, store, ctx, host, tls_port, plain_port, Limits(max_conns=max_conns, tick=tick),
                    auto_open=not hold)


class AsyncSessionManager(_SmBase):
    """The SM for asyncio code: `serve()` runs it in the current event loop."""

    def __init__(self, store: Any, key: bytes | None) -> None:
        super().__init__(store, key)
        self._srv = None

    async def serve(self, pki_dir: str | Path, name: str = "sm", host: str = "127.0.0.1", tls_port: int = 0,
                    plain_port: int = 0, *, max_conns: int = 1024, hold: bool = False,
                    tick: float = 0.5) -> SmEndpoint:
        """Start serving: mutual TLS admission on `tls_port` and the SMA/DMAs' Ks link on
        `plain_port` (0: a free port each), with `pki_dir`/<name>.pem as the SM's certificate.
        The session opens to RMAs when the policy is set, unless `hold`. Returns the ports."""
        if self._srv is not None:
            raise SmError("this SM is serving already")
        try:
            srv = _server(self.path, self._key, pki_dir, name, host, tls_port, plain_port, max_conns, hold, tick)
        except TesseraError as e:
            raise SmError(str(e)) from None
        try:
            await srv.start()
        except OSError as e:
            srv.store.close()
            raise SmError(f"cannot listen on {host}: {e}") from None
        self._srv = srv
        return SmEndpoint(host, srv.tls_port, srv.plain_port)

    @property
    def endpoint(self) -> SmEndpoint | None:
        s = self._srv
        return None if s is None else SmEndpoint(s.host, s.tls_port, s.plain_port)

    async def serve_forever(self, *, signals: bool = True) -> None:
        """Wait until `stop()` (or SIGTERM/SIGINT when `signals`), then stop serving."""
        import signal

        if self._srv is None:
            raise SmError("not serving (call serve() first)")
        if signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._srv.stop)
        await self._srv.serve_until_stopped()
        self._srv = None

    async def stop(self) -> None:
        """Stop serving: listeners and links closed; every acknowledged change is in the store."""
        srv, self._srv = self._srv, None
        if srv is not None:
            await srv.close()

    async def rekey(self, timeout: float = 10.0) -> Rekeyed:
        """A fresh random Ks, sent by KEYDELIVER to the SMA and every DMA (figure 93)."""
        return self._rekeyed(await self._wait(self._ask("rekey", {}), "rekey", timeout))

    async def truncate(self, maid: bytes | None = None, *, certificate: str | Path | None = None,
                       timeout: float = 10.0) -> Truncated:
        """Expel an SMA/DMA (by MAID, or by the certificate it was admitted with) and replace
        Ks, so that the key it holds stops working at once (10.1.2.1)."""
        rid = self._ask("truncate", self._truncate_arg(maid, certificate))
        return self._truncated(await self._wait(rid, "truncate", timeout))

    async def _wait(self, rid: int, op: str, timeout: float) -> dict:
        polls = self._polls(rid, op, timeout)
        try:
            while True:
                await asyncio.sleep(next(polls))
        except StopIteration as answer:
            return answer.value

    async def close(self) -> None:
        await self.stop()
        self._close_store()

    async def __aenter__(self) -> AsyncSessionManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Serving:
    """A served SM running in its own thread (`SessionManager.serve()`); a context manager."""

    def __init__(self, asm: AsyncSessionManager, loop: _ThreadLoop, endpoint: SmEndpoint) -> None:
        self._asm, self._loop, self.endpoint = asm, loop, endpoint

    def stop(self) -> None:
        if self._loop is not None:
            try:
                self._loop.call(self._asm.stop(), 60)
            finally:
                self._loop.close()
                self._loop = None

    def __enter__(self) -> SmEndpoint:
        return self.endpoint

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SessionManager(_SmBase):
    """The SM for plain synchronous scripts; `serve()` runs it in a thread."""

    def __init__(self, store: Any, key: bytes | None) -> None:
        super().__init__(store, key)
        self._serving: Serving | None = None

    def serve(self, pki_dir: str | Path, name: str = "sm", host: str = "127.0.0.1", tls_port: int = 0,
              plain_port: int = 0, *, max_conns: int = 1024, hold: bool = False, tick: float = 0.5) -> Serving:
        """As AsyncSessionManager.serve, in a background thread: `with sm.serve(pki) as ep:`
        serves until the block ends (or `.stop()`)."""
        if self._serving is not None and self._serving._loop is not None:
            raise SmError("this SM is serving already")
        asm = AsyncSessionManager(self._store, self._key)
        loop = _ThreadLoop("tessera-sm")
        try:
            ep = loop.call(asm.serve(pki_dir, name, host, tls_port, plain_port, max_conns=max_conns, hold=hold,
                                     tick=tick), 60)
        except BaseException:
            loop.close()
            raise
        self._serving = Serving(asm, loop, ep)
        return self._serving

    def rekey(self, timeout: float = 10.0) -> Rekeyed:
        """A fresh random Ks, sent by KEYDELIVER to the SMA and every DMA (figure 93)."""
        return self._rekeyed(self._wait(self._ask("rekey", {}), "rekey", timeout))

    def truncate(self, maid: bytes | None = None, *, certificate: str | Path | None = None,
                 timeout: float = 10.0) -> Truncated:
        """Expel an SMA/DMA (by MAID or certificate) and replace Ks (10.1.2.1)."""
        rid = self._ask("truncate", self._truncate_arg(maid, certificate))
        return self._truncated(self._wait(rid, "truncate", timeout))

    def _wait(self, rid: int, op: str, timeout: float) -> dict:
        polls = self._polls(rid, op, timeout)
        try:
            while True:
                time.sleep(next(polls))
        except StopIteration as answer:
            return answer.value

    def close(self) -> None:
        if self._serving is not None:
            self._serving.stop()
        self._close_store()

    def __enter__(self) -> SessionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- agents
def _host_port(sm: SmEndpoint | str, plain_port: int | None) -> tuple[str, int, int]:
    if isinstance(sm, SmEndpoint):
        return sm.host, sm.tls_port, plain_port or sm.plain_port
    from tessera import cliargs

    try:
        host, port = cliargs.host_port(sm, "the SM address")
    except TesseraError as e:
        raise AgentError(str(e)) from None
    return host, port, plain_port or PLAIN_PORT


class AsyncMaAgent:
    """One agent's control plane against the SM, for asyncio code: `role` "sma" (proposes the
    policy: `group`, `gk_mecha`, `content_alg`), "dma" (holds Ks and the ACL) or "rma" (a host
    receiver; `service_user_id` for closed groups). Its certificate is `pki_dir`/<name>.pem
    (name defaults to the role). `sm` is an SmEndpoint or "HOST:PORT" of the TLS listener
    (then `plain_port` names the Ks link, default 26031)."""

    def __init__(self, role: Role, sm: SmEndpoint | str, session_id: int, pki_dir: str | Path,
                 name: str | None = None, *, plain_port: int | None = None, address: str = "127.0.0.1",
                 port: int = TREE_PORT, instance: int = 1, service_user_id: bytes | str | None = None,
                 group: Literal["open", "closed"] = "open", gk_mecha: int = int(_C.GkMecha.PERIODIC),
                 content_alg: int = int(_C.EnDecId.AES_CTR_128), tick: float = 0.5, hrs_refresh: float = 60.0,
                 retry: float = 1.0) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from tessera.rmcp2.agent import Agent, AgentConfig
        from tessera.rmcp2.certs import client_context, pki_paths
        from tessera.rmcp2.server import AgentRunner

        if role not in _ROLES:
            raise AgentError(f"role is one of {', '.join(_ROLES)}, not {role!r}")
        nt = _ROLES[role]
        self.role = role
        self.name = name or role
        host, tls_port, pport = _host_port(sm, plain_port)
        try:
            cert, key, ca = pki_paths(pki_dir, self.name)
            der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
            ctx = client_context(cert, key, ca)
        except (TesseraError, ValueError) as e:
            raise AgentError(str(e)) from None
        try:
            propose = None
            if nt == _C.NodeType.SMA:
                propose = _C.SmaPropose(_C.GpAttribute.CLOSED if group == "closed" else _C.GpAttribute.OPEN,
                                        _C.GkMecha(gk_mecha), _C.EnDecId(content_alg))
            maid = _C.make_maid(address, port, instance)
        except ValueError as e:
            raise AgentError(str(e)) from None
        caps: tuple = ()
        if nt != _C.NodeType.RMA:  # what Tessera's SMA/DMAs run, with preferences (11.2.5.3-5)
            caps = (_C.GkMechCapab(_C.GkName.KDC, 1), _C.EnDecCapab(_C.EnDecId.AES_CBC_128, 1),
                    _C.EnDecCapab(_C.EnDecId.AES_CTR_128, 2), _C.AuthAlgCapab(_C.AuthId.HMAC_SHA1, 1),
                    _C.AuthAlgCapab(_C.AuthId.HMAC_MD5, 2))
        sui = None if service_user_id is None else _ident(service_user_id)
        cfg = AgentConfig(nt, session_id, maid, der, service_user_id=sui, propose=propose, capabilities=caps,
                          hrs_refresh=hrs_refresh)
        self.sm_address = f"{host}:{tls_port}"
        self._runner = AgentRunner(Agent(cfg), ctx, host, tls_port, pport, tick=tick,
                                   retry=retry)
        self._task: asyncio.Task | None = None
        self._tree: Any = None  # dmatree.DmaService once start_tree() ran
        self._source: AsyncContentSource | None = None  # an SMA's, once start_source() ran

    @property
    def maid(self) -> bytes:
        return self._runner.agent.cfg.maid

    @property
    def acl_entry(self) -> AclEntry | None:
        """An admitted RMA's entry as the SM puts it in every DMA's ACL (10.1.5)."""
        from tessera.rmcp2 import protect as P

        a = self._runner.agent
        if a.cfg.nt != _C.NodeType.RMA or not a.hashed_ktls:
            return None
        return AclEntry(P.hashed_maid(a.cfg.session_id, a.cfg.maid), a.hashed_ktls)

    def status(self) -> AgentStatus:
        a = self._runner.agent
        acl = tuple(AclEntry(e[:16], e[16:]) for e in sorted(a.acl))
        return AgentStatus(self.role, a.state, a.result, a.policy_result, a.ks_gen, a.ks_deliveries, acl,
                           a.acl_updates, dict(a.errors))

    def acl_allows(self, entry: AclEntry) -> bool:
        """A DMA's check (10.1.5): is this RMA in its ACL? A refusal is counted."""
        return self._runner.agent.acl_allows(entry.hashed_maid, entry.hashed_ktls)

    def _settled(self, st: AgentStatus) -> bool:
        return st.state in ("ready", "refused", "failed", "expelled")

    def _raise_for(self, st: AgentStatus) -> None:
        if st.state == "refused":
            raise SubscriptionRefused(st.result or _C.Result.REJECTED)
        if st.state == "failed":
            raise PolicyRefused(st.policy_result)

    def _task_error(self) -> None:
        t = self._task
        if t is not None and t.done() and not t.cancelled() and t.exception() is not None:
            e = t.exception()
            raise AgentError(f"{self.role} {self.name}: cannot reach the SM at {self.sm_address}: "
                             f"{e or type(e).__name__}") from None

    async def begin(self) -> None:
        """Start the control plane in a task of this loop without waiting (`start()` waits):
        an SMA and its DMAs begun together all take part in the policy agreement."""
        if self._task is None:
            self._task = asyncio.create_task(self._runner.run())

    async def start(self, timeout: float = 30.0) -> Admission:
        """Run the control plane (in a task of this loop) until admitted and agreed on the
        policy; it goes on in the background (Ks link, ACL refresh) until `close()`.
        Raises SubscriptionRefused / PolicyRefused / AgentError."""
        await self.begin()
        st = await self.wait_for(self._settled, timeout, "admission")
        self._raise_for(st)
        if st.state != "ready":
            raise AgentError(f"{self.role} {self.name}: {st.state} (the SM expelled it)")
        return Admission(self.role, self.maid, st.result or _C.Result.ACCEPTED, st.policy_result, st.ks_gen)

    async def wait_for(self, cond: Callable[[AgentStatus], bool], timeout: float = 30.0,
                       what: str = "the condition") -> AgentStatus:
        """Wait until `cond(status())` holds; AgentError on timeout or when the agent stopped."""
        end = time.monotonic() + timeout
        while True:
            st = self.status()
            if cond(st):
                return st
            self._task_error()
            if self._task is not None and self._task.done():
                self._raise_for(st)
                raise AgentError(f"{self.role} {self.name}: stopped ({st.state}) before {what}")
            if time.monotonic() > end:
                raise AgentError(f"{self.role} {self.name}: no {what} within {timeout:g} s (state {st.state})")
            await asyncio.sleep(0.05)

    async def run(self, on_change: Callable[[AgentStatus], None] | None = None) -> None:
        """Run until `stop()` or the end of its links (the `tessera sma/dma/rma` commands);
        `on_change` sees the status whenever it changes. Raises as `start()` does."""
        await self.begin()
        seen = None
        while True:
            st = self.status()
            now = (st.state, st.result, st.policy_result, st.ks_gen, len(st.acl))
            if now != seen and on_change is not None:
                on_change(st)
            seen = now
            if self._task.done():
                break
            await asyncio.wait({self._task}, timeout=0.5)
        self._task_error()
        self._raise_for(self.status())

    async def start_tree(self, host: str = "127.0.0.1", port: int = TREE_PORT, *, tick: float = 0.5,
                         content_udp: int = 0, content_tcp: int = 0, sma: str | tuple[str, int] | None = None,
                         upstream: dict | None = None, mcast: str | tuple[str, int] | None = None,
                         mcast_if: str | None = None, hma: dict | None = None,
                         parent: str | tuple[str, int, bytes] | None = None, parent_link: dict | None = None,
                         **core: Any) -> int:
        """A DMA that agreed on the policy starts its tree service (join, Kg per the agreed
        GK_MECHA, members' control links) on `port` (0: any free) and its content relay on
        `content_udp` / `content_tcp` (0: any free; tree_status() names them); given `sma`
        ("HOST:PORT" of the SMA's tree port) it links upstream to the SMA for Kc and content.
        Returns the tree port. `core` goes to dmatree.TreeCore (kg_period, t_hb, max_members),
        `upstream` to upstream.UpstreamLink (t_hb, tick, backoff). With `mcast` ("GROUP[:PORT]",
        default port 26033) the DMA is in a multicast-enabled area: it takes part in the HMA
        election (B.18) on `mcast_if` (the IPv4 address of the interface towards the area) and
        its relay sends each stream packet to the group only while it is the HMA; `hma` goes to
        hma.HmaEngine (t_hann, max_peers) and may name the HMA `port` (default 26034). With
        `parent` ("HOST:PORT:MAIDHEX" or (host, port, maid) of another DMA's tree port) this DMA
        is that DMA's child (B.15 "Child DMA"): it joins it under Ks and takes content from it,
        its upstream link to `sma` then carrying Kc only; `parent_link` goes to chain.ParentLink
        (t_hb, tick, backoff, t_annexe)."""
        import os

        from tessera import cliargs
        from tessera.rmcp2 import dmatree

        a = self._runner.agent
        if a.cfg.nt != _C.NodeType.DMA:
            raise AgentError("only a DMA runs a tree service")
        if a.state != "ready":
            raise AgentError(f"dma {self.name}: no agreed policy yet (state {a.state})")
        if isinstance(sma, str):
            try:
                sma = cliargs.host_port(sma, "sma")
            except TesseraError as e:
                raise AgentError(str(e)) from None
        if isinstance(mcast, str):
            try:
                mcast = cliargs.mcast_group(mcast, "mcast")
            except TesseraError as e:
                raise AgentError(str(e)) from None
        if isinstance(parent, str):
            try:
                parent = cliargs.parent_dma(parent, "parent")
            except TesseraError as e:
                raise AgentError(str(e)) from None
        tree = dmatree.DmaService(dmatree.from_agent(a, os.urandom, asyncio.get_running_loop().time(), **core),
                                  host, port, tick=tick, content_udp=content_udp, content_tcp=content_tcp, sma=sma,
                                  upstream_kw=upstream, mcast=mcast, mcast_if=mcast_if, hma_kw=hma,
                                  parent=parent, parent_kw=parent_link)
        try:
            await tree.start()
        except OSError as e:
            raise AgentError(f"dma {self.name}: cannot listen on {host} (tree {port}, content UDP {content_udp} "
                             f"TCP {content_tcp}{', multicast ' + mcast[0] if mcast else ''}): "
                             f"{e.strerror or e}") from None
        self._tree = tree
        return tree.port

    def tree_status(self) -> TreeStatus | None:
        t = self._tree
        if t is None:
            return None
        c = t.core
        return TreeStatus(t.port, tuple(c.members()), c.group.current()[0], dict(c.group.rotations), dict(c.left),
                          dict(c.join.errors), t.relay.udp_port, t.relay.tcp_port,
                          tuple(s.maid for s in c.subscribers()), t.upstream.state if t.upstream else "none",
                          tuple(c.relay.held()), dict(t.relay.stats), t.is_hma,
                          t.hma.engine.state if t.hma is not None else "none",
                          t.parent_link.state if t.parent_link is not None else "none", tuple(c.children()))

    async def start_source(self, host: str = "127.0.0.1", port: int = TREE_PORT, *, tick: float = 0.5,
                           kc_state: str | Path | None = None, **kc: Any) -> AsyncContentSource:
        """An SMA that agreed on the policy starts its tree service on `port` (0: any free):
        DMAs link to it (PPROBREQ + CONTENT_ADDR under Ks), it makes and rotates Kc and delivers
        it under Ks, and the returned source encrypts content under Kc for every linked DMA.
        `kc_state`: a file keeping the newest Kc generation made (a number, never a key; 0600),
        so that the source started again after a restart goes on after it: DMAs and RMAs refuse
        a Kc generation that is not ahead of theirs (B.16); without it a restarted source starts
        at generation 1 and reaches no RMA that held a later one until the session restarts.
        `kc` goes to smatree.SmaCore / contentkey.KcSchedule (min_interval, max_interval, lead,
        urgent_lead, urgent_gap, t_hb, max_dmas)."""
        import os

        from tessera.rmcp2 import smatree

        a = self._runner.agent
        if a.cfg.nt != _C.NodeType.SMA:
            raise AgentError("only the SMA is a content source")
        if a.state != "ready":
            raise AgentError(f"sma {self.name}: no agreed policy yet (state {a.state})")
        try:
            if kc_state is not None:
                gens = smatree.KcGenFile(kc_state)
                kc.update(first_gen=gens.first_gen(), on_new_gen=gens.save)
            core = smatree.from_agent(a, os.urandom, asyncio.get_running_loop().time(), **kc)
        except (TesseraError, ValueError) as e:
            raise AgentError(f"sma {self.name}: {e}") from None
        server = smatree.SmaTreeServer(core, host, port, tick=tick)
        try:
            await server.start()
        except OSError as e:
            raise AgentError(f"sma {self.name}: cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._source = AsyncContentSource(server)
        return self._source

    def stop(self) -> None:
        self._runner.stop()

    async def close(self) -> None:
        self._runner.stop()
        if self._tree is not None:
            await self._tree.close()
            self._tree = None
        if self._source is not None:
            await self._source.close()
            self._source = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> AsyncMaAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncContentSource:
    """The SMA's content source (AsyncMaAgent.start_source): content encrypted under the
    current Kc (B.17) to every DMA linked to the SMA's tree port."""

    def __init__(self, server: Any) -> None:
        self._s = server

    @property
    def port(self) -> int:
        return self._s.port

    def stream(self, payload: bytes) -> int:
        """One stream packet (at most 1024 bytes) by UDP to every linked DMA; returns how many."""
        if len(payload) > 1024:
            raise AgentError("a stream packet carries at most 1024 bytes (B.17)")
        return self._s.stream(bytes(payload))

    async def send_object(self, data: bytes) -> int:
        """One object over TCP to every linked DMA (waits until they took it); returns how many."""
        return await self._s.send_object(bytes(data))

    def status(self) -> SourceStatus:
        c = self._s.core
        return SourceStatus(self._s.port, tuple(c.dmas()), c.kc.cur, c.kc.nxt, c.kc.urgent, self._s.stream_sent,
                            self._s.objects_sent, dict(self._s.sender.stats))

    async def wait_for_dmas(self, n: int = 1, timeout: float = 30.0) -> SourceStatus:
        """Wait until at least `n` DMAs are linked; AgentError on timeout."""
        end = time.monotonic() + timeout
        while len(self._s.core.dmas()) < n:
            if time.monotonic() > end:
                raise AgentError(f"sma: {len(self._s.core.dmas())} of {n} DMAs linked within {timeout:g} s")
            await asyncio.sleep(0.05)
        return self.status()

    async def close(self) -> None:
        await self._s.close()


class ContentSource:
    """AsyncContentSource for MaAgent (synchronous scripts): the same calls, run in the agent's thread."""

    def __init__(self, src: AsyncContentSource, loop: _ThreadLoop) -> None:
        self._src, self._loop = src, loop

    @property
    def port(self) -> int:
        return self._src.port

    def stream(self, payload: bytes) -> int:
        return self._loop.call(_call(self._src.stream, payload))

    def send_object(self, data: bytes) -> int:
        return self._loop.call(self._src.send_object(data))

    def status(self) -> SourceStatus:
        return self._src.status()

    def wait_for_dmas(self, n: int = 1, timeout: float = 30.0) -> SourceStatus:
        return self._loop.call(self._src.wait_for_dmas(n, timeout))


class MaAgent:
    """AsyncMaAgent for plain synchronous scripts: the agent runs in its own thread (it must
    keep its links up between calls). Same arguments; a context manager."""

    def __init__(self, role: Role, sm: SmEndpoint | str, session_id: int, pki_dir: str | Path,
                 name: str | None = None, **kw: Any) -> None:
        self._a = AsyncMaAgent(role, sm, session_id, pki_dir, name, **kw)
        self._loop = _ThreadLoop(f"tessera-{role}")
        self.role, self.name, self.maid = self._a.role, self._a.name, self._a.maid

    def begin(self) -> None:
        """Start without waiting (see AsyncMaAgent.begin); `start()` then waits."""
        self._loop.call(self._a.begin())

    def start(self, timeout: float = 30.0) -> Admission:
        return self._loop.call(self._a.start(timeout))

    def status(self) -> AgentStatus:
        return self._a.status()

    @property
    def acl_entry(self) -> AclEntry | None:
        return self._a.acl_entry

    def acl_allows(self, entry: AclEntry) -> bool:
        return self._loop.call(_call(self._a.acl_allows, entry))

    def wait_for(self, cond: Callable[[AgentStatus], bool], timeout: float = 30.0,
                 what: str = "the condition") -> AgentStatus:
        return self._loop.call(self._a.wait_for(cond, timeout, what))

    def start_tree(self, host: str = "127.0.0.1", port: int = TREE_PORT, **kw: Any) -> int:
        """See AsyncMaAgent.start_tree (a DMA's tree, relay and upstream link)."""
        return self._loop.call(self._a.start_tree(host, port, **kw))

    def tree_status(self) -> TreeStatus | None:
        return self._a.tree_status()

    def start_source(self, host: str = "127.0.0.1", port: int = TREE_PORT, **kw: Any) -> ContentSource:
        """See AsyncMaAgent.start_source (the SMA's tree service and content source)."""
        return ContentSource(self._loop.call(self._a.start_source(host, port, **kw)), self._loop)

    def close(self) -> None:
        try:
            self._loop.call(self._a.close(), 30)
        except RuntimeError:
            pass  # closed already
        self._loop.close()

    def __enter__(self) -> MaAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


__all__ = ["AclEntry", "Admission", "AgentError", "AgentStatus", "AsyncContentSource", "AsyncMaAgent",
           "AsyncSessionManager", "ContentSource", "MaAgent", "SourceStatus",
           "MemberInfo", "NoSession", "PolicyInfo", "PolicyRefused", "Rekeyed", "RequestRefused", "SecReturn",
           "Serving", "SessionManager", "SmEndpoint", "SmError", "SmNotServing", "SmSettings", "SmStatus",
           "SubsResult", "SubscriptionRefused", "TreeStatus", "Truncated", "make_sm_pki"]
