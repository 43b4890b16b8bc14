"""Annex E membership authentication, both roles, sans-IO (docs/rmcp2-profile.md B.11).

X.603.1 Amd.1 Annex E gives the three passes (client -> server: IDc, rc, E_k(g^A);
server -> client: IDs, rs, E_k(g^B), Vs; client -> server: Vc) but no formula, group or
mapping: every formula here is **defined by this project** (profile B.11) and pinned by
tests/vectors/rmcp2/join.json. Nothing here touches sockets or clocks; randomness (rc/rs
and the DH exponent) is passed in.

`W` is the 16-byte 'hashed auth' both parties hold: HASHED_KTLS (B.5) between an RMA and
its DMA, `rm_secret(Ks)` between a CMA and its PMA (two DMAs).
"""
from __future__ import annotations

import hashlib
from enum import IntEnum

from tessera.crypto import aes
from tessera.crypto.dh import SIZE as PUB_LEN
from tessera.crypto.dh import DH, DHError, decode_public
from tessera.crypto.mac import ct_equal, hmac
from tessera.errors import TesseraError

ID_LEN = 16
R_LEN = 16
V_LEN = 16
PASS1_LEN = ID_LEN + R_LEN + PUB_LEN  # IDc rc E_k1(g^A) = 288
PASS2_LEN = ID_LEN + R_LEN + PUB_LEN + V_LEN  # IDs rs E_k2(g^B) Vs = 304
PASS3_LEN = V_LEN  # Vc
_ZERO16 = bytes(16)


class Fail(IntEnum):
    """Why a join step was refused (same numbers on the firmware, join.py)."""

    LAYOUT = 1  # wrong pass, wrong length, wrong message where a pass was due
    NOT_IN_ACL = 2  # IDc (HASHED_MAID) not in the DMA's ACL (10.1.5)
    IDENTITY = 3  # IDc / PROBE_AUTH's HASHED_MAID is not the hash of the header MAID
    PUBLIC = 4  # a decrypted DH value is out of range / not in the subgroup (wrong k)
    VERIFY = 5  # Vs or Vc does not verify (wrong W, tampered or replayed pass)
    NO_PENDING = 6  # pass 3 without a live pass 1 on this link (replay, or after T_ANNEXE)
    BUSY = 7  # pending-authentication table full
    TIMEOUT = 8  # T_ANNEXE ran out
    REFUSED = 9  # the server answered Auth_result ERROR / a PPROBANS other than ACCEPTED
    PROBE = 10  # PROBE_AUTH proof wrong or its nonce replayed


class AnnexeError(TesseraError):
    def __init__(self, reason: Fail, msg: str = "") -> None:
        super().__init__(f"Annex E {reason.name}" + (f": {msg}" if msg else ""))
        self.reason = reason


def _sid(session_id: int) -> bytes:
    return session_id.to_bytes(8, "big")


def k1(w: bytes, session_id: int, id_c: bytes, r_c: bytes) -> bytes:
    """Key of E_k(g^A) in pass 1 (B.11)."""
    return hmac(w, b"RMCP2-ANNEXE-K1" + _sid(session_id) + id_c + r_c)[:16]


def k2(w: bytes, session_id: int, id_c: bytes, r_c: bytes, id_s: bytes, r_s: bytes) -> bytes:
    """Key of E_k(g^B) in pass 2 (B.11)."""
    return hmac(w, b"RMCP2-ANNEXE-K2" + _sid(session_id) + id_c + r_c + id_s + r_s)[:16]


def e_k(enc: int, key: bytes, value: bytes) -> bytes:
    """E of Table E.1 with the policy's GK_EN_DEC_ID: 0x01 AES-128-CBC with a zero IV, or
    0x02 AES-128-CTR from counter 0, over exactly 256 bytes (no padding). k is fresh for
    every run (it depends on rc, rs), so the fixed IV never repeats under one key."""
    if enc == 1:
        return aes.cbc_encrypt(key, _ZERO16, value)
    if enc == 2:
        return aes.ctr_crypt(key, _ZERO16, value)
    raise ValueError("GK_EN_DEC_ID must be AES-CBC-128 or AES-CTR-128")


def d_k(enc: int, key: bytes, value: bytes) -> bytes:
    if enc == 1:
        return aes.cbc_decrypt(key, _ZERO16, value)
    return e_k(enc, key, value)


def master(w: bytes, z: bytes, session_id: int, id_c: bytes, r_c: bytes, ea: bytes,
           id_s: bytes, r_s: bytes, eb: bytes) -> bytes:
    """M = HMAC-SHA256(W, "RMCP2-ANNEXE-M" || Z || SHA256(transcript)) (B.11)."""
    t = hashlib.sha256(_sid(session_id) + id_c + r_c + ea + id_s + r_s + eb).digest()
    return hmac(w, b"RMCP2-ANNEXE-M" + z + t)


def v_s(m: bytes) -> bytes:
    return hmac(m, b"RMCP2-ANNEXE-VS")[:16]


