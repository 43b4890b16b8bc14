# Secure RMCP-2 content packets on the board (docs/rmcp2-profile.md B.17, defined by this
# project): the content key ring KcRing and the receiver that checks and decrypts content
# packets into preallocated buffers. CBC and CTR are both built on one ECB object per key
# (boards have no cryptolib CTR), so a packet allocates no cipher object; XOR, counter
# blocks and compares are viper loops.
# Written independently of the host's content.py; both reproduce the same vectors.
import hashlib
import sys

try:
    import cryptolib
except ImportError:  # firmware older than v1.19
    import ucryptolib as cryptolib
import micropython
from micropython import const

from tessera_fw.crypto.hmac import HMAC
from tessera_fw.rmcp2.const import (ERR_ALGORITHM, ERR_KEY, ERR_LENGTH, ERR_MAC, ERR_MAID, ERR_NODE_TYPE,
                                    ERR_OVERSIZE, ERR_PADDING, ERR_REPLAY, ERR_TRUNCATED, ERR_UNKNOWN_MESSAGE,
                                    ERR_VALUE, ERR_VERSION, Rmcp2Error)

_CPY = sys.implementation.name != "micropython"  # CPython through tessera.mpshim

ERR_OBJECT = const(40)  # B.17: object framing (no BEGIN, a gap, size or length wrong)
ERR_DIGEST = const(41)  # B.17: the object's SHA-256 differs from OBJ_END's

TYPE_DATA = const(0xC0)
KIND_STREAM = const(1)
KIND_BEGIN = const(2)
KIND_DATA = const(3)
KIND_END = const(4)
_VERNT = const(0x42)  # Ver 4, NT SMA
_HDR = const(20)
_IV = const(28)
_C = const(44)
_TAG = const(16)
_MIN = const(60)
MAX_PLAIN = const(1024)
MAX_PACKET = const(1100)  # 60 + 1024 + at most 16 CBC padding
_HASH = ("", "sha1", "md5")
SEQ_MAX = const(0x3FFFFFFF)  # as B.7: a small int on every board
_WIN = const(32)
_ZERO16 = bytes(16)


class Window:
    """Stream replay window (B.17): the highest Seq and, per slot Seq mod 32, the last Seq
    accepted there; a Seq within 32 of the highest is new unless its slot holds it.
    Receiver._receive does the same check and commit inline (keep them alike)."""

    def __init__(self):
        self.high = 0
        self.slot = [0] * _WIN

    def check(self, seq):
        if seq < 1 or seq > SEQ_MAX:
            raise Rmcp2Error(ERR_REPLAY)
        h = self.high
        if seq <= h and (h - seq >= _WIN or self.slot[seq & 31] == seq):
            raise Rmcp2Error(ERR_REPLAY)

    def commit(self, seq):
        self.slot[seq & 31] = seq
        if seq > self.high:
            self.high = seq


# The header checks, XOR, counter blocks and compares as viper functions, compiled on the
# device when this module is imported: the firmware ships as portable bytecode (virtual
# boards load the same .mpy as any port) and mpy-cross cannot put native code in it, so the
# viper source is a string handed to the board's own compiler (ESP32 and RP2040 builds have
# the native emitter). Where that fails (CPython through mpshim, a port without the emitter)
# the plain versions below stay: the same results, no allocation, much slower.
# No annotations (the firmware portability rule): arguments arrive as objects and are cast
# inside; results go out through a byte of a buffer, since an unannotated viper function
# cannot return a native value. Offsets are passed instead of slices: a memoryview slice is
# a heap object.
# _head: the B.17 checks that need only the packet `p` (n bytes), the session id x[0:8] and
#   the ring's suite x[8] (enc), x[9] (auth), in the receiver's order; x[10] <- the first
#   failing step (an index into _HEAD_ERR), 0 when all pass. The session id is compared
#   over all 8 bytes whatever differs.
# _xor: dst[i] ^= src[off + i] for i < n (n < 65536): four 32-bit words a step when both
#   are word-aligned (always on the receive path: buffers and packets start aligned, C sits
#   at offset 44), then the bytes left; by bytes throughout when not aligned (the RP2040's
#   Cortex-M0+ faults on unaligned word access).
# _diff: flag[0] = 1 when a[:n] != b[off:off + n]; time depends only on n.
# _pad_bad: flag[0] = 1 unless p[start:end] are all `pad`.
# _ctr_blocks: dst <- ctr, ctr+1, ... (16-byte big-endian counter, modulo 2^128); each
#   block is the previous one copied (dst word-aligned), then incremented from its last byte.
_HEAD_ERR = (0, ERR_TRUNCATED, ERR_OVERSIZE, ERR_LENGTH, ERR_VERSION, ERR_UNKNOWN_MESSAGE, ERR_NODE_TYPE,
             ERR_VALUE, ERR_MAID, ERR_VALUE, ERR_ALGORITHM, ERR_PADDING, ERR_ALGORITHM)


