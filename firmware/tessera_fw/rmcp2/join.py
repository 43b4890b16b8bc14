# The board RMA's tree join, sans-IO (X.603.1 Amd.1 10.2.3, 10.2.4, Annex E; profile B.11,
# B.15): PPROBREQ with PROBE_AUTH -> PPROBANS; RELREQ pass 1 -> RELANS pass 2 (Vs checked);
# RELREQ pass 3 -> RELANS under K_MAS with AUTH_ANS OK and KEY_MATERIAL(Kg).
#
# No sockets, clocks or randomness here: rand(n) is injected, the adapter carries the bytes.
# precompute() makes the DH key pair while idle (one ~2.6 s exponentiation on a Pico W), so
# that only the shared secret is on the critical path of the join. start() and receive()
# return one message to send (a memoryview valid until the next call) or None.
from micropython import const

from tessera_fw import acquire, release
from tessera_fw.rmcp2 import annexe as A
from tessera_fw.rmcp2 import msg as M
from tessera_fw.rmcp2 import seal as S
from tessera_fw.rmcp2 import tree as T
from tessera_fw.rmcp2.err import Rmcp2Error

ST_NEW = const(0)
ST_PROBE = const(1)  # PPROBREQ sent
ST_PASS1 = const(2)  # RELREQ pass 1 sent
ST_PASS3 = const(3)  # RELREQ pass 3 sent
ST_JOINED = const(4)  # K_MAS and Kg held
ST_REFUSED = const(5)  # self.fail says why (annexe.F_*)
STATE_NAMES = ("new", "probe", "pass1", "pass3", "joined", "refused")

_PPROBANS = const(0xA3)
_RELANS = const(0x0C)
_RESULT = const(0xC1)
_STATUS = const(0xC5)
_AUTH_ANS = const(0x24)
_KMAS = const(0x82)
_NOT_IN_ACL = const(0x16)
_DH = "tessera_fw.crypto.dh"


