# Secure RMCP-2 RMA control plane on the board, sans-IO (docs/rmcp2.md; profile B.5, B.7,
# B.13; X.603.1 Amd.1 10.1.1.4-10.1.1.5, 10.1.4, figure 95): KTLSREQ, SUBSREQ (with
# SERV_USER_IDENT in a closed group), SECAGREQ, SECLIST, SECALGREQ, SECAGANS, over the TLS
# link to the SM, every message after KTLSANS under K_TLS. No sockets, clocks or randomness
# here: rand(n) is injected, the adapter (rma_net.py) carries the bytes.
#
# Each receive() returns at most one message to send (a memoryview valid until the next
# call) or None. Buffers are made once; a message costs the envelope's and Writer's small
# slices only.
from micropython import const

from tessera_fw.rmcp2 import msg as M
from tessera_fw.rmcp2 import seal as S
from tessera_fw.rmcp2.err import Rmcp2Error

ST_NEW = const(0)
ST_KTLS = const(1)  # KTLSREQ sent
ST_SUBS = const(2)  # SUBSREQ sent
ST_POLICY = const(3)  # SECAGREQ sent, waiting for SECLIST (or SECALGANS)
ST_READY = const(4)  # SECAGANS OK sent: the agreed suite is in force
ST_REFUSED = const(5)  # SUBSANS other than ACCEPTED (self.result says why: 0x41, 0x42, ...)
ST_FAILED = const(6)  # the policy cannot be run here: SECAGANS FAILED CONFIGURATION sent
ST_TERMINATED = const(7)  # the SM ended the session (TERMREQ): TERMANS sent
POOL = const(2480)  # the envelope's two 1080-byte buffers and the Writer's 320 bytes
STATE_NAMES = ("new", "ktls", "subscribing", "policy", "ready", "refused", "failed", "terminated")

_KTLSANS = const(0xB2)
_SUBSANS = const(0xA1)
_SECLIST = const(0x22)
_SECALGANS = const(0xB0)
_HB = const(0xAD)
_TERMREQ = const(0xAE)
_TERMANS = const(0xAF)
_KTLS_SEED = const(0xC3)
_RESULT = const(0xC1)
_GK_MECH = const(0x15)
_CON_ALG = const(0x17)
_GK_ALG = const(0x18)
_AUTH_ALG = const(0x19)
_ERR_OTHER = const(0)  # errors[0]: well-formed but unexpected messages