def _head(p, n, x):
    s = 0
    if n < _MIN:
        s = 1
    elif n > MAX_PACKET:
        s = 2
    elif (p[2] << 8) | p[3] != n:
        s = 3
    elif p[0] >> 4 != 4:
        s = 4
    elif p[1] != TYPE_DATA:
        s = 5
    elif p[0] != _VERNT:
        s = 6
    else:
        r = 0
        z = 0
        for i in range(8):
            r |= p[4 + i] ^ x[i]
            z |= p[12 + i]
        e = p[21]
        a = p[22]
        if r:
            s = 7
        elif not z:  # an all-zero MAID
            s = 8
        elif p[20] < KIND_STREAM or p[20] > KIND_END:
            s = 9
        elif e < 1 or e > 2 or a < 1 or a > 2:
            s = 10
        elif e == 1 and (n == _MIN or (n - _MIN) & 15):  # CBC: whole blocks, at least one
            s = 11
        elif e != x[8] or a != x[9]:
            s = 12
    x[10] = s


def _xor(dst, src, off, n):
    for i in range(n):
        dst[i] ^= src[off + i]


def _diff(a, b, off, n, flag):
    r = 0
    for i in range(n):
        r |= a[i] ^ b[off + i]
    flag[0] = 1 if r else 0


def _pad_bad(p, start, end, pad, flag):
    r = 0
    for i in range(start, end):
        r |= p[i] ^ pad
    flag[0] = 1 if r else 0


def _ctr_blocks(dst, ctr, nblocks):
    for k in range(16):
        dst[k] = ctr[k]
    o = 0
    for _b in range(1, nblocks):
        for k in range(16):
            dst[o + 16 + k] = dst[o + k]
        o += 16
        j = o + 15
        while j >= o:
            v = dst[j] + 1
            dst[j] = v & 0xFF
            if v < 256:
                break
            j -= 1


_VIPER = (
"""
@micropython.viper
def _head(p, n, x):
    d = ptr8(p)
    c = ptr8(x)
    m = int(n)
    s = 0
    if m < 60:
        s = 1
    elif m > 1100:
        s = 2
    elif ((d[2] << 8) | d[3]) != m:
        s = 3
    elif (d[0] >> 4) != 4:
        s = 4
    elif d[1] != 0xC0:
        s = 5
    elif d[0] != 0x42:
        s = 6
    else:
        r = 0
        z = 0
        i = 0
        while i < 8:
            r |= d[4 + i] ^ c[i]
            z |= d[12 + i]
            i += 1
        k = d[20]
        e = d[21]
        a = d[22]
        if r != 0:
            s = 7
        elif z == 0:
            s = 8
        elif k < 1 or k > 4:
            s = 9
        elif e < 1 or e > 2 or a < 1 or a > 2:
            s = 10
        elif e == 1 and (m == 60 or ((m - 60) & 15) != 0):
            s = 11
        elif e != c[8] or a != c[9]:
            s = 12
    c[10] = s
""", """
@micropython.viper
def _xor(dst, src, off, n):
    d = ptr8(dst)
    s = ptr8(int(ptr8(src)) + int(off))
    m = int(n)
    i = 0
    if ((int(d) | int(s)) & 3) == 0:
        d4 = ptr32(d)
        s4 = ptr32(s)
        k = m >> 4
        while k > 0:
            d4[0] ^= s4[0]
            d4[1] ^= s4[1]
            d4[2] ^= s4[2]
            d4[3] ^= s4[3]
            d4 = ptr32(int(d4) + 16)
            s4 = ptr32(int(s4) + 16)
            k -= 1
        i = m & 0xFFF0
    while i < m:
        d[i] ^= s[i]
        i += 1
""", """
@micropython.viper
def _diff(a, b, off, n, flag):
    x = ptr8(a)
    y = ptr8(int(ptr8(b)) + int(off))
    r = 0
    for i in range(int(n)):
        r |= x[i] ^ y[i]
    f = ptr8(flag)
    f[0] = 1 if r else 0
""", """
@micropython.viper
def _pad_bad(p, start, end, pad, flag):
    x = ptr8(p)
    v = int(pad)
    i = int(start)
    e = int(end)
    r = 0
    while i < e:
        r |= x[i] ^ v
        i += 1
    f = ptr8(flag)
    f[0] = 1 if r else 0
""", """
@micropython.viper
def _ctr_blocks(dst, ctr, nblocks):
    d = ptr8(dst)
    c = ptr8(ctr)
    k = 0
    while k < 16:
        d[k] = c[k]
        k += 1
    w = ptr32(dst)
    b = int(nblocks) - 1
    while b > 0:
        w[4] = w[0]
        w[5] = w[1]
        w[6] = w[2]
        w[7] = w[3]
        w = ptr32(int(w) + 16)
        p = ptr8(w)
        j = 15
        while j >= 0:
            v = p[j] + 1
            p[j] = v
            if v < 256:
                break
            j -= 1
        b -= 1
""")