class Join:
    """`sid`, `maid`: 8 bytes each; `hashed_ktls` from the SM admission (seal.hashed_ktls);
    `enc`, `auth`: the agreed GK_EN_DEC_ID and AUTH_ID (SECLIST); `on_kg(gen, key16)` is
    called with the first Kg (e.g. the key layer's install)."""

    def __init__(self, sid, maid, hashed_ktls, enc, auth, rand, on_kg=None):
        if len(sid) != 8 or len(maid) != 8 or len(hashed_ktls) != 16:
            raise ValueError("sid 8, MAID 8, HASHED_KTLS 16 bytes")
        self.sid = bytes(sid)
        self.maid = bytes(maid)
        self.hmaid = T.hashed_maid(self.sid, self.maid)
        self.w = bytes(hashed_ktls)
        self.enc = enc
        self.auth = auth
        self.rand = rand
        self.on_kg = on_kg
        self.state = ST_NEW
        self.fail = 0
        self.errors = {}  # B.12 number or 100 + annexe.F_* -> count
        self.kmas = None
        self.kg_gen = 0
        self.kg = None
        self.status = None  # (children, members, key gen) from PPROBANS
        self.parent = None  # IDs: the DMA's HASHED_MAID
        self._pair = None
        self._cli = None
        self._w = M.Writer(384)
        self._d = M.Decoder()
        self._env = None
        self._win = None

    def precompute(self):
        """Make the DH key pair now (for the adapter to call while idle); True if it did."""
        if self._pair is not None or self.state >= ST_PASS1:
            return False
        dh, fresh = acquire(_DH)
        try:
            self._pair = A.keypair(dh, bytes(self.rand(32)))
        finally:
            dh = None
            if fresh:
                release(_DH)
        return True

    def start(self):
        nonce = bytes(self.rand(8))
        self.state = ST_PROBE
        return T.pprobreq(self._w, self.sid, self.maid, self.hmaid, nonce, T.probe_proof(self.w, self.sid, nonce))

    def _count(self, k):
        self.errors[k] = self.errors.get(k, 0) + 1

    def _refuse(self, why):
        self.state = ST_REFUSED
        self.fail = why
        self._cli = None
        return None

    def receive(self, buf):
        """One message from the DMA. Bad input is counted in `errors` and ignored (None);
        a refusal moves to ST_REFUSED with `fail`."""
        try:
            return self._receive(buf)
        except Rmcp2Error as e:
            self._count(e.code)
        except A.JoinError as e:
            if e.reason == A.F_VERIFY or e.reason == A.F_PUBLIC:
                return self._refuse(e.reason)  # pass 2 from someone without our W: stop
            self._count(100 + e.reason)
        return None

    def _receive(self, buf):
        st = self.state
        d = self._d
        if st == ST_PASS3 and len(buf) > 28 and buf[20] == _KMAS:
            if self._env is None:
                self._env = S.Envelope()
                self._win = S.Window()
            key = S.ProtKey(_KMAS, self._cli.kmas)
            win = self._win
            buf = self._env.unseal(buf, self.enc, self.auth, lambda m, r, g: key if r == _KMAS else None,
                                   lambda m, k: win)
            sealed = True
        else:
            sealed = False
        mt = d.decode(buf)
        if d.nt != 5 or not d.same(4, self.sid) or not d.same(12, self.maid):
            raise A.JoinError(A.F_LAYOUT)  # not from a DMA, or not for us
        if st == ST_PROBE and mt == _PPROBANS:
            res = d.byte(_RESULT, 2)
            if res != 1:
                return self._refuse(A.F_NOT_IN_ACL if res == _NOT_IN_ACL else A.F_REFUSED)
            if d.has(_STATUS):
                b = d.buf
                o = d.pos[M.index(_STATUS)]
                self.status = ((b[o + 2] << 8) | b[o + 3], (b[o + 4] << 8) | b[o + 5], b[o + 6])
            if self._pair is None:
                self.precompute()
            self._cli = A.Client(self.sid, self.hmaid, self.w, self.enc, bytes(self.rand(16)), self._pair)
            self._pair = None  # one run per key pair
            self.state = ST_PASS1
            return T.relreq(self._w, self.sid, self.maid, 1, self._cli.pass1())
        if mt != _RELANS or (st != ST_PASS1 and st != ST_PASS3):
            raise A.JoinError(A.F_LAYOUT)
        res = d.byte(_AUTH_ANS, 2)
        if res == 2:  # Auth_result ERROR (in clear: no K_MAS exists for a refused run)
            return self._refuse(A.F_REFUSED)
        ma = d.ma
        if st == ST_PASS1:
            if res != 3 or not ma or d.buf[ma + 3] != 2:
                raise A.JoinError(A.F_LAYOUT)
            ln = (d.buf[ma + 1] << 8) | d.buf[ma + 2]
            dh, fresh = acquire(_DH)
            try:
                vc = self._cli.pass2(d.view(ma + 4, ma + ln), dh)
            finally:
                dh = None
                if fresh:
                    release(_DH)
            self.parent = self._cli.ids
            self.state = ST_PASS3
            return T.relreq(self._w, self.sid, self.maid, 3, vc)
        # ST_PASS3: only the RELANS under K_MAS with AUTH_ANS OK and Kg is the result
        kd = d.key_data(d.akm)
        if not sealed or res != 1 or ma or d.key_type(d.akm) != 2 or kd is None or len(kd) != 20 or kd[0] == 0 or not 1 <= kd[1] <= 2:
            raise A.JoinError(A.F_LAYOUT)
        self.kmas = self._cli.kmas
        self.kg_gen = kd[0]
        self.kg = bytes(kd[4:20])
        self._cli = None
        self._env = None
        self.state = ST_JOINED
        if self.on_kg is not None:
            self.on_kg(self.kg_gen, self.kg)
        return None

