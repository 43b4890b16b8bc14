# SCPM general and secure frames (docs/scpm-profile.md sections 2, 3, 5): encode, decode,
# key derivation. Decoding works in preallocated buffers: the decoded PADATA is a
# memoryview into the codec's copy of the received frame (services 2 and 3 decrypt it in
# place) or into the frame itself (plain), valid until the next decode.
import hashlib
import os

try:
    import cryptolib
except ImportError:  # firmware older than v1.19
    import ucryptolib as cryptolib
from micropython import const

_sha256 = hashlib.sha256
_HDR = const(11)
_HD_PLAIN = const(0x10)
_HD_SECURE = const(0x11)
_MAX_ADATA = const(1100)
_MAX_FRAME = const(1111)  # 11 + _MAX_ADATA
_MAX_PADATA = const(1024)
_MAC = const(16)
# error numbers (const.py, profile section 8)
_ERR_TRUNCATED = const(1)
_ERR_LENGTH = const(2)
_ERR_OVERSIZE = const(3)
_ERR_HEADER = const(4)
_ERR_SHD = const(5)
_ERR_ALGORITHM = const(6)
_ERR_NOT_FOR_ME = const(7)
_ERR_NO_KEY = const(8)
_ERR_SNF = const(9)
_ERR_REPLAY = const(10)
_ERR_TOO_OLD = const(11)
_ERR_MAC = const(12)
_ERR_PADDING = const(13)
_ERR_BCC = const(14)
# service -> SHD byte 1 (cipher id << 4 | MAC id)
_ALG = (0, 0x01, 0x10, 0x11)


# SCPMError and the error names of profile section 8 live here, not in const.py: the device
# raises and counts errors by number only and loads neither const.py's public names nor a
# table of name strings (issue 9 #9: a public name costs a dict entry and a qstr on the
# board's heap). The names are built only where they are printed (str(e), udp's log).
_NAMES = ("TRUNCATED LENGTH OVERSIZE HEADER SHD ALGORITHM NOT_FOR_ME NO_KEY SNF REPLAY TOO_OLD "
          "MAC PADDING BCC AUTHORITY WRONG_KSN STATE MALFORMED DH CONFIRM SNF_EXHAUSTED "
          "UNKNOWN_OP PEERS_FULL")  # numbers 1-23 in order (const.py ERR_*)


def name(code):
    """"ERR_MAC" for 12, "OK" for 0, "ERR_99" for a number the profile does not define."""
    if code == 0:
        return "OK"
    names = _NAMES.split()
    return "ERR_" + (names[code - 1] if 0 < code <= len(names) else "%d" % code)


class SCPMError(Exception):
    """A protocol error: `code` is the section 8 number. Messages never carry key material."""

    def __init__(self, code, detail=0):
        super().__init__(code)
        self.code = code
        self.detail = detail

    def __str__(self):
        return name(self.code)


def _pads(key):
    """The padded keys of HMAC-SHA-256 (RFC 2104): K xor 0x36.., K xor 0x5C.. (a key longer
    than the 64-byte block is hashed first: the DH secret)."""
    if len(key) > 64:
        key = _sha256(key).digest()
    ipad = bytearray(64)
    opad = bytearray(64)
    for i in range(64):
        k = key[i] if i < len(key) else 0
        ipad[i] = k ^ 0x36
        opad[i] = k ^ 0x5C
    return bytes(ipad), bytes(opad)


def _mac(ipad, opad, *parts):
    h = _sha256(ipad)
    for p in parts:
        h.update(p)
    o = _sha256(opad)
    o.update(h.digest())
    return o.digest()


# HMAC-SHA-256 for key set-up and key management, here rather than through crypto/hmac.py
# (its HMAC class serves several hashes): loading that module for each key set-up cost the
# device 1.9 KB of heap and 2.7 KB while loading (issue 9 #9)
def hmac_sha256(key, *parts):
    """One-shot HMAC-SHA-256 (RFC 2104) for key set-up and key management (not the hot path)."""
    i, o = _pads(key)
    return _mac(i, o, *parts)


def next_gen(gen):
    return 1 if gen >= 255 else gen + 1


