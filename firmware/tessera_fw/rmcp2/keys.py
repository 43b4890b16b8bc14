# Group key Kg and content key Kc on the board RMA, sans-IO (docs/rmcp2-profile.md B.16;
# X.603.1 Amd.1 10.2.1.1-10.2.1.2, figure 97). After the join (RELANS with Kg under K_MAS,
# p2-join's layer) `joined()` gives this engine the parent DMA, K_MAS and Kg; `receive()`
# then takes KEYDELIVER messages from the DMA:
#   - Kg under K_MAS (a BACKWARD re-key or a resync): the previous Kg is dropped at once;
#   - Kg under the current Kg (PERIODIC / FORWARD rollover): the previous Kg stays for the
#     grace (in-flight messages), then goes;
#   - Kc under Kg (the SMA's key re-sealed by the DMA): installed in the content ring with
#     ring.install(gen, key16), which keeps the current and the next Kc.
# Replay (B.7 window per key and generation) and staleness (a Gen not ahead of the held one)
# are refused with their error numbers; nothing is stored before the Tag verifies. No
# clock inside: now_ms comes from time.ticks_ms() and is compared with boards' arithmetic.
from micropython import const

from tessera_fw.rmcp2 import seal as S
from tessera_fw.rmcp2.err import Rmcp2Error
from tessera_fw.rmcp2.msg import Decoder
from tessera_fw.scpm.ticks import ticks_add30, ticks_diff30

# error numbers of profile B.12 (const.py), inlined at compile time: importing const.py
# would hold 7 KB of heap on a board for its public names (docs/rmcp2.md, board tree client)
_ERR_VALUE = const(11)
_ERR_SUBCONTROL = const(12)
_ERR_MAID = const(13)
_ERR_KEY = const(14)
_ERR_REPLAY = const(17)
_KEYDELIVER = const(0x24)
_REF_KG = const(0x02)
_REF_KMAS = const(0x82)
_KT_KG = const(2)
_KT_KC = const(3)
_LEAVREQ = const(0xAB)
_HB = const(0xAD)
_LEAVANS = const(0xAC)
_RESULT = const(0xC1)
_NT_DMA = const(5)
GRACE_MS = const(30000)  # B.16: previous Kg kept 30 s after a group rollover
_ERR_OTHER = const(0)  # errors[0]: authentic but not a key delivery this RMA takes


def ahead(new, old):
    """How far generation `new` is ahead of `old` on the 1..255 circle (B.6), 0 when it is
    not 1..127 ahead (the same, older, or stale)."""
    d = (new - old) % 255
    return d if 1 <= d <= 127 else 0