VIPER = False
if not _CPY:
    try:
        for _src in _VIPER:  # one function at a time: compiling them all at once needs ~4 KB more heap
            exec(_src, globals())
        VIPER = True
    except Exception:  # noqa: BLE001 - no native emitter: keep the plain versions
        pass
    _src = None
_VIPER = None


class _Slot:
    """One Kc generation: its cipher, its HMAC pads and its stream replay window; obj_high is
    the object channel's last Seq. The cipher is one object per key, so a packet allocates
    none: for CBC a cryptolib CBC decryptor (mode 2), for CTR an ECB object that encrypts the
    counter blocks."""

    def __init__(self, gen, key, enc, auth):
        self.gen = gen
        self.key = bytes(key)
        kdf = HMAC(key)
        k = kdf.digest(b"RMCP2-DATA-ENC", bytes((enc,)))[:16]
        self.aes = cryptolib.aes(k, 2, _ZERO16) if enc == 1 else cryptolib.aes(k, 1)
        m = HMAC(kdf.digest(b"RMCP2-DATA-MAC", bytes((auth,))), _HASH[auth])
        self.ipad = m.ipad
        self.opad = m.opad
        self.win = Window()
        self.obj_high = 0


def _succ(g):
    return 1 if g == 255 else g + 1


class KcRing:
    """The content keys an RMA holds: the current generation and the next (B.17). A Gen
    is 1..255, 255 is followed by 1 (B.6)."""

    def __init__(self, enc, auth):
        if enc not in (1, 2) or auth not in (1, 2):
            raise Rmcp2Error(ERR_ALGORITHM)
        self.enc = enc
        self.auth = auth
        self.cur = None
        self.nxt = None

    def install(self, gen, key16):
        """Install Kc of generation `gen`. Returns True when held afterwards: the first key,
        the successor of the current one or one further ahead (kept as next, replacing any next:
        an urgent rotation skips a Gen; an RMA that was away switches on the first authentic
        packet under it), the current one again (kept as it is if the key is the same). A
        generation behind the current one is refused (False): keys never go back."""
        if not 1 <= gen <= 255 or len(key16) != 16:
            raise Rmcp2Error(ERR_KEY)
        cur = self.cur
        if cur is None:
            self.cur = _Slot(gen, key16, self.enc, self.auth)
            return True
        d = (gen - cur.gen) % 255
        if d == 0:
            if cur.key != bytes(key16):  # the SMA restarted under the same Gen: a new key
                self.cur = _Slot(gen, key16, self.enc, self.auth)
                self.nxt = None
            return True
        if d == 1:
            n = self.nxt
            if n is None or n.key != bytes(key16):
                self.nxt = _Slot(gen, key16, self.enc, self.auth)
            return True
        if d >= 128:
            return False
        # 2..127 ahead: the next key, replacing any next (an urgent rotation skips a Gen, B.16);
        # the current one stays until the first authentic packet under this one
        self.nxt = _Slot(gen, key16, self.enc, self.auth)
        return True

    def gens(self):
        return (self.cur.gen if self.cur else 0, self.nxt.gen if self.nxt else 0)

    def forget(self):
        self.cur = None
        self.nxt = None