class Key:
    """A usage key (kind, index, generation) with its derived keys, computed once (1):
    K_enc = HMAC(K, "SCPM-ENC")[0:16], K_mac = HMAC(K, "SCPM-MAC"). The MAC's padded
    blocks and the AES objects are kept so a frame costs no key set-up."""

    def __init__(self, kind, index, gen, key):
        if len(key) != 16:
            raise ValueError("key must be 16 bytes")
        self.kind = kind
        self.index = index
        self.gen = gen
        self.key = bytes(key)
        i, o = _pads(key)
        self.k_enc = _mac(i, o, b"SCPM-ENC")[:16]
        # the MAC's padded keys, for decode()'s inlined HMAC
        self.ipad, self.opad = _pads(_mac(i, o, b"SCPM-MAC"))
        self.ecb = cryptolib.aes(self.k_enc, 1)  # IV computation (encrypt only)
        self.rx = {}  # peer address -> RxWindow (owner's bookkeeping)
        self.tx = {}  # peer address -> TxCounter
        # CBC decryption object reused across frames: its chaining state is the last
        # ciphertext block, so decrypting the IV block first re-keys the chain to the IV.
        self.cbc_dec = cryptolib.aes(self.k_enc, 2, bytes(16))

    def shd(self, service):
        return bytes((0x10 | service, _ALG[service], (self.kind << 4) | self.index, self.gen))

    def mac(self, *parts):
        return _mac(self.ipad, self.opad, *parts)

    def forget(self):
        self.key = self.k_enc = self.ipad = self.opad = b""
        self.ecb = self.cbc_dec = None


def _put32(b, o, v):
    b[o] = (v >> 24) & 0xFF
    b[o + 1] = (v >> 16) & 0xFF
    b[o + 2] = (v >> 8) & 0xFF
    b[o + 3] = v & 0xFF


def _put_addr(b, o, a):
    # an address is an int or its 4 bytes (big-endian): the device passes the bytes, so that
    # a 32-bit board shifts no boxed integer (issue 9 #8)
    if isinstance(a, int):
        _put32(b, o, a)
    else:
        b[o:o + 4] = a


def _get32(b, o):
    return (b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]


def encode(sa, da, key, snf, padata, service=3):
    """Build a general frame. key None: plain frame (HD 0x10, ADATA = padata).
    Otherwise a secure frame with `service` 1, 2 or 3 under `key` with sequence `snf`.
    `sa`, `da`: an int or the address's 4 bytes (Codec.addr4, Codec.sa4)."""
    n = len(padata)
    if key is None:
        if n > _MAX_ADATA:
            raise SCPMError(_ERR_OVERSIZE)
        out = bytearray(_HDR + n)
        out[0] = _HD_PLAIN
        _put_addr(out, 1, sa)
        _put_addr(out, 5, da)
        out[9] = n >> 8
        out[10] = n & 0xFF
        out[_HDR:] = padata
        return out
    if n > _MAX_PADATA:
        raise SCPMError(_ERR_OVERSIZE)
    if service == 1:
        enc = 0
        adata = 8 + 2 + n + _MAC
    else:
        enc = 2 + n + (2 if service == 2 else 0)
        enc = (enc + 15) & ~15
        adata = 8 + enc + (_MAC if service == 3 else 0)
    out = bytearray(_HDR + adata)
    mv = memoryview(out)
    out[0] = _HD_SECURE
    _put_addr(out, 1, sa)
    _put_addr(out, 5, da)
    out[9] = adata >> 8
    out[10] = adata & 0xFF
    out[11:15] = key.shd(service)
    _put32(out, 15, snf)
    if service == 1:
        out[19] = n >> 8
        out[20] = n & 0xFF
        out[21:21 + n] = padata
    else:
        pt = bytearray(enc)
        pt[0] = n >> 8
        pt[1] = n & 0xFF
        pt[2:2 + n] = padata
        if service == 2:
            pt[2 + n:4 + n] = _sha256(memoryview(pt)[:2 + n]).digest()[:2]
        iv = key.ecb.encrypt(bytes(out[11:19]) + bytes(out[1:9]))
        cryptolib.aes(key.k_enc, 2, iv).encrypt(pt, mv[19:19 + enc])
    if service != 2:
        end = len(out) - _MAC
        out[end:] = key.mac(mv[:end])[:_MAC]
    return out


