# Annex E membership authentication, client side, on the board (X.603.1 Amd.1 Annex E;
# every formula is defined by this project: docs/rmcp2-profile.md B.11). Written from the
# profile, independently of the host's annexe.py; both reproduce tests/vectors/rmcp2/join.json.
#
#   k1 = HMAC-SHA256(W, "RMCP2-ANNEXE-K1" || SID || IDc || rc)[0:16]
#   k2 = HMAC-SHA256(W, "RMCP2-ANNEXE-K2" || SID || IDc || rc || IDs || rs)[0:16]
#   E_k = GK_EN_DEC_ID over 256 bytes: AES-128-CBC zero IV, or AES-128-CTR from counter 0
#   M  = HMAC-SHA256(W, "RMCP2-ANNEXE-M" || Z || SHA256(SID||IDc||rc||E1||IDs||rs||E2))
#   Vs, Vc, K_MAS = HMAC-SHA256(M, "RMCP2-ANNEXE-VS" / "-VC" / "-KMAS")[0:16]
import hashlib

try:
    import cryptolib
except ImportError:  # firmware older than v1.19
    import ucryptolib as cryptolib
from micropython import const

from tessera_fw.crypto.aes import CTR
from tessera_fw.crypto.hmac import ct_equal
from tessera_fw.rmcp2.seal import hmac256

PASS1_LEN = const(288)  # IDc(16) rc(16) E_k1(g^A)(256)
PASS2_LEN = const(304)  # IDs(16) rs(16) E_k2(g^B)(256) Vs(16)
PASS3_LEN = const(16)  # Vc
_ZERO = bytes(16)

# failure reasons: the same numbers as the host's annexe.Fail
F_LAYOUT = const(1)
F_NOT_IN_ACL = const(2)
F_IDENTITY = const(3)
F_PUBLIC = const(4)
F_VERIFY = const(5)
F_NO_PENDING = const(6)
F_BUSY = const(7)
F_TIMEOUT = const(8)
F_REFUSED = const(9)
F_PROBE = const(10)


class JoinError(Exception):
    """A refused Annex E / join step; `reason` is one of F_*. Carries no key material."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def k1(w, sid, idc, rc):
    return hmac256(w, b"RMCP2-ANNEXE-K1", sid, idc, rc)[:16]


def k2(w, sid, idc, rc, ids, rs):
    return hmac256(w, b"RMCP2-ANNEXE-K2", sid, idc, rc, ids, rs)[:16]


def crypt(enc, key, data, decrypt=False):
    """E_k / D_k of Table E.1 over exactly 256 bytes (GK_EN_DEC_ID 1: CBC, 2: CTR)."""
    out = bytearray(len(data))
    if enc == 1:
        c = cryptolib.aes(key, 2, _ZERO)
        if decrypt:
            c.decrypt(data, out)
        else:
            c.encrypt(data, out)
    elif enc == 2:
        CTR(key, _ZERO).crypt(data, out)
    else:
        raise JoinError(F_LAYOUT)
    return out


def master(w, z, sid, idc, rc, ea, ids, rs, eb):
    h = hashlib.sha256(sid)
    for p in (idc, rc, ea, ids, rs, eb):
        h.update(p)
    return hmac256(w, b"RMCP2-ANNEXE-M", z, h.digest())


def keypair(dh, secret):
    """(exponent, public bytes): one 2048-bit exponentiation (~2.6 s on a Pico W), made
    ahead of time while idle so that the join then needs only the shared secret."""
    d = dh.DH(secret)
    return d._x, d.public


class Client:
    """One run of the three passes. `pair` = keypair(...) (made ahead or now); `sid` the
    8 Session ID bytes, `idc` the RMA's HASHED_MAID, `w` its HASHED_KTLS."""

    def __init__(self, sid, idc, w, enc, rc, pair):
        self.sid = sid
        self.idc = idc
        self.w = w
        self.enc = enc
        self.rc = rc
        self._x = pair[0]
        self.ea = crypt(enc, k1(w, sid, idc, rc), pair[1])
        self.kmas = None
        self.ids = None

    def pass1(self):
        return self.idc + self.rc + self.ea

    def pass2(self, data, dh):
        """Check pass 2 (a memoryview of PASS2_LEN bytes): Vs, then return Vc; K_MAS is
        then in self.kmas. `dh` is the tessera_fw.crypto.dh module."""
        if len(data) != PASS2_LEN:
            raise JoinError(F_LAYOUT)
        ids = bytes(data[0:16])
        rs = bytes(data[16:32])
        eb = bytes(data[32:288])
        gb = crypt(self.enc, k2(self.w, self.sid, self.idc, self.rc, ids, rs), eb, True)
        try:
            y = dh.decode_public(gb)  # 2 <= y <= p-2 (the boards' check, as SCPM)
        except dh.DHError:
            raise JoinError(F_PUBLIC)
        gb = None
        z = pow(y, self._x, dh.P).to_bytes(dh.SIZE, "big")
        self._x = 0
        m = master(self.w, z, self.sid, self.idc, self.rc, self.ea, ids, rs, eb)
        if not ct_equal(hmac256(m, b"RMCP2-ANNEXE-VS")[:16], data[288:304]):
            raise JoinError(F_VERIFY)
        self.kmas = hmac256(m, b"RMCP2-ANNEXE-KMAS")[:16]
        self.ids = ids
        return hmac256(m, b"RMCP2-ANNEXE-VC")[:16]