def v_c(m: bytes) -> bytes:
    return hmac(m, b"RMCP2-ANNEXE-VC")[:16]


def k_mas(m: bytes) -> bytes:
    return hmac(m, b"RMCP2-ANNEXE-KMAS")[:16]


def rm_secret(ks: bytes, session_id: int) -> bytes:
    """W between two DMAs (PMA/CMA): every holder of Ks is an RM-region member (10.2.4)."""
    return hmac(ks, b"RMCP2-ANNEXE-RM" + _sid(session_id))[:16]


def _public(b: bytes) -> None:
    try:
        decode_public(b, full=True)  # 2..p-2 and y^q = 1 (host: full subgroup check)
    except DHError as e:
        raise AnnexeError(Fail.PUBLIC, str(e)) from None


def parse_pass1(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(IDc, rc, E_k1(g^A)) of MA_AUTH pass 1."""
    if len(data) != PASS1_LEN:
        raise AnnexeError(Fail.LAYOUT, f"pass 1 is {PASS1_LEN} bytes, not {len(data)}")
    return bytes(data[:16]), bytes(data[16:32]), bytes(data[32:])


class Client:
    """The CMA/RMA side. `dh` may be a key pair made ahead of time (one exponentiation
    then remains: the shared secret)."""

    def __init__(self, session_id: int, id_c: bytes, w: bytes, enc: int, r_c: bytes, dh: DH) -> None:
        if len(id_c) != ID_LEN or len(w) != 16 or len(r_c) != R_LEN:
            raise ValueError("IDc 16, W 16, rc 16 bytes")
        self.sid, self.id_c, self._w, self.enc, self.r_c, self._dh = session_id, id_c, w, enc, r_c, dh
        self._ea = e_k(enc, k1(w, session_id, id_c, r_c), dh.public)
        self.kmas: bytes | None = None

    def pass1(self) -> bytes:
        return self.id_c + self.r_c + self._ea

    def pass2(self, data: bytes) -> bytes:
        """Check pass 2 (Vs) and return pass 3 (Vc); K_MAS is then in `kmas`."""
        if len(data) != PASS2_LEN:
            raise AnnexeError(Fail.LAYOUT, f"pass 2 is {PASS2_LEN} bytes, not {len(data)}")
        id_s, r_s, eb, vs = bytes(data[:16]), bytes(data[16:32]), bytes(data[32:288]), bytes(data[288:])
        gb = d_k(self.enc, k2(self._w, self.sid, self.id_c, self.r_c, id_s, r_s), eb)
        _public(gb)
        try:
            z = self._dh.shared(gb, full_check=False)  # checked just above
        except DHError as e:  # pragma: no cover - _public rejects first
            raise AnnexeError(Fail.PUBLIC, str(e)) from None
        m = master(self._w, z, self.sid, self.id_c, self.r_c, self._ea, id_s, r_s, eb)
        if not ct_equal(v_s(m), vs):
            raise AnnexeError(Fail.VERIFY, "Vs")
        self.kmas = k_mas(m)
        self.id_s = id_s
        return v_c(m)


class Server:
    """The PMA/DMA side for one client run: pass1() gives pass 2, pass3() verifies Vc and
    returns K_MAS. Holds only this run's ephemeral values until then."""

    def __init__(self, session_id: int, id_s: bytes, w: bytes, enc: int, r_s: bytes, dh: DH) -> None:
        if len(id_s) != ID_LEN or len(w) != 16 or len(r_s) != R_LEN:
            raise ValueError("IDs 16, W 16, rs 16 bytes")
        self.sid, self.id_s, self._w, self.enc, self.r_s, self._dh = session_id, id_s, w, enc, r_s, dh
        self._m: bytes | None = None

    def pass1(self, data: bytes) -> bytes:
        id_c, r_c, ea = parse_pass1(data)
        ga = d_k(self.enc, k1(self._w, self.sid, id_c, r_c), ea)
        _public(ga)
        z = self._dh.shared(ga, full_check=False)
        eb = e_k(self.enc, k2(self._w, self.sid, id_c, r_c, self.id_s, self.r_s), self._dh.public)
        self._m = master(self._w, z, self.sid, id_c, r_c, ea, self.id_s, self.r_s, eb)
        self.id_c = id_c
        return self.id_s + self.r_s + eb + v_s(self._m)

    def pass3(self, data: bytes) -> bytes:
        if self._m is None:
            raise AnnexeError(Fail.NO_PENDING, "pass 3 before pass 1")
        if len(data) != PASS3_LEN:
            raise AnnexeError(Fail.LAYOUT, f"pass 3 is {PASS3_LEN} bytes, not {len(data)}")
        m, self._m = self._m, None  # one attempt per run: a second Vc is NO_PENDING
        if not ct_equal(v_c(m), data):
            raise AnnexeError(Fail.VERIFY, "Vc")
        return k_mas(m)