class Keys:
    """Kg/Kc state of one RMA. `env` and `dec` may be shared with the RMA's control plane
    (they are used one message at a time) to save their buffers."""

    def __init__(self, sid, maid, ring, enc=1, auth=1, env=None, dec=None, grace_ms=GRACE_MS):
        if len(sid) != 8 or len(maid) != 8:
            raise ValueError("Session ID and MAID are 8 bytes")
        self.sid = bytes(sid)
        self.maid = bytes(maid)
        self.ring = ring
        self.enc = enc  # the suite in force (GK_EN_DEC_ID, AUTH_ID of SECLIST, B.7)
        self.auth = auth
        self.env = env or S.Envelope()
        self.dec = dec or Decoder()
        self.grace_ms = grace_ms
        self.dma = None  # parent DMA's MAID
        self.kmas = None
        self.kg = None
        self.kg_prev = None
        self.prev_until = 0
        self.w_mas = S.Window()
        self.w_kg = S.Window()
        self.w_prev = S.Window()
        self.kc_gen = 0  # newest Kc generation installed (0: none yet)
        self.kc_key = bytearray(16)  # its key, to recognise a re-sent delivery
        self.errors = [0] * 19  # per error number of B.12 (0: unexpected message)
        # the last message receive() opened: its type (0: none) and, for a LEAVREQ/LEAVANS
        # under K_MAS from the parent DMA, its RESULT (the control link acts on those)
        self.mtype = 0
        self.result = 0
        self._now = 0
        self._lk = self._lookup
        self._wn = self._window

    def joined(self, dma_maid, kmas, kg_gen, kg):
        """The join succeeded: K_MAS from Annex E, Kg from RELANS (under K_MAS)."""
        self.leave()
        self.dma = bytes(dma_maid)
        self.kmas = S.ProtKey(_REF_KMAS, kmas)
        self.kg = S.ProtKey(_REF_KG, kg, kg_gen)

    def leave(self):
        """Forget every key of the group (LEAVANS, expulsion, re-join elsewhere)."""
        for k in (self.kmas, self.kg, self.kg_prev):
            if k is not None:
                k.forget()
        self.kmas = self.kg = self.kg_prev = self.dma = None
        self.w_mas = S.Window()
        self.w_kg = S.Window()
        self.w_prev = S.Window()
        self.kc_gen = 0

    def kg_gen(self):
        return self.kg.gen if self.kg is not None else 0

    def receive(self, data, now_ms):
        """One sealed message from the parent DMA. Returns the Key_Type installed (2 Kg,
        3 Kc) or 0 (nothing new: a re-sent key, or an error counted in `errors`)."""
        self._now = now_ms
        self.mtype = 0
        if self.kg_prev is not None and ticks_diff30(now_ms, self.prev_until) >= 0:
            self._drop_prev()
        try:
            return self._receive(data)
        except Rmcp2Error as e:
            self.errors[e.code] += 1
            return 0

    # ------------------------------------------------------------------ internals
    def _lookup(self, maid, ref, gen):
        if self.kg is None:
            return None
        if ref == _REF_KMAS:  # every message under K_MAS names this RMA (B.15 control link, B.16)
            return self.kmas if gen == 0 and _eq(maid, self.maid) else None
        if ref != _REF_KG or not _eq(maid, self.dma):
            return None
        if gen == self.kg.gen:
            return self.kg
        p = self.kg_prev
        return p if p is not None and gen == p.gen else None

    def _window(self, maid, key):
        return self.w_mas if key is self.kmas else self.w_kg if key is self.kg else self.w_prev

    def _receive(self, data):
        if self.kg is None:
            raise Rmcp2Error(_ERR_KEY)  # not in a group: no key to open anything with
        ref = data[20] if len(data) > 20 else 0
        plain = self.env.unseal(data, self.enc, self.auth, self._lk, self._wn)
        d = self.dec
        t = d.decode(plain)
        if not d.same(4, self.sid):
            raise Rmcp2Error(_ERR_MAID)
        if t != _KEYDELIVER:
            # the control link's HB, LEAVREQ, LEAVANS (B.15), from the DMA: K_MAS is the same
            # key both ways, so NT tells this RMA's own messages reflected back from the DMA's
            if ref == _REF_KMAS and d.nt == _NT_DMA and (t == _HB or t == _LEAVREQ or t == _LEAVANS):
                self.mtype = t  # the caller counts, answers or ends
                self.result = d.byte(_RESULT, 2) if t != _HB else 0
                return 0
            self.errors[_ERR_OTHER] += 1
            return 0
        self.mtype = t
        kt = d.key_type(d.km)
        kd = d.key_data(d.km)
        if len(kd) != 20:
            raise Rmcp2Error(_ERR_SUBCONTROL)  # KEY_DATA is 20 bytes (B.6)
        gen = kd[0]
        if gen == 0 or kd[1] < 1 or kd[1] > 2:
            raise Rmcp2Error(_ERR_VALUE)
        if kt == _KT_KG:
            return self._install_kg(gen, kd[4:20], ref == _REF_KMAS)
        if kt == _KT_KC and ref == _REF_KG:
            return self._install_kc(gen, kd[4:20])
        self.errors[_ERR_OTHER] += 1  # a Kc under K_MAS, a Ks: not carried this way (B.16)
        return 0

    def _install_kg(self, gen, key, unicast):
        if not ahead(gen, self.kg.gen):
            raise Rmcp2Error(_ERR_REPLAY)
        old = self.kg
        self.kg = S.ProtKey(_REF_KG, bytes(key), gen)
        self._drop_prev()
        if unicast:  # BACKWARD: the old Kg may be held by a member that left, drop it now
            old.forget()
        else:
            self.kg_prev = old
            self.prev_until = ticks_add30(self._now, self.grace_ms)
            self.w_prev = self.w_kg
        self.w_kg = S.Window()
        return _KT_KG

    def _install_kc(self, gen, key):
        if self.kc_gen:
            if gen == self.kc_gen and _eq(key, self.kc_key):
                return 0  # the same delivery re-sent (e.g. a catch-up)
            if not ahead(gen, self.kc_gen):
                raise Rmcp2Error(_ERR_REPLAY)
        self.ring.install(gen, bytes(key))
        self.kc_gen = gen
        self.kc_key[:] = key
        return _KT_KC

    def _drop_prev(self):
        if self.kg_prev is not None:
            self.kg_prev.forget()
            self.kg_prev = None


def _eq(a, b):
    if b is None or len(a) != len(b):
        return False
    for i in range(len(a)):
        if a[i] != b[i]:
            return False
    return True
