# Sans-IO SCPM device engine (docs/scpm-profile.md sections 3-8, 10).
#   dev = Device(addr, setup_key, store=Store(...), rand=os.urandom)
#   out = dev.receive(frame_bytes, now_ms)   # list of frames (bytearray) to send
#   out = dev.tick(now_ms)                   # MKU_REQUEST retries
#   out = dev.request_update(reason, now_ms) # device-requested master key update
# Frames failing decode are counted (dev.errors) and never answered.
# Times are ticks in ms (time.ticks_ms()); every comparison goes through ticks_add and
# ticks_diff, so the timers work across the tick counter's wrap (2^30 ms on the boards).
import os

from micropython import const

from tessera_fw.scpm import persist  # noqa: I001 - first: measured to leave the esp32 test heap least fragmented
from tessera_fw import acquire, release
from tessera_fw.scpm.frame import Codec, Key, SCPMError, encode
from tessera_fw.scpm.snf import RxWindow, TxCounter
from tessera_fw.scpm.store import MemFS, Store

if __file__.endswith(".py"):
    # compiled from source (mip --no-mpy, the tests) or frozen: key management is loaded now,
    # while the heap is whole, and stays (acquire() releases only modules loaded from .mpy)
    from tessera_fw.scpm import km  # noqa: F401

# numbers of const.py (profile sections 1-8), folded by the compiler (issue 9 #9)
_ERR_OVERSIZE = const(3)
_ERR_AUTHORITY = const(15)
_ERR_STATE = const(17)
_ERR_MALFORMED = const(18)
_ERR_UNKNOWN_OP = const(22)
_ERR_PEERS_FULL = const(23)
_KIND_SETUP = const(0)
_KIND_MASTER = const(4)
_OP_MKU_START = const(0x10)
_OP_MKU_REQUEST = const(0x15)
_OP_KM_ERROR = const(0x1F)
_OP_APP_GET = const(0x40)
_OP_APP_SET = const(0x41)
_OP_APP_RESULT = const(0x42)
_REASON_OPERATOR = const(1)
_REASON_SNF = const(2)
_MAX_PADATA = const(1024)
_SNF_MASTER_LIMIT = const(0xFFFF0000)
_SVC_AUTH_CONF = const(3)

IDLE = "IDLE"
PENDING = "PENDING"
REQUESTED = "REQUESTED"
RETRY_MS = 5000
RETRIES = 3
# Per-peer SNF state (replay windows), created only for a frame that authenticated: at most
# MAX_PEERS_PER_KEY peers per key (so the holders of one key cannot shut out another key's)
# and MAX_PEERS over all keys (the KSN alone may use 19: setup, user, 16 SP, maker), the
# KSN's under the master key not counted (its lookup admits the enrolled KSN only). Beyond
# them a new peer is refused (ERR_PEERS_FULL), never admitted by evicting another peer's
# window, which would let that peer's old frames be replayed. Defined by this project.
MAX_PEERS = 24
MAX_PEERS_PER_KEY = 8

try:  # MicroPython: the port's own (period 2^30 on the boards, 2^62 on the unix port)
    from time import ticks_add, ticks_diff
except ImportError:  # CPython (tessera.mpshim): the boards' arithmetic
    from tessera_fw.scpm.ticks import ticks_add30 as ticks_add, ticks_diff30 as ticks_diff

# prop id -> [name, read level, write level, value]
DEFAULT_PROPS = (
    (1, "power", 1, 1, b"\x00"),
    (2, "tariff", 1, 2, b"\x00\x00"),
    (3, "firmware", 1, 3, b"0.1.0"),
)


# PDU length after OP | TXID (section 6, 7): fixed, or -minimum for variable-length PDUs
_PDU_LEN = {
    0x01: 0, 0x02: 16, 0x03: 50, 0x04: 2, 0x05: 18, 0x06: 2, 0x07: 17, 0x08: 1, 0x09: 17,
    0x0A: 1, 0x10: 273, 0x11: 289, 0x12: 17, 0x13: 1, 0x14: 1, 0x15: 1, 0x18: 16, 0x19: 20,
    0x1F: 2, 0x40: 1, 0x41: -1, 0x42: -2,
}
# answers and device-to-KSN messages: a device never answers them
_RESPONSES = (0x02, 0x04, 0x06, 0x08, 0x0A, 0x11, 0x13, 0x15, 0x19, 0x1F, 0x42)


