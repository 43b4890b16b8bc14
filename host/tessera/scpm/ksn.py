"""Sans-IO key setting node (KSN) engine, profile section 6 (ISO/IEC 24767-2 clause 9).

The engine consumes whole general frames (`handle`) and the passage of time (`poll`) and
produces `Send(addr, frame)` values; it never touches a socket, so the same engine runs the
UDP server, the CLI, the firmware-engine transcripts and the 1000-device benchmark. Per
device it keeps the key-management transaction (enrolment with the Annex A challenge,
SP / maker / user key provisioning, master key update with DH, key synchronisation,
device-requested update), application requests, and the SNF state (section 4).

Randomness (`rng(n) -> bytes`) and time (`clock() -> float`) are injected, so fixed
randoms give byte-exact transcripts. Durable state lives in `store.Store`; the write
ordering that makes crash recovery work is spelled out where it happens and in
docs/scpm.md.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tessera.crypto import dh as _dh
from tessera.crypto.mac import ct_equal, hmac
from tessera.scpm import codec as C
from tessera.scpm.codec import ErrorCode, KeyKind, Op, ScpmError, Service
from tessera.scpm.store import Store

log = logging.getLogger("tessera.scpm.ksn")

Rng = Callable[[int], bytes]
KeyId = tuple[int, int, int]  # (kind, index, generation)


@dataclass(frozen=True)
class Send:
    addr: int  # SCPM destination address; the transport maps it to an endpoint
    frame: bytes


@dataclass(frozen=True)
class Schedule:
    """When one request is retransmitted and when the KSN gives up on it: the first wait is
    `first`, each later wait `backoff` times the previous one, at most `cap`; `attempts`
    transmissions in all (docs/scpm-profile.md section 9a gives the budget per board)."""

    first: float
    backoff: float = 2.0
    cap: float = 8.0
    attempts: int = 5

    def wait(self, attempt: int) -> float:
        """Seconds to wait for an answer after transmission number `attempt` (1 = first)."""
        return min(self.first * self.backoff ** (attempt - 1), max(self.cap, self.first))

    def total(self) -> float:
        return sum(self.wait(i) for i in range(1, self.attempts + 1))


@dataclass(frozen=True)
class Timing:
    """Per-operation timers, sized by what each request costs the slowest board (issue 9):
    MKU_START makes the device do two 2048-bit DH exponentiations and a flash write (about
    5.3 s on a Pico W at 125 MHz, 3.3-4.3 s on an ESP32 at 160 MHz, plus the boot self-test's
    DH when it has just rebooted); every other request costs it milliseconds, unless it
    has just rebooted. Defined by this project."""

    quick: Schedule = Schedule(1.0, 2.0, 8.0, 5)  # waits 1, 2, 4, 8, 8 s: 23 s in all
    dh: Schedule = Schedule(15.0, 1.5, 20.0, 3)  # MKU_START: waits 15, 20, 20 s: 55 s in all

    @classmethod
    def fixed(cls, timeout: float, attempts: int) -> Timing:
        """The KSN's timers before issue 9: the same wait for every request (1.0 s x 4)."""
        s = Schedule(timeout, 1.0, timeout, attempts)
        return cls(s, s)

    @classmethod
    def configured(cls, timeout: float | None = None, retries: int | None = None,
                   dh_timeout: float | None = None) -> Timing:
        """The defaults with the CLI's overrides: `timeout` = first wait of quick requests,
        `dh_timeout` = first wait after MKU_START, `retries` = transmissions of each."""
        t = cls()
        q, d = t.quick, t.dh
        if timeout is not None:
            q = Schedule(timeout, q.backoff, max(q.cap, timeout), q.attempts)
        if dh_timeout is not None:
            d = Schedule(dh_timeout, d.backoff, max(d.cap, dh_timeout), d.attempts)
        if retries is not None:
            q = Schedule(q.first, q.backoff, q.cap, retries)
            d = Schedule(d.first, d.backoff, d.cap, retries)
        return cls(q, d)

    def longest(self) -> float:
        """An upper bound on any one transaction (a safety net for callers that wait)."""
        return 4 * (self.dh.total() + 4 * self.quick.total()) + 30.0


@dataclass
class Pending:
    """A master key agreed with a device but not yet known to be committed by it (6.3)."""

    gen: int
    txid: int
    key: C.UsageKey
    confirm_k: bytes = field(repr=False)