class Receiver:
    """Checks and decrypts content packets (B.17) for one session. `on_data(kind, mv)` gets
    the plaintext as a memoryview valid only during the call: STREAM payloads, each object's
    DATA chunks, and KIND_END (mv = the verified SHA-256) once the whole object matched.
    An object's chunks are unconfirmed until KIND_END; a failed object ends in ERR_OBJECT or
    ERR_DIGEST raised by receive(). Errors are counted in `errors[code]`."""

    def __init__(self, session_id, ring, on_data, max_object=0x3FFFFFFF):
        if len(session_id) != 8:
            raise ValueError("session id is 8 bytes")
        self.sid = bytes(session_id)
        self.ring = ring
        self.on_data = on_data
        self.max_object = max_object
        self.buf = bytearray(MAX_PACKET)  # for tcp_loop's readinto
        self.bmv = memoryview(self.buf)
        self._pt = bytearray(MAX_PACKET)
        self._pmv = memoryview(self._pt)
        self._x = bytearray(self.sid + bytes((ring.enc, ring.auth, 0)))  # _head's context
        self._flag = bytearray(1)
        self._h = hashlib.sha1 if ring.auth == 1 else hashlib.md5
        self.errors = [0] * 48
        self.packets = 0
        self._obj = None  # sha256 of the object being received
        self._left = 0
        self._oseq = 0

    def receive(self, data):
        try:
            return self._receive(data)
        except Rmcp2Error as e:
            self.errors[e.code] += 1
            raise

    def _receive(self, data):
        # Per packet this allocates the two hash objects and their digests (hashlib has no
        # copy() or reset, so HMAC restarts both from the pads), three memoryviews (the
        # packet, the tagged bytes, the cipher input; CTR: the IV and the counter blocks) and
        # the plaintext view handed on.
        n = len(data)
        x = self._x
        _head(data, n, x)
        if x[10]:
            raise Rmcp2Error(_HEAD_ERR[x[10]])
        kind = data[20]
        ring = self.ring
        gen = data[23]
        slot = ring.cur
        if slot is None or slot.gen != gen:
            slot = ring.nxt
            if slot is None or slot.gen != gen:
                raise Rmcp2Error(ERR_KEY)
        seq = (data[24] << 24) | (data[25] << 16) | (data[26] << 8) | data[27]
        if kind == KIND_STREAM:  # Window.check, inline (a method call is ~5% of receive())
            win = slot.win
            hi = win.high
            if seq < 1 or seq > SEQ_MAX or (seq <= hi and (hi - seq >= _WIN or win.slot[seq & 31] == seq)):
                raise Rmcp2Error(ERR_REPLAY)
        elif seq < 1 or seq > SEQ_MAX or seq <= slot.obj_high:
            raise Rmcp2Error(ERR_REPLAY)
        end = n - _TAG
        mv = memoryview(data)
        h = self._h(slot.ipad)
        h.update(mv[:end])
        inner = h.digest()
        h = self._h(slot.opad)
        h.update(inner)
        flag = self._flag
        _diff(h.digest(), data, end, _TAG, flag)
        if flag[0]:
            raise Rmcp2Error(ERR_MAC)
        pt = self._pt
        clen = n - _MIN
        if x[8] == 1:  # CBC: P_i = D(C_i) xor C_(i-1), C_0 = IV. IV || C goes through the
            # slot's CBC decryptor in one call: within a call every block is XORed with the
            # block before it, so blocks 1.. are P_1.. with the packet's IV as C_0; block 0
            # (the IV against whatever chaining value the object held) lands in pt[0:16]
            # and is ignored. No XOR pass of our own and no cipher object per packet.
            slot.aes.decrypt(mv[_IV:end], pt)
            last = clen + 15
            pad = pt[last]
            if pad < 1 or pad > 16:
                raise Rmcp2Error(ERR_PADDING)
            _pad_bad(pt, last + 1 - pad, last + 1, pad, flag)
            if flag[0]:
                raise Rmcp2Error(ERR_PADDING)
            plen = clen - pad
            o = 16
        else:  # CTR from ECB: keystream = E(IV), E(IV+1), ...; the counter blocks are
            # encrypted in place (ECB reads each block before writing it), no second buffer
            nb = (clen + 15) >> 4
            _ctr_blocks(pt, mv[_IV:_C], nb)
            slot.aes.encrypt(self._pmv[:nb << 4], pt)
            _xor(pt, data, _C, clen)
            plen = clen
            o = 0
        if kind == KIND_STREAM:  # Window.commit, inline
            win.slot[seq & 31] = seq
            if seq > win.high:
                win.high = seq
        else:
            slot.obj_high = seq
        if slot is ring.nxt:  # the first authentic packet under the next key switches
            ring.cur = slot
            ring.nxt = None
        self.packets += 1
        out = self._pmv[o:o + plen]
        if kind == KIND_STREAM:
            self.on_data(KIND_STREAM, out)
        else:
            self._object(kind, seq, plen, out)
        return kind

    def _object(self, kind, seq, plen, out):
        if kind == KIND_BEGIN:
            if plen != 4:
                self._obj = None
                raise Rmcp2Error(ERR_OBJECT)
            size = (out[0] << 24) | (out[1] << 16) | (out[2] << 8) | out[3]
            if size > self.max_object:
                self._obj = None
                raise Rmcp2Error(ERR_OBJECT)
            self._obj = hashlib.sha256()
            self._left = size
            self._oseq = seq
            self.on_data(KIND_BEGIN, out)
            return
        if self._obj is None or seq != self._oseq + 1:
            self._obj = None
            raise Rmcp2Error(ERR_OBJECT)
        self._oseq = seq
        if kind == KIND_DATA:
            if plen == 0 or plen > self._left:
                self._obj = None
                raise Rmcp2Error(ERR_OBJECT)
            self._left -= plen
            self._obj.update(out)
            self.on_data(KIND_DATA, out)
            return
        d = self._obj.digest()
        self._obj = None
        if plen != 32 or self._left:
            raise Rmcp2Error(ERR_OBJECT)
        flag = self._flag
        _diff(d, out, 0, 32, flag)
        if flag[0]:
            raise Rmcp2Error(ERR_DIGEST)
        self.on_data(KIND_END, out)