def check_pdu(p):
    """Validate the length of a KM or application PDU: ERR_MALFORMED / ERR_UNKNOWN_OP."""
    n = len(p)
    if n < 3:
        raise SCPMError(_ERR_MALFORMED)
    want = _PDU_LEN.get(p[0])
    if want is None:
        raise SCPMError(_ERR_UNKNOWN_OP)
    if n - 3 != want if want >= 0 else n - 3 < -want:
        raise SCPMError(_ERR_MALFORMED)
    if n > _MAX_PADATA:
        raise SCPMError(_ERR_OVERSIZE)


def _u16(p, o):
    return (p[o] << 8) | p[o + 1]


class Device:
    def __init__(self, addr, setup_key, store=None, rand=None, props=DEFAULT_PROPS):
        if not addr:
            raise ValueError("address 0 is invalid")
        self.addr = addr
        self.setup = Key(_KIND_SETUP, 0, 1, setup_key)
        self.store = store if store is not None else Store(MemFS())
        self.rand = rand if rand is not None else os.urandom
        self.codec = Codec(addr)
        self.props = {}
        for pid, name, rd, wr, val in props:
            self.props[pid] = [name, rd, wr, bytes(val)]
        self.errors = {}
        self.events = []  # (name, detail) for the application: enrolled, mku_committed, ...
        # Application hooks (profile section 7). Both are called only for a request whose key
        # has the property's level; `authority` is the frame's key kind (1 user, 2 service
        # provider, 3 maker, 4 master), so the application can tell who asked.
        #   on_get(name, authority) -> current value (bytes), or None for the stored value
        #   on_set(name, value, authority) -> 0 to accept, or an ERR_* code to refuse
        #     (the stored value is then left as it was)
        self.on_get = None
        self.on_set = None
        self.from_ksn = False  # the last frame received authenticated as the KSN's
        self.store_errors = 0
        self.mku_state = IDLE
        self._req = None  # [txid, reason, deadline, retries] while REQUESTED
        self._last = {}  # op -> (txid, key, answer padata): retransmissions by TXID
        self._challenge = None
        self._snf_request = False
        self._done_txid = 0  # TXID of the last update committed, aborted or replaced (RAM)
        self.last_error = 0
        self._reset_state()
        rec = self.store.load()
        if rec:
            self._restore(rec)

    # ------------------------------------------------------------------ state
    def _reset_state(self):
        self.ksn = 0
        self.keys = [None] * 80  # kind * 16 + index -> Key (current generation)
        self.keys[0] = self.setup
        self.pending = None
        self._next_dh = None  # the next MKU_START's DH key pair, made while idle (RAM only)

    @property
    def enrolled(self):
        return self.ksn != 0

    @property
    def master(self):
        return self.keys[_KIND_MASTER * 16]

    # ------------------------------------------------------------------ persistence
    # (persist.py: binary keys and counters images, docs/scpm-firmware.md "Flash wear")
    _kref = None  # [ksn, pending, the keys] as last written to the keys slots (None: rewrite)
    _ok = True  # False while a rollback is incomplete: nothing may be saved

    def _restore(self, rec):
        persist.restore(self, rec)

    def save(self):
        persist.save(self)

    def factory_reset(self):
        self.store.erase()  # raises before RAM changes if the slots could not be removed
        self._reset_state()
        self.mku_state = IDLE
        self._req = None
        self._last = {}
        self._challenge = None
        self._kref = None

    def _install(self, kind, index, gen, raw):
        """Install a key generation (replacing the older one; its SNF state is dropped)."""
        old = self.keys[kind * 16 + index]
        if old is not None and old.gen == gen and old.key == bytes(raw):
            return False  # same key again (retransmission after a reboot): keep counters
        self.keys[kind * 16 + index] = Key(kind, index, gen, raw)  # fresh SNF state
        if old is not None:
            old.forget()
        return True

    # ------------------------------------------------------------------ ring for Codec
    def lookup(self, sa, kind, index, gen):
        if kind == _KIND_MASTER:
            if sa != self.ksn or not sa:
                return None
            k = self.keys[64]
            if k is not None and k.gen == gen:
                return k
            p = self.pending
            if p is not None and p.key.gen == gen:
                return p.key
            return None
        k = self.keys[kind * 16 + index]
        if k is not None and k.gen == gen:
            return k
        return None

    def window(self, sa, key):
        """A new replay window for a peer whose frame has just authenticated (frame.py
        calls this after the MAC checked): bounded by MAX_PEERS."""
        if key.kind != _KIND_MASTER and (len(key.rx) >= MAX_PEERS_PER_KEY or self.peers() >= MAX_PEERS):
            raise SCPMError(_ERR_PEERS_FULL)
        w = key.rx[sa] = RxWindow()
        return w

    def peers(self):
        """Replay windows held, the master key's excepted (only the KSN has those)."""
        n = 0
        for k in self.keys:
            if k is not None and k.kind != _KIND_MASTER:
                n += len(k.rx)
        return n

    # ------------------------------------------------------------------ sending
    def _frame(self, da, key, padata, service=_SVC_AUTH_CONF):
        # addresses as bytes (issue 9 #8): this node's, and the sender's of the frame just
        # decoded when answering it (a 32-bit board then shifts no boxed integer)
        c = self.codec
        sa = c.addr4
        dab = c.sa4 if da == c.sa else da
        if key is None:
            return encode(sa, dab, None, 0, padata)
        c = key.tx.get(da)
        if c is None:
            c = key.tx[da] = TxCounter()
        snf = c.take()
        if c.dirty:
            c.dirty = False
            self.save()  # the reservation reaches flash before the SNF is used
        f = encode(sa, dab, key, snf, padata, service)
        if key.kind == _KIND_MASTER and snf > _SNF_MASTER_LIMIT and self.mku_state == IDLE:
            self._snf_request = True
        return f

    def _count(self, code):
        self.errors[code] = self.errors.get(code, 0) + 1
        self.last_error = code

    # ------------------------------------------------------------------ receiving
    def receive(self, data, now_ms=0):
        """Process one received general frame; return the frames to send."""
        self._snf_request = False
        self.from_ksn = False
        try:
            f = self.codec.decode(data, self)
        except SCPMError as e:
            self._count(e.code)
            return []
        # only the master key proves the KSN (its lookup admits the enrolled KSN's SA only;
        # a user key is held by the home's other controllers too); enrolment sets it as well
        self.from_ksn = f.key is not None and f.key.kind == _KIND_MASTER
        out = []
        try:
            if f.persist and not self._mku_start_again(f):
                self.save()
            try:
                self._dispatch(f, out, now_ms)
            except SCPMError as e:  # e.g. ERR_SNF_EXHAUSTED while answering
                self._count(e.code)
            if self._snf_request and self.mku_state == IDLE:
                try:
                    out.extend(self.request_update(_REASON_SNF, now_ms))
                except SCPMError as e:
                    self._count(e.code)
        except OSError:  # the key store could not be written: nothing durable, nothing said
            self.store_errors += 1
            self.from_ksn = False
            self._rollback()
            return []
        return out

    def _mku_start_again(self, f):
        # Issue 9 #3: the KSN retransmits with its SNF moved 64 on, past this window's flash
        # reservation, so each retransmitted MKU_START cost a flash write. One for the
        # pending update (same TXID) is answered from the stored MKU_RESPONSE and changes
        # nothing: its reservation stays in RAM and reaches flash with the next write. Replayed
        # after a power cut, such a frame gets the same stored answer while the update is
        # pending, and is refused once the update is resolved (_done_txid); after a commit its
        # key is gone. Every other frame's reservation is written before it is answered.
        pd = self.pending
        if pd is None or f.key is not self.master:
            return False
        p = f.padata()
        return len(p) >= 3 and p[0] == _OP_MKU_START and _u16(p, 1) == pd.txid

    def precompute(self):
        """Make the next MKU_START's DH key pair now (one 2048-bit exponentiation: about
        2.6 s on a Pico W), so that MKU_START then needs only the shared secret. For the
        adapter to call while idle; True if it did the work. The pair is used by one
        MKU_START and dropped, kept in RAM only (a reboot makes a new one)."""
        if self._next_dh is not None or not self.enrolled or self.mku_state != IDLE:
            return False
        dh, fresh = acquire("tessera_fw.crypto.dh")
        try:
            d = dh.DH(bytes(self.rand(32)))
            self._next_dh = (d._x, d.public)  # plain values: holding a DH would keep dh.py loaded
        finally:
            dh = None
            if fresh:
                release("tessera_fw.crypto.dh")
        return True

    def _rollback(self):
        """Back to the last durable state (after a failed store write)."""
        persist.rollback(self)

    def _dispatch(self, f, out, now_ms):
        p = f.padata()
        sa = f.sa
        key = f.key
        if key is None and self.enrolled:
            # Issue 11 #12: once enrolled, a plain frame has nothing to ask (only ENROL_HELLO
            # is plain): counted, never answered, so a spoofed source gets nothing reflected.
            self._count(_ERR_STATE)
            return
        txid = _u16(p, 1) if len(p) >= 3 else 0
        op = p[0] if len(p) else 0
        try:
            check_pdu(p)
        except SCPMError as e:
            self._count(e.code)
            out.append(self._frame(sa, key, self._km_error(txid, e.code, op), f.service))
            return
        if op in _RESPONSES:  # never answer an answer (no ping-pong)
            if op == _OP_KM_ERROR:
                self.events.append(("km_error", p[3]))
            else:
                self._count(_ERR_STATE)
            return
        if op >= _OP_APP_GET:
            out.append(self._frame(sa, key, self._app(op, txid, p, f.authority), f.service))
            return
        # key management (km.py, with DH for MKU_START) is loaded for the request and
        # released after it: the device serves application frames without it (issue 9 #9)
        km, fresh = acquire("tessera_fw.scpm.km")
        try:
            ans, akey = km.handle(self, f, op, txid, p, now_ms)
        except SCPMError as e:
            self._count(e.code)
            ans, akey = self._km_error(txid, e.code, op), key
        finally:
            km = None
            if fresh:
                release("tessera_fw.scpm.km")
        if ans is not None:
            out.append(self._frame(sa, akey, ans, _SVC_AUTH_CONF if akey is not None else 0))

    @staticmethod
    def _km_error(txid, code, op):
        return bytes((_OP_KM_ERROR, txid >> 8, txid & 0xFF, code, op))

    # ------------------------------------------------------------------ key management
    # ------------------------------------------------------------------ device-requested update
    def request_update(self, reason=_REASON_OPERATOR, now_ms=0):
        """Send MKU_REQUEST(reason) and enter REQUESTED (section 6.5)."""
        if not self.enrolled or self.mku_state != IDLE:
            raise SCPMError(_ERR_STATE)
        txid = 0
        while not txid:  # TXID 0 is reserved
            r = self.rand(2)
            txid = (r[0] << 8) | r[1]
        self._req = [txid, reason, ticks_add(now_ms, RETRY_MS), 0]
        self.mku_state = REQUESTED
        return [self._mku_request_frame()]

    def _mku_request_frame(self):
        txid, reason = self._req[0], self._req[1]
        return self._frame(self.ksn, self.master, bytes((_OP_MKU_REQUEST, txid >> 8, txid & 0xFF, reason)))

    def tick(self, now_ms):
        """Timers: resend MKU_REQUEST every 5 s, at most 3 times, then give up (IDLE)."""
        r = self._req
        if self.mku_state != REQUESTED or r is None or ticks_diff(now_ms, r[2]) < 0:
            return []
        if r[3] >= RETRIES:
            self._req = None
            self.mku_state = IDLE
            self.events.append(("mku_request_failed", r[1]))
            return []
        r[3] += 1
        r[2] = ticks_add(now_ms, RETRY_MS)
        try:
            return [self._mku_request_frame()]
        except SCPMError as e:
            self._count(e.code)
            return []

    # ------------------------------------------------------------------ application
    def _app(self, op, txid, p, authority):
        pid = p[3] if len(p) > 3 else 0
        status = 0
        value = b""
        prop = self.props.get(pid)
        if prop is None:
            status = _ERR_UNKNOWN_OP
        elif authority < (prop[1] if op == _OP_APP_GET else prop[2]):
            status = _ERR_AUTHORITY  # refused before the application sees it
        elif op == _OP_APP_SET:
            value = bytes(p[4:])
            if self.on_set is not None:
                status = self.on_set(prop[0], value, authority) or 0
            if status:
                value = b""
            else:
                prop[3] = value
        else:
            value = prop[3]
            if self.on_get is not None:
                live = self.on_get(prop[0], authority)
                if live is not None:
                    value = bytes(live)
        if status:
            self._count(status)
        return bytes((_OP_APP_RESULT, txid >> 8, txid & 0xFF, pid, status)) + value

    def set_prop(self, name, value):
        for v in self.props.values():
            if v[0] == name:
                v[3] = bytes(value)
                return
        raise KeyError(name)

    def get_prop(self, name):
        for v in self.props.values():
            if v[0] == name:
                return v[3]
        raise KeyError(name)