@dataclass(eq=False)
class Txn:
    """One KSN-side transaction; callers wait for `status` to leave "running"."""

    kind: str  # enrol | sp | maker | user | mku | sync | app
    addr: int
    txid: int
    phase: str = ""
    request: C.Pdu | None = field(default=None, repr=False)
    key_id: KeyId | None = None  # key the request goes under; None = plain frame
    service: Service = Service.AUTH_CONF
    attempts: int = 0
    schedule: Schedule = Timing.quick
    deadline: float = 0.0
    status: str = "running"  # running | done | failed
    error: ScpmError | None = None
    result: object = None
    data: dict = field(default_factory=dict, repr=False)
    callbacks: list[Callable[[Txn], None]] = field(default_factory=list, repr=False)

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def add_done_callback(self, fn: Callable[[Txn], None]) -> None:
        if self.finished:
            fn(self)
        else:
            self.callbacks.append(fn)


@dataclass
class Peer:
    addr: int
    state: str = "new"
    master: int = 0  # current master generation (0: none)
    pending: Pending | None = None
    setup: C.UsageKey | None = None
    masters: dict[int, C.UsageKey] = field(default_factory=dict, repr=False)
    held: dict[str, int] = field(default_factory=dict)
    tx: dict[KeyId, C.SendCounter] = field(default_factory=dict)
    rx: dict[KeyId, C.ReplayWindow] = field(default_factory=dict)
    km: Txn | None = None
    apps: dict[int, Txn] = field(default_factory=dict)
    queued_request: tuple[int, int] | None = None  # (txid, reason) of an MKU_REQUEST
    needs_sync: bool = False


def derive_master(z: bytes, t: bytes) -> tuple[bytes, bytes, bytes]:
    """MK', confirm_d, confirm_k of profile 6.3 from the DH secret Z and transcript T."""
    mk = hmac(z, b"SCPM-MK" + t)[:16]
    return mk, hmac(mk, b"SCPM-CONFIRM-D" + t)[:16], hmac(mk, b"SCPM-CONFIRM-K" + t)[:16]


def jacobi(a: int, n: int) -> int:
    """Jacobi symbol (a/n) for odd n > 0 (binary algorithm, quadratic reciprocity)."""
    a %= n
    result = 1
    while a:
        tz = (a & -a).bit_length() - 1
        a >>= tz
        if tz & 1 and n & 7 in (3, 5):
            result = -result
        if a & 3 == 3 and n & 3 == 3:
            result = -result
        a, n = n % a, a
    return result if n == 1 else 0


def check_dh_public(b: bytes) -> None:
    """Full validation of a peer's DH public value (profile 6.3: range and prime-order
    subgroup). p = 2q + 1 is a safe prime, so by Euler's criterion y^q = 1 (mod p) iff y is a
    quadratic residue, i.e. its Legendre symbol is 1: the same test as tessera.crypto.dh's
    full check at a small fraction of the cost of a 2047-bit exponentiation."""
    if len(b) != _dh.SIZE:
        raise _dh.DHError("DH public value must be 256 bytes")
    y = int.from_bytes(b, "big")
    if not 2 <= y <= _dh.P - 2:
        raise _dh.DHError("DH public value out of range")
    if jacobi(y, _dh.P) != 1:
        raise _dh.DHError("DH public value not in the prime-order subgroup")


def _code(n: int) -> ErrorCode:
    try:
        return ErrorCode(n)
    except ValueError:
        return ErrorCode.MALFORMED


def transcript(txid: int, new_gen: int, nonce_k: bytes, nonce_d: bytes, y_k: bytes, y_d: bytes) -> bytes:
    return txid.to_bytes(2, "big") + bytes([new_gen]) + nonce_k + nonce_d + y_k + y_d


