# Secure RMCP-2 message protection on the board (docs/rmcp2-profile.md B.5-B.7, all
# defined by this project): the envelope an RMA needs for K_TLS, K_MAS, Kg and HASHED_KTLS
# messages, and the key derivations of B.5. Written independently of the host's protect.py.
import hashlib

try:
    import cryptolib
except ImportError:  # firmware older than v1.19
    import ucryptolib as cryptolib
from micropython import const

from tessera_fw.crypto.hmac import HMAC, ct_equal
from tessera_fw.rmcp2.err import Rmcp2Error
from tessera_fw.rmcp2.msg import header

# error numbers of profile B.12 (const.py), inlined at compile time
_ERR_OVERSIZE = const(3)
_ERR_KEY = const(14)
_ERR_ALGORITHM = const(15)
_ERR_MAC = const(16)
_ERR_REPLAY = const(17)
_ERR_PADDING = const(18)

_HDR = const(20)
_SEC = const(8)  # KeyRef EncAlg AuthAlg KeyGen Seq(4)
_OVER = const(40)  # SEC + IV + Tag
_TAG = const(16)
_MAX_PLAIN = const(1024)
_MAX_SEALED = const(1080)  # 1024 plain + 40 + at most 16 padding
SEQ_MAX = const(0x3FFFFFFF)  # B.7: a small int on every board
_WINDOW = const(32)
_HASH = ("", "sha1", "md5")  # AuthAlg 1, 2 (Table 17)
_ctr = None  # tessera_fw.crypto.aes.CTR, imported when a link first uses AES-CTR (B.7)


def _CTR(key, iv):
    """CTR from ECB (crypto/aes.py): loaded only when the agreed suite is AES-CTR, so that
    an admission (bootstrap suite AES-CBC) does not hold its 3 KB (docs/benchmarks.md)."""
    global _ctr
    if _ctr is None:
        from tessera_fw.crypto.aes import CTR

        _ctr = CTR
    return _ctr(key, iv)


def hmac256(key, *parts):
    return HMAC(key).digest(*parts)


class ProtKey:
    """A 16-byte key with its KeyRef (B.7) and generation; derived keys per algorithm
    are made once, on first use: K_enc = HMAC(K, "RMCP2-ENC"||alg)[0:16],
    K_mac = HMAC(K, "RMCP2-MAC"||alg)."""

    def __init__(self, ref, raw, gen=0):
        if len(raw) != 16:
            raise ValueError("key must be 16 bytes")
        self.ref = ref
        self.gen = gen
        self._raw = bytes(raw)
        self._enc = [None, None, None]
        self._mac = [None, None, None]

    def k_enc(self, alg):
        k = self._enc[alg]
        if k is None:
            k = self._enc[alg] = hmac256(self._raw, b"RMCP2-ENC", bytes((alg,)))[:16]
        return k

    def mac(self, alg):
        """The HMAC object (padded keys) for AuthAlg `alg`."""
        m = self._mac[alg]
        if m is None:
            m = self._mac[alg] = HMAC(hmac256(self._raw, b"RMCP2-MAC", bytes((alg,))), _HASH[alg])
        return m

    def forget(self):
        self._raw = b""
        self._enc = [None, None, None]
        self._mac = [None, None, None]


class Window:
    """Highest Seq and the 32 below it (B.7); one slot per Seq modulo 32."""

    def __init__(self):
        self.high = 0
        self.seen = bytearray(_WINDOW)

    def check(self, seq):
        if seq < 1 or seq > SEQ_MAX:
            raise Rmcp2Error(_ERR_REPLAY)
        h = self.high
        if seq <= h and (h - seq >= _WINDOW or self.seen[seq & 31]):
            raise Rmcp2Error(_ERR_REPLAY)

    def commit(self, seq):
        h = self.high
        s = self.seen
        if seq > h:
            if seq - h >= _WINDOW:
                for i in range(_WINDOW):
                    s[i] = 0
            else:
                for v in range(h + 1, seq):
                    s[v & 31] = 0
            self.high = seq
        s[seq & 31] = 1