class Rma:
    def __init__(self, sid, maid, cert_der, rand, sui=None, en_dec=(1, 2), auth=(1, 2), gk_names=(1,), pool=None):
        """pool: optional POOL bytes (a memoryview is fine) for the envelope's and the
        Writer's buffers, allocated by the caller before the heap fragments."""
        if len(sid) != 8 or len(maid) != 8:
            raise ValueError("Session ID and MAID are 8 bytes")
        self.sid = bytes(sid)
        self.maid = bytes(maid)
        self.cert_der = cert_der
        self.rand = rand
        self.sui = sui
        self.en_dec = en_dec
        self.auth_algs = auth
        self.gk_names = gk_names
        if pool is None:
            pool = memoryview(bytearray(POOL))
        self.w = M.Writer(0, pool[2160:POOL])
        self.dec = M.Decoder()
        self.env = S.Envelope(pool[0:1080], pool[1080:2160])
        self.win = S.Window()
        self.policy = bytearray(5)  # GP_ATTRIBUTE, GK_NAME, CON_EN_DEC, GK_EN_DEC, AUTH_ID of SECLIST
        self.errors = [0] * 19  # per error number of profile B.12 (0: unexpected message)
        self.hbs_in = 0  # HBs the SM sent on the admitted link
        self._lk = self._lookup
        self._wn = self._window
        self.ktls = None
        self.reset()

    def reset(self):
        """Forget the link (K_TLS, Seq, window, policy) for a new TLS connection; the
        buffers and the error counts stay (a board subscribes again after a drop, B.13)."""
        if self.ktls is not None:
            self.ktls.forget()
        self.ktls = None
        self.state = ST_NEW
        self.result = 0  # SUBSANS RESULT
        self.sec_return = 0  # what this RMA answered in SECAGANS
        self.missing = 0  # how many algorithms it asked for with SECALGREQ
        self.enc = 1  # bootstrap suite AES-CBC-128 + HMAC-SHA1 (B.7)
        self.mac = 1
        self.seq = 0
        self._nonce = b""
        w = self.win
        w.high = 0
        for i in range(len(w.seen)):
            w.seen[i] = 0

    def start(self):
        """TLS is up: KTLSREQ in clear inside TLS (B.5)."""
        self._nonce = self.rand(16)
        self.state = ST_KTLS
        return M.ktlsreq(self.w, self.sid, self.maid, self._nonce)

    def hb(self):
        """HB under K_TLS on the admitted link (B.3, T_HB): keeps it inside the SM's T_IDLE."""
        if self.state != ST_READY:
            return None
        return self._seal(M.empty(self.w, 0xAD, self.sid, self.maid))

    def hashed_ktls(self):
        return S.hashed_ktls(self.ktls._raw, self.sid) if self.ktls else b""

    def receive(self, data):
        try:
            return self._receive(data)
        except Rmcp2Error as e:
            self.errors[e.code] += 1
            return None

    # -- internals
    def _lookup(self, maid, ref, gen):
        if ref != 0x81 or not self._mine(maid):
            return None
        return self.ktls

    def _window(self, maid, key):
        return self.win

    def _mine(self, maid):
        m = self.maid
        for i in range(8):
            if maid[i] != m[i]:
                return False
        return True

    def _seal(self, plain):
        self.seq += 1
        return self.env.seal(plain, self.ktls, self.enc, self.mac, self.seq, self.rand(16))

    def _receive(self, data):
        d = self.dec
        if self.state == ST_KTLS:
            t = d.decode(data)
            if t != _KTLSANS or not d.same(4, self.sid) or not d.same(12, self.maid):
                self.errors[_ERR_OTHER] += 1
                return None
            o = d.pos[M.index(_KTLS_SEED)] + 4
            raw = S.ktls(bytes(d.buf[o:o + 32]), self.sid, self.maid, self._nonce, self.cert_der)
            self.ktls = S.ProtKey(0x81, raw)
            self.state = ST_SUBS
            return self._seal(M.subsreq(self.w, self.sid, self.maid, self.sui))
        if self.ktls is None:
            self.errors[_ERR_OTHER] += 1
            return None
        t = d.decode(self.env.unseal(data, self.enc, self.mac, self._lk, self._wn))
        if d.nt != 1 or not d.same(4, self.sid):
            self.errors[_ERR_OTHER] += 1
            return None
        if t == _SUBSANS and self.state == ST_SUBS:
            self.result = d.byte(_RESULT, 2)
            if self.result != 1:
                self.state = ST_REFUSED
                return None
            self.state = ST_POLICY
            return self._seal(M.secagreq(self.w, self.sid, self.maid))
        if t == _SECLIST and self.state == ST_POLICY:
            return self._seclist(d)
        if t == _SECALGANS and self.state == ST_POLICY and self.missing:
            # Tessera never transfers code (B.13): even AVAILABLE cannot be configured here
            return self._secagans(4)
        if self.state == ST_READY:  # the admitted link, in the agreed suite (B.7)
            if t == _HB:
                self.hbs_in += 1
                return None
            if t == _TERMREQ:  # the session ends (B.3): answer, then the link closes
                self.result = d.byte(_RESULT, 2)
                self.state = ST_TERMINATED
                return self._seal(M.result(self.w, _TERMANS, self.sid, self.maid, 0x01))
        self.errors[_ERR_OTHER] += 1
        return None

    def _seclist(self, d):
        p = self.policy
        p[0] = d.byte(_GK_MECH, 2)
        p[1] = d.byte(_GK_MECH, 4)
        p[2] = d.byte(_CON_ALG, 2)
        p[3] = d.byte(_GK_ALG, 2)
        p[4] = d.byte(_AUTH_ALG, 2)
        items = []
        if p[1] not in self.gk_names:
            items.append((0x1A, p[1]))
        if p[2] not in self.en_dec:
            items.append((0x1C, p[2]))
        if p[3] not in self.en_dec:
            items.append((0x1D, p[3]))
        if p[4] not in self.auth_algs:
            items.append((0x1E, p[4]))
        self.missing = len(items)
        if items:  # 10.1.4: ask for the modules it lacks; the answer decides
            return self._seal(M.secalgreq(self.w, self.sid, self.maid, items))
        return self._secagans(1)

    def _secagans(self, ret):
        out = self._seal(M.secagans(self.w, self.sid, self.maid, ret))
        self.sec_return = ret
        if ret == 1:  # the link moves to the agreed suite after SECAGANS (B.7)
            self.enc = self.policy[3]
            self.mac = self.policy[4]
            self.state = ST_READY
        else:
            self.state = ST_FAILED
        return out