def udp_loop(sock, rx, count=-1):
    """Receive datagrams and hand each to rx; a rejected one is counted in rx.errors and
    dropped. MicroPython sockets have no recv_into and their readinto merges datagrams, so
    recv() allocates each datagram (the only per-packet allocation the board is forced to;
    a MemoryError there drops that datagram). Stops after `count` datagrams (-1: never) or on
    a socket error (timeouts included); returns the number read."""
    got = 0
    while got != count:
        try:
            data = sock.recv(MAX_PACKET + 1)  # one more: an oversized datagram is seen as such
        except MemoryError:
            continue
        except OSError:
            break
        got += 1
        try:
            rx.receive(data)
        except Rmcp2Error:
            pass
        data = None
    return got


def mcast_join(sock, group4, iface4):
    """Join IPv4 multicast group `group4` (4 bytes) on the interface with address `iface4`
    (4 bytes) for a multicast-enabled MM group (B.17). IPPROTO_IP is 0: not every port
    exports the constant."""
    import socket

    sock.setsockopt(0, socket.IP_ADD_MEMBERSHIP, bytes(group4) + bytes(iface4))


def tcp_loop(sock, rx):
    """Reliable delivery (B.17): content packets back to back on a TCP stream, each framed
    by its header's Length. Returns at end of stream; a packet rejected by rx, a Length
    outside 60..1100 or a truncated frame ends the stream (raises Rmcp2Error)."""
    buf = rx.buf
    mv = rx.bmv
    while True:
        if not _read_exact(sock, mv, 0, 4):
            return
        n = (buf[2] << 8) | buf[3]
        if n < _MIN or n > MAX_PACKET:
            rx.errors[ERR_LENGTH] += 1
            raise Rmcp2Error(ERR_LENGTH)
        if not _read_exact(sock, mv, 4, n):
            rx.errors[ERR_TRUNCATED] += 1
            raise Rmcp2Error(ERR_TRUNCATED)
        rx.receive(mv[:n])


def _read_exact(sock, mv, start, end):
    pos = start
    while pos < end:
        k = sock.readinto(mv[pos:end])
        if not k:
            return False
        pos += k
    return True