class Envelope:
    """seal() and unseal() in preallocated buffers; their results are memoryviews valid
    until the next call. The suite (EncAlg, AuthAlg) in force for the link is passed in:
    the bytes on the wire are checked against it, never negotiated (B.7)."""

    def __init__(self, out=None, pt=None):
        # out, pt: 1080-byte buffers the caller allocated before its modules (board.py),
        # so that they do not have to be found in a heap fragmented by the imports
        self.out = out if out is not None else bytearray(_MAX_SEALED)
        self.pt = pt if pt is not None else bytearray(_MAX_SEALED)
        self._omv = memoryview(self.out)
        self._pmv = memoryview(self.pt)

    def seal(self, plain, key, enc, auth, seq, iv):
        """Protect one plain message (header + controls) under `key` with Seq and IV."""
        n = len(plain)
        if n < _HDR or n > _MAX_PLAIN:
            raise Rmcp2Error(_ERR_OVERSIZE)
        if enc not in (1, 2) or auth not in (1, 2):
            raise Rmcp2Error(_ERR_ALGORITHM)
        if seq < 1 or seq > SEQ_MAX or len(iv) != 16:
            raise ValueError("Seq 1..0x3FFFFFFF, 16-byte IV")
        body = n - _HDR
        clen = (body // 16 + 1) * 16 if enc == 1 else body
        total = _HDR + _OVER + clen
        o = self.out
        mv = self._omv
        o[0:_HDR] = plain[0:_HDR]
        o[2] = total >> 8
        o[3] = total & 0xFF
        o[20] = key.ref
        o[21] = enc
        o[22] = auth
        o[23] = key.gen
        o[24] = (seq >> 24) & 0xFF
        o[25] = (seq >> 16) & 0xFF
        o[26] = (seq >> 8) & 0xFF
        o[27] = seq & 0xFF
        o[28:44] = iv
        c = mv[44:44 + clen]
        if enc == 1:
            p = self.pt
            p[0:body] = plain[_HDR:n]
            pad = clen - body
            for i in range(body, clen):
                p[i] = pad
            cryptolib.aes(key.k_enc(1), 2, iv).encrypt(self._pmv[:clen], c)
        else:
            _CTR(key.k_enc(2), iv).crypt(memoryview(plain)[_HDR:n], c)
        end = 44 + clen
        o[end:end + _TAG] = key.mac(auth).digest(mv[:end])[:_TAG]
        return mv[:total]

    def unseal(self, data, enc, auth, lookup, window):
        """Check a protected message in the order of B.7 and return a memoryview of the
        plain message (Length fixed). lookup(maid_view, ref, gen) -> ProtKey or None;
        window(maid_view, key) -> Window (committed only after the Tag verified)."""
        n = len(data)
        header(data, _HDR + _OVER, _MAX_SEALED)
        ref = data[20]
        gen = data[23]
        if not (1 <= ref <= 3 or 0x81 <= ref <= 0x83):
            raise Rmcp2Error(_ERR_KEY)
        if (ref <= 3) != (gen != 0):
            raise Rmcp2Error(_ERR_KEY)
        e = data[21]
        a = data[22]
        if e < 1 or e > 2 or a < 1 or a > 2:
            raise Rmcp2Error(_ERR_ALGORITHM)
        clen = n - _HDR - _OVER
        if e == 1 and (clen == 0 or clen & 15):
            raise Rmcp2Error(_ERR_PADDING)
        if e != enc or a != auth:
            raise Rmcp2Error(_ERR_ALGORITHM)
        mv = memoryview(data)
        maid = mv[12:20]
        key = lookup(maid, ref, gen)
        if key is None:
            raise Rmcp2Error(_ERR_KEY)
        seq = (data[24] << 24) | (data[25] << 16) | (data[26] << 8) | data[27]
        win = window(maid, key)
        win.check(seq)
        end = n - _TAG
        if not ct_equal(key.mac(a).digest(mv[:end])[:_TAG], mv[end:n]):
            raise Rmcp2Error(_ERR_MAC)
        p = self.pt
        iv = bytes(mv[28:44])
        if e == 1:
            cryptolib.aes(key.k_enc(1), 2, iv).decrypt(mv[44:end], self._pmv[_HDR:_HDR + clen])
            pad = p[_HDR + clen - 1]
            if pad < 1 or pad > 16:
                raise Rmcp2Error(_ERR_PADDING)
            for i in range(_HDR + clen - pad, _HDR + clen):
                if p[i] != pad:
                    raise Rmcp2Error(_ERR_PADDING)
            body = clen - pad
        else:
            _CTR(key.k_enc(2), iv).crypt(mv[44:end], self._pmv[_HDR:_HDR + clen])
            body = clen
        win.commit(seq)
        p[0:_HDR] = mv[0:_HDR]
        total = _HDR + body
        p[2] = total >> 8
        p[3] = total & 0xFF
        return self._pmv[:total]


def ktls(seed, sid, maid, nonce_c, cert_der):
    """K_TLS (B.5): HMAC-SHA256(seed, "RMCP2-KTLS"||sid||maid||Nc||SHA256(cert))[0:16]."""
    return hmac256(seed, b"RMCP2-KTLS", sid, maid, nonce_c, hashlib.sha256(cert_der).digest())[:16]


def hashed_ktls(k_tls, sid):
    return hmac256(k_tls, b"RMCP2-HASHED-KTLS", sid)[:16]