class KsnEngine:
    def __init__(self, store: Store, address: int = C.KSN_ADDRESS, rng: Rng = os.urandom,
                 clock: Callable[[], float] = time.monotonic, timing: Timing | None = None,
                 timeout: float | None = None, retries: int | None = None) -> None:
        """`timing` sets every timer; `timeout` / `retries` alone override the defaults'
        first wait for quick requests and the number of transmissions (Timing.configured)."""
        self.store = store
        self.address = address
        self.rng = rng
        self.clock = clock
        self.timing = timing if timing is not None else Timing.configured(timeout, retries)
        self.peers: dict[int, Peer] = {}
        self.errors: Counter[ErrorCode] = Counter()
        self.listeners: list[Callable[[Txn], None]] = []
        self.home: dict[KeyId, C.UsageKey] = {k: C.UsageKey(v) for k, v in store.home_keys().items()}
        self.home_gen: dict[tuple[int, int], int] = store.home_key_gens()
        for rec in store.devices():
            self._load(rec.addr)

    # ------------------------------------------------------------------ state loading
    def _load(self, addr: int) -> Peer | None:
        rec = self.store.device(addr)
        if rec is None:
            return None
        p = Peer(addr, rec.state, rec.master_gen, held=dict(rec.held))
        for k in self.store.device_keys(addr):
            if k.kind == KeyKind.SETUP:
                p.setup = C.UsageKey(k.secret)
            elif k.kind == KeyKind.MASTER and k.status == "current":
                p.masters[k.gen] = C.UsageKey(k.secret)
            elif k.kind == KeyKind.MASTER and k.status == "pending":
                p.pending = Pending(k.gen, k.txid, C.UsageKey(k.secret[:16]), k.secret[16:])
                p.needs_sync = True  # crashed or stopped mid-update: only SYNC can tell (6.4)
        for kind, idx, gen, direction, high, bits, reserved in self.store.windows(addr):
            if direction == "rx":
                p.rx[(kind, idx, gen)] = C.ReplayWindow(high, bits, reserved)
            else:
                p.tx[(kind, idx, gen)] = C.SendCounter.restore(reserved)
        self.peers[addr] = p
        return p

    def peer(self, addr: int) -> Peer | None:
        # Every registered device is loaded at start and by register(); one process owns the
        # database (server.DbLock), so an address not in `peers` is unknown: no SQLite query
        # per datagram from a made-up source address.
        return self.peers.get(addr)

    def _need_peer(self, addr: int) -> Peer:
        p = self.peer(addr)
        if p is None:
            raise ScpmError(ErrorCode.NO_KEY, f"device {addr:#010x} is not registered")
        return p

    # ------------------------------------------------------------------ keys
    def _key(self, p: Peer, kid: KeyId) -> C.UsageKey | None:
        kind, idx, gen = kid
        if kind == KeyKind.SETUP:
            return p.setup if gen == 1 and idx == 0 else None
        if kind == KeyKind.MASTER:
            if p.pending and p.pending.gen == gen:
                return p.pending.key
            return p.masters.get(gen)
        return self.home.get(kid)

    def new_home_key(self, kind: KeyKind, idx: int = 0, raw: bytes | None = None) -> int:
        """Create the next generation of a home-wide user / SP / maker key; returns it."""
        if kind not in (KeyKind.USER, KeyKind.SP, KeyKind.MAKER):
            raise ValueError("home keys are user, SP or maker keys")
        if idx and kind != KeyKind.SP or not 0 <= idx <= 15:
            raise ScpmError(ErrorCode.SHD, "index only for SP keys (0-15)")
        gen = C.next_gen(self.home_gen.get((int(kind), idx), 0))
        raw = raw if raw is not None else self.rng(16)
        if len(raw) != 16:
            raise ValueError("keys are 16 bytes")
        self.store.put_home_key(int(kind), idx, gen, raw)
        self.home[(int(kind), idx, gen)] = C.UsageKey(raw)
        self.home_gen[(int(kind), idx)] = gen
        log.info("new home %s key index %d generation %d", kind.name, idx, gen)
        return gen

    def _home_current(self, kind: KeyKind, idx: int = 0, create: bool = True) -> int:
        gen = self.home_gen.get((int(kind), idx))
        if gen is None:
            if not create:
                raise ScpmError(ErrorCode.NO_KEY, f"no {kind.name} key index {idx}")
            gen = self.new_home_key(kind, idx)
        return gen

    # ------------------------------------------------------------------ sending
    def _txid(self, p: Peer, avoid: tuple[int, ...] = ()) -> int:
        busy = set(p.apps) | ({p.km.txid} if p.km else set()) | set(avoid)
        while True:
            txid = int.from_bytes(self.rng(2), "big")
            if txid and txid not in busy:  # TXID 0 is reserved (profile 6)
                return txid

    def _seal(self, p: Peer, kid: KeyId | None, pdu: C.Pdu, service: Service = Service.AUTH_CONF,
              skip: bool = False) -> Send:
        padata = pdu.encode()
        if kid is None:
            return Send(p.addr, C.encode_plain(self.address, p.addr, padata))
        key = self._key(p, kid)
        if key is None:
            raise ScpmError(ErrorCode.NO_KEY, f"KSN holds no key {kid} for {p.addr:#010x}")
        ctr = p.tx.setdefault(kid, C.SendCounter())
        if skip:
            # A retransmission after a timeout jumps SNF_RESERVE numbers: a receiver that
            # rebooted treats up to (its highest + SNF_RESERVE) as seen (profile 4), and
            # skipping numbers is always allowed, so the retry gets through.
            ctr.next = min(ctr.next + C.SNF_RESERVE, C.SNF_LIMIT)
        snf, moved = ctr.take()
        if moved:  # reservation on durable storage before the number is used (profile 4)
            self.store.put_window(p.addr, *kid, "tx", 0, 0, ctr.reserved)
        shd = C.SecureHeader(service, KeyKind(kid[0]), kid[1], kid[2])
        return Send(p.addr, C.seal(self.address, p.addr, shd, snf, padata, key))

    def _request(self, p: Peer, t: Txn, pdu: C.Pdu, kid: KeyId | None, phase: str,
                 service: Service = Service.AUTH_CONF) -> list[Send]:
        t.request, t.key_id, t.phase, t.service = pdu, kid, phase, service
        t.attempts = 1
        # An MKU_START costs the device two DH exponentiations; everything else milliseconds.
        dh = isinstance(pdu, C.MkuStart)
        t.schedule = self.timing.dh if dh else self.timing.quick
        t.deadline = self.clock() + t.schedule.wait(1)
        # MKU_START skips SNF_RESERVE numbers even the first time: a device that rebooted since
        # our last frame refuses every SNF up to its reservation (profile 4), and a refused
        # MKU_START would cost a whole DH-sized wait. One device flash write per update.
        return [self._seal(p, kid, pdu, service, skip=dh)]

    # ------------------------------------------------------------------ transactions
    def _finish(self, t: Txn, result: object = None, error: ScpmError | None = None) -> list[Send]:
        if t.finished:
            return []
        t.status, t.result, t.error = ("failed" if error else "done"), result, error
        p = self.peers.get(t.addr)
        out: list[Send] = []
        if p is not None:
            if p.km is t:
                p.km = None
            if t.kind == "app":
                p.apps.pop(t.txid, None)
            if error:
                self.store.set_device(t.addr, last_error=str(error))
        if error:
            log.warning("%s %#010x failed: %s", t.kind, t.addr, error)
        else:
            log.debug("%s %#010x done%s", t.kind, t.addr, f": {t.result}" if t.result is not None else "")
        for fn in t.callbacks + self.listeners:
            try:
                fn(t)
            except Exception:
                log.exception("transaction callback failed")
        if p is not None and p.km is None and p.queued_request is not None:
            txid, reason = p.queued_request
            p.queued_request = None
            out += self._start_requested(p, txid, reason)
        return out

    def _begin(self, addr: int, kind: str, need_enrolled: bool = True, txid: int | None = None) -> tuple[Peer, Txn]:
        p = self._need_peer(addr)
        if need_enrolled and (p.state != "enrolled" or not p.master):
            raise ScpmError(ErrorCode.STATE, f"device {addr:#010x} is not enrolled")
        if kind != "app" and p.km is not None:
            raise ScpmError(ErrorCode.STATE, f"device {addr:#010x} is busy ({p.km.kind})")
        t = Txn(kind, addr, txid if txid is not None else self._txid(p))
        if kind == "app":
            p.apps[t.txid] = t
        else:
            p.km = t
        return p, t

    # -- enrolment (6.1, Annex A)
    def register(self, addr: int, host: str = "127.0.0.1", port: int = C.PORT, name: str = "") -> None:
        self.store.upsert_device(addr, host, port, name)
        if addr not in self.peers:
            self._load(addr)

    def enrol(self, addr: int, setup_key: bytes) -> tuple[Txn, list[Send]]:
        """Start enrolment with the device's setup key (from its label)."""
        if len(setup_key) != 16:
            raise ScpmError(ErrorCode.MALFORMED, "setup key must be 16 bytes (32 hex digits)")
        p, t = self._begin(addr, "enrol", need_enrolled=False)
        # A re-enrolment (device factory reset) starts from nothing: drop old keys and SNFs,
        # except the send counter of an unchanged setup key: the same key must never send an
        # SNF twice (profile 4; the IV of section 5 would repeat), and a device reset without
        # a reboot still remembers the numbers it accepted under it.
        skid = (int(KeyKind.SETUP), 0, 1)
        keep = p.tx.get(skid) if p.setup is not None and ct_equal(p.setup.raw, setup_key) else None
        with self.store.tx():
            self.store.forget_device_keys(addr)
            self.store.put_device_key(addr, KeyKind.SETUP, 0, 1, "setup", setup_key)
            if keep is not None:
                self.store.put_window(addr, *skid, "tx", 0, 0, keep.reserved)
            self.store.set_device(addr, state="enrolling", master_gen=0, held={}, last_error="")
        p.state, p.master, p.pending, p.masters, p.held = "enrolling", 0, None, {}, {}
        p.tx.clear()
        p.rx.clear()
        if keep is not None:
            p.tx[skid] = keep
        p.setup = C.UsageKey(setup_key)
        return t, self._request(p, t, C.EnrolHello(t.txid), None, "hello")

    def _on_enrol(self, p: Peer, t: Txn, pdu: C.Pdu, kid: KeyId | None) -> list[Send]:
        if isinstance(pdu, C.EnrolChallenge) and kid is None and t.phase in ("hello", "init"):
            if t.phase == "hello":
                master, user_gen = self.rng(16), self._home_current(KeyKind.USER)
                t.data.update(master=master, user_gen=user_gen)
                # Persist the master key before it leaves (recovery through SYNC, 6.4).
                self.store.put_device_key(p.addr, KeyKind.MASTER, 0, 1, "pending", master + bytes(16), t.txid)
                p.pending = Pending(1, t.txid, C.UsageKey(master), bytes(16))
            user = self.home[(int(KeyKind.USER), 0, t.data["user_gen"])]
            req = C.UserKeyInit(t.txid, pdu.nonce_d, 1, t.data["master"], t.data["user_gen"], user.raw)
            return self._request(p, t, req, (int(KeyKind.SETUP), 0, 1), "init")
        if isinstance(pdu, C.UserKeyInitAck) and kid == (int(KeyKind.MASTER), 0, 1) and t.phase == "init":
            if (pdu.master_gen, pdu.user_gen) != (1, t.data["user_gen"]):
                return self._finish(t, error=ScpmError(ErrorCode.MALFORMED, "ACK for other generations"))
            self._commit_master(p, 1)
            p.state, p.held = "enrolled", {f"{int(KeyKind.USER)}/0": t.data["user_gen"]}
            self.store.set_device(p.addr, state="enrolled", held=p.held, last_error="")
            return self._finish(t, result=1)
        log.debug("enrol %#010x: ignoring %s in phase %s", p.addr, pdu.OP.name, t.phase)  # plain: anyone
        return []

    def _commit_master(self, p: Peer, gen: int) -> None:
        """The device holds `gen` as current: make it ours, erase the older master (6.3)."""
        assert p.pending is not None and p.pending.gen == gen
        with self.store.tx():
            for old in list(p.masters):
                if old != gen:
                    self.store.delete_device_key(p.addr, KeyKind.MASTER, 0, old)
            self.store.put_device_key(p.addr, KeyKind.MASTER, 0, gen, "current", p.pending.key.raw)
            self.store.set_device(p.addr, master_gen=gen)
        p.masters = {gen: p.pending.key}
        for kid in [k for k in (*p.tx, *p.rx) if k[0] == KeyKind.MASTER and k[2] != gen]:
            p.tx.pop(kid, None)
            p.rx.pop(kid, None)
        p.master, p.pending, p.needs_sync = gen, None, False

    def _discard_pending(self, p: Peer) -> None:
        if p.pending is not None:
            gen = p.pending.gen
            self.store.delete_device_key(p.addr, KeyKind.MASTER, 0, gen)
            p.tx.pop((int(KeyKind.MASTER), 0, gen), None)
            p.rx.pop((int(KeyKind.MASTER), 0, gen), None)
            p.pending = None
        p.needs_sync = False

    def _mkid(self, gen: int) -> KeyId:
        return (int(KeyKind.MASTER), 0, gen)

    # -- SP / maker / user keys (6.2)
    def provision(self, addr: int, kind: KeyKind, idx: int = 0) -> tuple[Txn, list[Send]]:
        """Install the home's current key of `kind`/`idx` on the device (created if none)."""
        names = {KeyKind.SP: "sp", KeyKind.MAKER: "maker", KeyKind.USER: "user"}
        if kind not in names:
            raise ScpmError(ErrorCode.UNKNOWN_OP, f"cannot provision {kind.name} keys")
        p, t = self._begin(addr, names[kind])
        gen = self._home_current(kind, idx)
        raw = self.home[(int(kind), idx, gen)].raw
        req: C.Pdu = {KeyKind.SP: lambda: C.SpKeyInit(t.txid, idx, gen, raw),
                      KeyKind.MAKER: lambda: C.MakerKeyInit(t.txid, gen, raw),
                      KeyKind.USER: lambda: C.UserKeySet(t.txid, gen, raw)}[kind]()
        t.data.update(kind=int(kind), idx=idx, gen=gen)
        return t, self._request(p, t, req, self._mkid(p.master), "sent")

    def _on_key_ack(self, p: Peer, t: Txn, pdu: C.Pdu) -> list[Send]:
        want = {"sp": C.SpKeyInitAck, "maker": C.MakerKeyInitAck, "user": C.UserKeySetAck}[t.kind]
        if not isinstance(pdu, want) or pdu.gen != t.data["gen"] or getattr(pdu, "index", t.data["idx"]) != t.data["idx"]:
            log.info("%s %#010x: ignoring %s", t.kind, p.addr, pdu.OP.name)
            return []
        p.held[f"{t.data['kind']}/{t.data['idx']}"] = t.data["gen"]
        self.store.set_device(p.addr, held=p.held)
        return self._finish(t, result=t.data["gen"])

    # -- master key update controlled by the KSN (6.3)
    def rotate(self, addr: int, txid: int | None = None) -> tuple[Txn, list[Send]]:
        p = self._need_peer(addr)
        if p.pending is not None or p.needs_sync:
            raise ScpmError(ErrorCode.STATE, f"device {addr:#010x} has an unresolved update; sync first")
        p, t = self._begin(addr, "mku", txid=txid)
        return t, self._mku_start(p, t)

    def _mku_start(self, p: Peer, t: Txn) -> list[Send]:
        new_gen = C.next_gen(p.master)
        nonce_k = self.rng(16)
        x = self.rng(32)
        dh = _dh.DH(x)
        t.data.update(new_gen=new_gen, nonce_k=nonce_k, dh=dh, old=p.master)
        return self._request(p, t, C.MkuStart(t.txid, new_gen, nonce_k, dh.public), self._mkid(p.master), "start")

    def _on_mku(self, p: Peer, t: Txn, pdu: C.Pdu, kid: KeyId) -> list[Send]:
        new_gen = t.data["new_gen"]
        if isinstance(pdu, C.MkuResponse) and t.phase == "start" and kid == self._mkid(t.data["old"]):
            if pdu.new_gen != new_gen:
                return []
            try:
                check_dh_public(pdu.dev_public)  # full validation on the KSN (range + subgroup)
                z = t.data["dh"].shared(pdu.dev_public, full_check=False)
            except _dh.DHError as e:
                out = [self._seal(p, kid, C.MkuAbort(t.txid, new_gen))]
                return out + self._finish(t, error=ScpmError(ErrorCode.DH, str(e)))
            tr = transcript(t.txid, new_gen, t.data["nonce_k"], pdu.nonce_d, t.data["dh"].public, pdu.dev_public)
            mk, confirm_d, confirm_k = derive_master(z, tr)
            if not ct_equal(confirm_d, pdu.confirm_d):
                out = [self._seal(p, kid, C.MkuAbort(t.txid, new_gen))]
                return out + self._finish(t, error=ScpmError(ErrorCode.CONFIRM, "confirm_d mismatch"))
            # Durable BEFORE MKU_COMMIT leaves: from here on the device may switch to MK'.
            self.store.put_device_key(p.addr, KeyKind.MASTER, 0, new_gen, "pending", mk + confirm_k, t.txid)
            p.pending = Pending(new_gen, t.txid, C.UsageKey(mk), confirm_k)
            t.data.pop("dh")
            return self._request(p, t, C.MkuCommit(t.txid, new_gen, confirm_k), self._mkid(new_gen), "commit")
        if isinstance(pdu, C.MkuCommitAck) and t.phase == "commit" and kid == self._mkid(new_gen) and pdu.new_gen == new_gen:
            self._commit_master(p, new_gen)
            return self._finish(t, result=new_gen)
        log.debug("mku %#010x: ignoring %s in phase %s", p.addr, pdu.OP.name, t.phase)
        return []

    # -- key synchronisation (6.4)
    def sync(self, addr: int) -> tuple[Txn, list[Send]]:
        p, t = self._begin(addr, "sync", need_enrolled=False)
        if not p.master and p.pending is None:
            p.km = None
            raise ScpmError(ErrorCode.NO_KEY, f"no master key held for {addr:#010x}")
        t.data["aborts"] = 0
        return t, self._sync_send(p, t, first=True)

    def _sync_candidates(self, p: Peer) -> list[int]:
        gens = [p.pending.gen] if p.pending else []
        return gens + [g for g in ([p.master] if p.master else []) if g not in gens]

    def _sync_send(self, p: Peer, t: Txn, first: bool = False, avoid: tuple[int, ...] = ()) -> list[Send]:
        cands = self._sync_candidates(p)
        t.data["cands"], t.data["i"] = cands, 0
        if not first:
            # A new SYNC_REQ (after an MKU_ABORT changed the device's state) takes a fresh TXID:
            # a device that answers a repeated (OP, TXID) from its stored answer (profile 6)
            # would otherwise replay its answer from before the abort. Only a retransmission
            # on timeout reuses the TXID (and the nonce). Defined by this project (6.4).
            t.txid = self._txid(p, avoid)
        t.data["nonce"] = self.rng(16)
        return self._request(p, t, C.SyncReq(t.txid, t.data["nonce"]), self._mkid(cands[0]), "req")

    def _on_sync(self, p: Peer, t: Txn, pdu: C.Pdu, kid: KeyId) -> list[Send]:
        if not isinstance(pdu, C.SyncResp) or t.phase != "req" or not ct_equal(pdu.nonce, t.data["nonce"]):
            return []
        cur, pend, ptxid = pdu.current_gen, pdu.pending_gen, pdu.pending_txid
        P = p.pending
        log.debug("sync %#010x: device current %d pending %d; KSN current %d pending %s",
                 p.addr, cur, pend, p.master, P.gen if P else "-")
        if P is not None and cur == P.gen and not pend:
            self._commit_master(p, P.gen)  # device IDLE(new): it committed (6.4 case 1)
            if p.state == "enrolling":
                p.state = "enrolled"
                p.held = {f"{int(KeyKind.USER)}/0": self._home_current(KeyKind.USER)}
                self.store.set_device(p.addr, state="enrolled", held=p.held)
            return self._finish(t, result=f"committed generation {cur}")
        if P is not None and pend == P.gen and ptxid == P.txid and cur == p.master and kid == self._mkid(P.gen):
            # device PENDING with our pending key (it answered under that very key, which proves
            # it): resend MKU_COMMIT (case 2); continue as an MKU.
            t.kind, t.txid = "mku", P.txid
            t.data.update(new_gen=P.gen, old=p.master)
            return self._request(p, t, C.MkuCommit(P.txid, P.gen, P.confirm_k), self._mkid(P.gen), "commit")
        if pend:
            # device PENDING with a key the KSN does not hold (case 3; also when it could not
            # answer under our pending key of the same generation): abort it, check again.
            if cur not in p.masters or t.data["aborts"] >= 3:
                return self._finish(t, error=ScpmError(ErrorCode.STATE, f"device current {cur} pending {pend}"))
            t.data["aborts"] += 1
            self._discard_pending(p)
            out = [self._seal(p, self._mkid(cur), C.MkuAbort(ptxid, pend))]
            return out + self._sync_send(p, t, avoid=(ptxid,))
        if cur == p.master and p.master:
            self._discard_pending(p)  # device IDLE(old) (case 4), or nothing was pending
            return self._finish(t, result=f"in sync at generation {cur}")
        return self._finish(t, error=ScpmError(ErrorCode.STATE, f"device reports generation {cur}"))

    # -- device-requested update (6.5)
    def _on_request(self, p: Peer, pdu: C.MkuRequest, kid: KeyId) -> list[Send]:
        log.info("device %#010x requests a master key update (reason %d)", p.addr, pdu.reason)
        t = p.km
        if t is not None and t.kind == "mku":
            if t.phase == "start":  # a repeated request gets the same MKU_START (new SNF)
                return [self._seal(p, t.key_id, t.request, t.service)]
            return []
        if t is not None or p.pending is not None or kid != self._mkid(p.master):
            p.queued_request = (pdu.txid, pdu.reason)
            if t is None:
                _, out = self.sync(p.addr)
                return out
            return []
        return self._start_requested(p, pdu.txid, pdu.reason)

    def _start_requested(self, p: Peer, txid: int, reason: int) -> list[Send]:
        if p.pending is not None or p.state != "enrolled":
            return []
        t, out = self.rotate(p.addr, txid=txid)  # MKU_START carries the request's TXID (6.5)
        t.data["requested"] = reason
        return out

    # -- application frames as a controller (section 7)
    def app_request(self, addr: int, pdu_fn: Callable[[int], C.Pdu], kind: KeyKind = KeyKind.USER,
                    idx: int = 0, service: Service = Service.AUTH_CONF) -> tuple[Txn, list[Send]]:
        if kind in (KeyKind.SETUP,):
            raise ScpmError(ErrorCode.AUTHORITY, "the setup key carries no application authority")
        p = self._need_peer(addr)
        if kind == KeyKind.MASTER:
            gen = p.master
        else:
            gen = self._home_current(kind, idx, create=False)
        p, t = self._begin(addr, "app")
        t.data.update(kind=int(kind), idx=idx)
        return t, self._request(p, t, pdu_fn(t.txid), (int(kind), idx, gen), "sent", service)

    def app_get(self, addr: int, prop: int, **kw) -> tuple[Txn, list[Send]]:
        return self.app_request(addr, lambda txid: C.AppGet(txid, prop), **kw)

    def app_set(self, addr: int, prop: int, value: bytes, **kw) -> tuple[Txn, list[Send]]:
        return self.app_request(addr, lambda txid: C.AppSet(txid, prop, value), **kw)

    # ------------------------------------------------------------------ receiving
    def handle(self, frame: bytes) -> list[Send]:
        """Process one received general frame; returns the frames to send."""
        try:
            return self._handle(frame)
        except ScpmError as e:
            self.errors[e.code] += 1
            # never answered (profile 8), never with keys; one line per frame only at DEBUG:
            # anyone can send these, so the server logs a periodic summary of `errors` instead
            log.debug("dropped frame: %s", e)
            return []

    def _handle(self, frame: bytes) -> list[Send]:
        f = C.decode(frame, self.address)  # step 1
        p = self.peer(f.sa)
        if isinstance(f, C.PlainFrame):
            pdu = C.decode_pdu(f.padata)
            if p is None or p.km is None or p.km.kind != "enrol" or pdu.txid != p.km.txid:
                raise ScpmError(ErrorCode.AUTHORITY, f"plain {pdu.OP.name} from {f.sa:#010x} outside an enrolment")
            if isinstance(pdu, C.KmError):
                return self._finish(p.km, error=ScpmError(_code(pdu.code), "device refused enrolment"))
            return self._on_enrol(p, p.km, pdu, None)
        kid: KeyId = (int(f.shd.kind), f.shd.index, f.shd.gen)
        key = self._key(p, kid) if p else None  # step 2
        if key is None:
            raise ScpmError(ErrorCode.NO_KEY, f"from {f.sa:#010x} kind {kid[0]} index {kid[1]} gen {kid[2]}")
        win = p.rx.get(kid) or C.ReplayWindow()
        win.check(f.snf)  # step 3
        C.verify_mac(f, key)  # step 4
        padata = C.unprotect(f, key)  # step 5
        win.commit(f.snf)  # step 6: the KSN keeps its receive windows exactly (cheap in SQLite)
        p.rx[kid] = win
        self.store.put_window(p.addr, *kid, "rx", win.high, win.bits, win.reserved)
        pdu = C.decode_pdu(padata)
        if pdu.OP in C.KM_OPS:
            if kid[0] != KeyKind.MASTER:
                raise ScpmError(ErrorCode.AUTHORITY, f"{pdu.OP.name} under a {KeyKind(kid[0]).name} key")
            return self._dispatch_km(p, pdu, kid)
        if isinstance(pdu, C.AppResult):
            t = p.apps.get(pdu.txid)
            if t is None or (t.data["kind"], t.data["idx"]) != kid[:2]:
                log.info("APP_RESULT %#06x from %#010x matches no request", pdu.txid, p.addr)
                return []
            return self._finish(t, result=(pdu.status, pdu.value))
        raise ScpmError(ErrorCode.UNKNOWN_OP, f"{pdu.OP.name} is not for a KSN")

    def _dispatch_km(self, p: Peer, pdu: C.Pdu, kid: KeyId) -> list[Send]:
        if isinstance(pdu, C.MkuRequest):
            return self._on_request(p, pdu, kid)
        t = p.km
        if t is None or pdu.txid != t.txid:
            log.info("%s %#06x from %#010x matches no transaction", pdu.OP.name, pdu.txid, p.addr)
            return []
        if isinstance(pdu, C.KmError):
            code = _code(pdu.code)
            if t.kind == "mku" and t.phase == "commit":
                p.needs_sync = True
            return self._finish(t, error=ScpmError(code, f"device answered KM_ERROR to {t.kind}"))
        if t.kind == "enrol":
            return self._on_enrol(p, t, pdu, kid)
        if t.kind in ("sp", "maker", "user"):
            return self._on_key_ack(p, t, pdu)
        if t.kind == "mku":
            return self._on_mku(p, t, pdu, kid)
        if t.kind == "sync":
            return self._on_sync(p, t, pdu, kid)
        return []

    # ------------------------------------------------------------------ time
    def next_deadline(self) -> float | None:
        ds = [t.deadline for p in self.peers.values() for t in ([p.km] if p.km else []) + list(p.apps.values())]
        return min(ds) if ds else None

    def poll(self) -> list[Send]:
        """Retransmit or give up on every transaction whose deadline has passed."""
        now, out = self.clock(), []
        for p in list(self.peers.values()):
            for t in ([p.km] if p.km else []) + list(p.apps.values()):
                if t.finished or t.deadline > now:
                    continue
                out += self._timeout(p, t)
        return out

    def _timeout(self, p: Peer, t: Txn) -> list[Send]:
        sch, rounds = t.schedule, 1
        if t.kind == "sync":
            cands = t.data["cands"]
            rounds = len(cands)  # each wait of the schedule is tried under every generation
            if t.attempts >= sch.attempts * rounds:
                return self._finish(t, error=ScpmError(ErrorCode.STATE, "no answer to SYNC_REQ under any master key"))
            t.data["i"] = (t.data["i"] + 1) % len(cands)
            t.key_id = self._mkid(cands[t.data["i"]])  # next generation, newest first (6.4)
        elif t.attempts >= sch.attempts:
            if t.kind == "mku" and t.phase == "commit":
                p.needs_sync = True  # the device may or may not have committed: SYNC decides
            msg = f"no answer in phase {t.phase or 'request'}"
            if t.kind == "enrol" and t.phase == "hello":
                # An enrolled device ignores plain (unkeyed) frames, so a second enrolment of the
                # same device looks exactly like a device that is not there.
                msg += (" (the device is off-line, at another address, or already enrolled: an enrolled"
                        " device does not answer an enrolment hello; factory-reset it to enrol it again)")
            return self._finish(t, error=ScpmError(ErrorCode.STATE, msg))
        t.attempts += 1
        t.deadline = self.clock() + sch.wait(1 + (t.attempts - 1) // rounds)
        log.debug("%s %#010x: retransmission %d", t.kind, p.addr, t.attempts)
        return [self._seal(p, t.key_id, t.request, t.service, skip=t.key_id is not None)]