class Codec:
    """Receiver side of one node. decode() follows the receiver order of section 3 and
    leaves its results in attributes (hd, sa, da, service, key, snf, authority, and
    `padata()`, a memoryview built on demand); it raises SCPMError on the first failing
    check and then nothing has changed, except that padata() is None after a failure
    found once the frame was copied in (MDAS, padding, PBC, BCC).

    `ring` supplies lookup(sa, kind, index, gen) -> Key or None and window(sa, key) ->
    a new snf.RxWindow for a peer the key has none for (its check and in-order commit are
    inlined here). window() is called only once the frame has passed every check, so no
    per-peer state exists for a frame that did not authenticate (issue 11 #1); it may
    raise SCPMError to refuse the peer. `persist` says the window's flash reservation
    moved and must be saved."""

    def __init__(self, addr):
        # received secure frame, copied to a fixed place so that the views below are fixed
        rx = bytearray(_MAX_FRAME)
        rxmv = memoryview(rx)
        bx = bytearray(32)
        # decode()'s preallocated objects, in one tuple that it unpacks into locals in one
        # step instead of a dozen instance-attribute loads
        self._bufs = (rx, rxmv, rxmv[11:19], rxmv[1:9],  # frame, SHD|SNF and SA|DA views
                      bytearray(16), bytearray(16), bytearray(16),  # IV input, IV, scratch
                      cryptolib.aes(os.urandom(16), 1), bx, memoryview(bx)[:16],  # tag blinding
                      bytearray(16))
        # Addresses as bytes on the per-frame path (issue 9 #8): on a 32-bit board an int
        # >= 2^30 is a heap object, and every shift, or and mask of one allocates another.
        # DA is compared byte by byte with this node's address (misaddressed frames, the
        # most common junk, cost nothing). SA is copied into a 4-byte buffer and converted
        # once DA matched, in one int.from_bytes (one boxed int on a board, none here);
        # sa4 holds the SA bytes of the last frame decoded, and encode() takes them and
        # addr4 as they are, so answering shifts no address.
        self._s4 = bytearray(4)  # the frame being decoded (swapped with sa4 on success)
        self.sa4 = bytearray(4)
        self.readdress(addr)
        self.hd = self.sa = self.da = self.service = self.snf = self.authority = 0
        self.key = None
        self._src = None  # buffer holding PADATA: the frame, or the plaintext buffer
        self._off = self._len = 0
        self.persist = False

    # A method, not a property: a class with a property makes every attribute store on
    # its instances look the class up first (about 4x slower in MicroPython), and decode()
    # stores ten results per frame.
    def padata(self):
        """The decoded PADATA as a memoryview (valid until the next decode), or None."""
        if self._src is None:
            return None
        return memoryview(self._src)[self._off:self._off + self._len]

    def readdress(self, addr):
        """Receive for another node address from now on."""
        self.addr = addr
        self.addr4 = bytes((addr >> 24 & 0xFF, addr >> 16 & 0xFF, addr >> 8 & 0xFF, addr & 0xFF))

    def _spoilt(self, code):
        # a check after the copy into the receive buffer failed: the previous frame's
        # PADATA view no longer holds its data (done here, off the success path)
        self._src = None
        return SCPMError(code)

    def decode(self, data, ring):
        n = len(data)
        if n < 11:
            raise SCPMError(_ERR_TRUNCATED)
        if n > _MAX_FRAME:
            raise SCPMError(_ERR_OVERSIZE)
        hd = data[0]
        if hd != _HD_PLAIN and hd != _HD_SECURE:
            raise SCPMError(_ERR_HEADER)
        if (data[9] << 8) | data[10] != n - 11:
            raise SCPMError(_ERR_LENGTH)
        a = self.addr4
        mine = data[5] == a[0] and data[6] == a[1] and data[7] == a[2] and data[8] == a[3]
        if hd == _HD_PLAIN:
            if not mine:
                raise SCPMError(_ERR_NOT_FOR_ME)
            self.hd = hd
            self.persist = False
            s4 = self.sa4
            s4[0] = data[1]
            s4[1] = data[2]
            s4[2] = data[3]
            s4[3] = data[4]
            self.sa = int.from_bytes(s4, "big")
            self.da = self.addr
            self.service = self.snf = self.authority = 0
            self.key = None
            self._src = data
            self._off = 11
            self._len = n - 11
            return self
        # 1. sizes and secure header
        if n < 19:
            raise SCPMError(_ERR_TRUNCATED)
        b0 = data[11]
        svc = b0 & 3
        if b0 & 0xFC != 0x10 or svc == 0:
            raise SCPMError(_ERR_SHD)
        b2 = data[13]
        kind = b2 >> 4
        index = b2 & 0x0F
        gen = data[14]
        if kind > 4 or (index and kind != 2) or gen == 0:
            raise SCPMError(_ERR_SHD)
        if data[12] != (svc & 1) | ((svc & 2) << 3):  # _ALG[svc], without a global lookup
            raise SCPMError(_ERR_ALGORITHM)
        if svc == 1:
            if n < 37:  # 11 + 8 + PBC + MDAS
                raise SCPMError(_ERR_TRUNCATED)
            enc = 0
        else:
            enc = n - (19 if svc == 2 else 35)
            if enc < 16:
                raise SCPMError(_ERR_TRUNCATED)
            if enc & 15:
                raise SCPMError(_ERR_PADDING)
        if not mine:
            raise SCPMError(_ERR_NOT_FOR_ME)
        s4 = self._s4
        s4[0] = data[1]
        s4[1] = data[2]
        s4[2] = data[3]
        s4[3] = data[4]
        sa = int.from_bytes(s4, "big")
        # 2. key
        key = ring.lookup(sa, kind, index, gen)
        if key is None:
            raise SCPMError(_ERR_NO_KEY)
        # 3. SNF pre-check
        snf = (data[15] << 24) | (data[16] << 16) | (data[17] << 8) | data[18]
        win = key.rx.get(sa)  # a known peer's window; an unknown peer gets one only once
        if win is None:  # its frame has authenticated (step 6): nothing stored before that
            high = 0
            if snf == 0:
                raise SCPMError(_ERR_SNF)
        else:
            high = win.high  # RxWindow.check, inlined (hot path)
        if snf <= high:
            if snf == 0:
                raise SCPMError(_ERR_SNF)
            if high - snf > 32:
                raise SCPMError(_ERR_TOO_OLD)
            if snf == high or win.seen[snf & 63]:
                raise SCPMError(_ERR_REPLAY)
        rx, mv, v_shd_snf, v_sa_da, ivin, iv, scratch, blind, bx, bx16, by = self._bufs
        rx[:n] = data  # no allocation; the views below are preallocated or one per use
        # 4. MDAS
        if svc != 2:
            end = n - 16
            h = _sha256(key.ipad)
            h.update(mv[:end])
            o = _sha256(key.opad)
            o.update(h.digest())
            # Blinded comparison: both tags go through AES under a per-codec random key
            # and the results are compared; the time of `==` then tells an attacker
            # nothing about how his tag relates to the right one (the same argument as
            # comparing HMACs of the MACs), and it costs two C calls instead of a loop.
            blind.encrypt(o.digest(), bx)  # both halves of the 32-byte tag
            blind.encrypt(mv[end:n], by)
            if bx16 != by:
                raise self._spoilt(_ERR_MAC)
        # 5. decrypt, PBC, PDG, BCC
        if svc == 1:
            pbc = (data[19] << 8) | data[20]
            if pbc > _MAX_PADATA:
                raise self._spoilt(_ERR_OVERSIZE)
            if pbc != n - 37:
                raise self._spoilt(_ERR_LENGTH)
            src = rx
            off = 21
        else:
            ivin[0:8] = v_shd_snf  # SHD | SNF | SA | DA
            ivin[8:16] = v_sa_da
            key.ecb.encrypt(ivin, iv)
            dec = key.cbc_dec
            dec.decrypt(iv, scratch)  # chain state := IV
            # decrypted in place (cryptolib: "in_buf and out_buf can also refer to the same
            # mutable buffer", docs.micropython.org library/cryptolib.html): the frame's copy
            # then holds the plaintext, no second 1088-byte buffer (issue 9 #9); the MAC over
            # the ciphertext was checked above
            end = 19 + enc
            dec.decrypt(mv[19:end], mv[19:end])
            pbc = (rx[19] << 8) | rx[20]
            pad = enc - pbc - (4 if svc == 2 else 2)
            if pbc > _MAX_PADATA:
                raise self._spoilt(_ERR_OVERSIZE)
            if pad < 0:
                raise self._spoilt(_ERR_LENGTH)
            if pad > 15:  # more than 15 padding bytes: bad block count
                raise self._spoilt(_ERR_PADDING)
            i = end - pad  # the padding must be zeros (no allocation)
            while i < end:
                if rx[i]:
                    raise self._spoilt(_ERR_PADDING)
                i += 1
            if svc == 2:
                d = _sha256(mv[19:21 + pbc]).digest()
                if d[0] != rx[21 + pbc] or d[1] != rx[22 + pbc]:
                    raise self._spoilt(_ERR_BCC)
            src = rx
            off = 21
        # 6. commit
        if win is None:  # first authenticated frame of this peer under this key
            try:
                win = ring.window(sa, key)
            except SCPMError as e:  # refused: the peer table is full
                raise self._spoilt(e.code)
        if snf == high + 1 and snf < win.reserved:  # in order: RxWindow.commit, inlined
            win.seen[snf & 63] = 1
            win.high = snf
            self.persist = False
        else:
            self.persist = win.commit(snf)
        self.hd = hd
        self.sa = sa
        self._s4, self.sa4 = self.sa4, s4  # a swap, no allocation
        self.da = self.addr
        self.service = svc
        self.key = key
        self.snf = snf
        self.authority = kind
        self._src = src
        self._off = off
        self._len = pbc
        return self
