# Secure RMCP-2 messages on the board (docs/rmcp2-profile.md A.4-A.7, B.1-B.4, B.12),
# written independently of the host codec. The Decoder validates ANY message of the
# profile (so malformed input of every kind gets its error number), without copying it:
# results are offsets into the caller's buffer, kept in preallocated arrays. The Writer
# builds the messages an RMA sends in one preallocated buffer.
from array import array

from micropython import const

from tessera_fw.rmcp2.err import Rmcp2Error

# error numbers of profile B.12 (const.py), inlined at compile time
_ERR_TRUNCATED = const(1)
_ERR_LENGTH = const(2)
_ERR_OVERSIZE = const(3)
_ERR_VERSION = const(4)
_ERR_NODE_TYPE = const(5)
_ERR_UNKNOWN_MESSAGE = const(6)
_ERR_CONTROL_LENGTH = const(7)
_ERR_MISSING_CONTROL = const(8)
_ERR_UNEXPECTED_CONTROL = const(9)
_ERR_DUPLICATE_CONTROL = const(10)
_ERR_VALUE = const(11)
_ERR_SUBCONTROL = const(12)
_ERR_MAID = const(13)

_HDR = const(20)
_MAX = const(1024)
_NCTL = const(27)  # known controls: 0x11-0x24 -> index 0-19, 0xC1-0xC7 -> 20-26
_SLOTS = const(64)  # known controls recorded per message (SECAGREQ: at most 49)
_MAX_KM = const(0x804)  # 11.2.9.3 b
_MAX_ACL = const(2000)  # B.8

# control index of the codes the checks below use
_I_SMA_PROPOSE = const(0)
_I_GK_CAPAB = const(1)
_I_EN_CAPAB = const(2)
_I_AUTH_CAPAB = const(3)
_I_SEC_RETURN = const(14)
_I_KEY_INFO = const(15)
_I_ACL_LIST = const(16)
_I_SUI = const(17)
_I_AUTH = const(18)
_I_AUTH_ANS = const(19)
_I_RESULT = const(20)
_I_DELIVER_RESULT = const(23)
_I_STATUS = const(24)
_I_PROBE_AUTH = const(25)
_I_CANDIDATE = const(26)

# fixed Length per index (0: variable, SERV_USER_IDENT), A.6 and B.4
_LEN = bytes((8, 4, 4, 4, 8, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2, 0, 4, 4,
              4, 20, 36, 4, 8, 36, 10))
# how many times a control may occur in one message (B.2, B.3)
_MAXN = bytes((1, 16, 16, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
               1, 1, 1, 5, 1, 1, 8))
# first code byte range [lo, hi] of the one-code controls, by index (0, 0: checked apart)
_LO = bytes((0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0))
_HI = bytes((0, 5, 4, 3, 0, 1, 4, 4, 3, 5, 1, 4, 4, 3, 4, 3, 0, 0, 1, 3, 0, 0, 0, 2, 0, 0, 0))
# second byte: PREFER upper bound for *_CAPAB (11.2.5.3-5); AUTH_MECH's AUTH_NAME must be 1
_PREFER = bytes((0, 6, 5, 3))
# RESULT codes (B.9 and Table 23)
_RESULTS = bytes((0x01, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x20, 0x21, 0x22, 0x41, 0x42))


def _b(*idx):
    m = 0
    for i in idx:
        m |= 1 << i
    return m


def _nt(*nts):
    return _b(*nts)


_MAS = _nt(2, 3, 5)
_ALLNT = _nt(1, 2, 3, 5)
_DELIVERS = _b(9, 10, 11, 12, 13)
_CAPABS = _b(1, 2, 3)
# message type -> (node types allowed, mandatory controls, allowed controls), A.5 and B.3;
# kept at run time as two bytes objects (_compact below): the dict of tuples would hold
# 2.3 KB of heap on the unix port, these 430 B
_RULES = {
    0x02: (_MAS, 0, _b(_I_SUI)),  # SUBSREQ
    0x09: (_nt(3, 5), _b(_I_AUTH), _b(_I_AUTH)),  # RELREQ
    0x0C: (_nt(2, 5), _b(_I_AUTH_ANS), _b(_I_AUTH_ANS, _I_KEY_INFO)),  # RELANS
    0x21: (_MAS, 0, _b(_I_SMA_PROPOSE) | _CAPABS),  # SECAGREQ
    0x22: (_nt(1), _b(4, 5, 6, 7, 8), _b(4, 5, 6, 7, 8)),  # SECLIST
    0x27: (_MAS, 0, _DELIVERS),  # SECALGREQ
    0x23: (_MAS, _b(_I_SEC_RETURN), _b(_I_SEC_RETURN)),  # SECAGANS
    0x24: (_nt(1, 2, 5), _b(_I_KEY_INFO), _b(_I_KEY_INFO)),  # KEYDELIVER
    0x25: (_nt(5), 0, 0),  # HRSREQ
    0x26: (_nt(1), _b(_I_ACL_LIST), _b(_I_ACL_LIST)),  # HRSANS
    0xA1: (_nt(1), _b(_I_RESULT), _b(_I_RESULT)),  # SUBSANS
    0xA2: (_nt(3, 5), 0, _b(_I_PROBE_AUTH)),  # PPROBREQ
    0xA3: (_nt(2, 5), _b(_I_RESULT), _b(_I_RESULT, _I_STATUS)),  # PPROBANS
    0xA4: (_nt(3, 5), 0, 0),  # HSOLICIT
    0xA5: (_nt(5), 0, _b(_I_CANDIDATE)),  # HANNOUNCE (B.18: the HMA's candidates)
    0xA6: (_nt(5), 0, _b(_I_CANDIDATE)),  # HLEAVE
    0xA7: (_nt(1), 0, 0),  # STREQ
    0xA8: (_MAS, _b(_I_STATUS), _b(_I_STATUS)),  # STANS
    0xA9: (_nt(2, 5), 0, 0),  # STCOLREQ
    0xAA: (_nt(3, 5), _b(_I_STATUS), _b(_I_STATUS)),  # STCOLANS
    0xAB: (_ALLNT, _b(_I_RESULT), _b(_I_RESULT)),  # LEAVREQ
    0xAC: (_ALLNT, _b(_I_RESULT), _b(_I_RESULT)),  # LEAVANS
    0xAD: (_ALLNT, 0, 0),  # HB
    0xAE: (_nt(1, 2, 5), _b(_I_RESULT), _b(_I_RESULT)),  # TERMREQ
    0xAF: (_MAS, _b(_I_RESULT), _b(_I_RESULT)),  # TERMANS
    0xB0: (_nt(1), 0, _DELIVERS | _b(_I_DELIVER_RESULT)),  # SECALGANS
    0xB1: (_MAS, _b(21), _b(21)),  # KTLSREQ
    0xB2: (_nt(1), _b(22), _b(22)),  # KTLSANS
    0xB6: (_nt(5), _b(_I_RESULT), _b(_I_RESULT)),  # KCREQ (B.16)
}


def _compact(rules):
    """(type -> row number + 1, rows of 9 bytes: NT mask, mandatory(4), allowed(4))."""
    idx = bytearray(max(rules) + 1)
    tab = bytearray(9 * len(rules))
    o = 0
    for t in rules:
        nts, mand, allow = rules[t]
        idx[t] = o // 9 + 1
        tab[o] = nts
        for k in range(4):
            tab[o + 1 + k] = (mand >> (24 - 8 * k)) & 0xFF
            tab[o + 5 + k] = (allow >> (24 - 8 * k)) & 0xFF
        o += 9
    return bytes(idx), bytes(tab)


_IDX, _TAB = _compact(_RULES)
_RULES = None


def _mask(o):
    """The 4-byte control mask at offset o of _TAB."""
    t = _TAB
    return (t[o] << 24) | (t[o + 1] << 16) | (t[o + 2] << 8) | t[o + 3]


def index(t):
    """Control index of a control type, or -1 for an unknown one."""
    if 0x11 <= t <= 0x24:
        return t - 0x11
    if 0xC1 <= t <= 0xC7:
        return t - 0xAD
    return -1


def header(buf, minimum, maximum):
    """Step 1 of profile B.12 (shared with the envelope): sizes, Length, Ver, type, NT,
    MAID. Returns the offset of the message's row in _TAB."""
    n = len(buf)
    if n < minimum:
        raise Rmcp2Error(_ERR_TRUNCATED)
    if n > maximum:
        raise Rmcp2Error(_ERR_OVERSIZE)
    if (buf[2] << 8) | buf[3] != n:
        raise Rmcp2Error(_ERR_LENGTH)
    if buf[0] >> 4 != 4:
        raise Rmcp2Error(_ERR_VERSION)
    t = buf[1]
    r = _IDX[t] if t < len(_IDX) else 0
    if not r:
        raise Rmcp2Error(_ERR_UNKNOWN_MESSAGE)
    rule = (r - 1) * 9
    if not (_TAB[rule] >> (buf[0] & 15)) & 1:
        raise Rmcp2Error(_ERR_NODE_TYPE)
    if not _nonzero(buf, 12):
        raise Rmcp2Error(_ERR_MAID)
    return rule


def _nonzero(buf, o):
    """Whether the 8 bytes at o (a MAID) are not all zero."""
    z = 0
    for i in range(o, o + 8):
        z |= buf[i]
    return z != 0


class Decoder:
    """decode(buf) validates one message and leaves, without copying it:
    mtype, nt, n; pos[i] = offset of the first control of index i (0: absent);
    starts/ends[k] = span (sub-controls included) of the k-th known control, count = k;
    km = offset of KEY_INFO's KEY_MATERIAL, akm = of AUTH_ANS's, ma = of MA_AUTH (0: none);
    skipped = unknown controls skipped. `buf` must stay unchanged while they are read."""

    def __init__(self):
        self.pos = array("H", bytes(2 * _NCTL))
        self.cnt = bytearray(_NCTL)
        self.starts = array("H", bytes(2 * _SLOTS))
        self.ends = array("H", bytes(2 * _SLOTS))
        self.buf = b""
        self.mtype = self.nt = self.n = self.count = self.km = self.akm = self.ma = self.skipped = 0

    def decode(self, buf):
        n = len(buf)
        rule = header(buf, _HDR, _MAX)
        mtype = buf[1]
        nt = buf[0] & 15
        if mtype == 0x25 and n != _HDR:  # HRSREQ: Length 0x14 (11.2.10 d)
            raise Rmcp2Error(_ERR_LENGTH)
        allowed = _mask(rule + 5)
        pos = self.pos
        cnt = self.cnt
        for i in range(_NCTL):
            pos[i] = 0
            cnt[i] = 0
        starts = self.starts
        ends = self.ends
        k = skipped = km = akm = ma = 0
        pairs_bad = False  # SECALGANS pairing (checked after the walk, B.3)
        capab_dup = False  # a *_CAPAB value twice (checked after the walk, B.2)
        seen = 0  # *_CAPAB values seen: bit (kind * 8 + value)
        o = _HDR
        while o < n:
            if o + 2 > n:
                raise Rmcp2Error(_ERR_CONTROL_LENGTH)
            t = buf[o]
            ln = buf[o + 1]
            if t == 0x01 or t == 0x02 or t == 0x81:
                raise Rmcp2Error(_ERR_SUBCONTROL)
            if ln < 2 or o + ln > n:
                raise Rmcp2Error(_ERR_CONTROL_LENGTH)
            i = index(t)
            if i < 0:
                skipped += 1
                o += ln
                continue
            want = _LEN[i]
            if want and ln != want:
                raise Rmcp2Error(_ERR_CONTROL_LENGTH)
            if not (allowed >> i) & 1:
                raise Rmcp2Error(_ERR_UNEXPECTED_CONTROL)
            c = cnt[i] + 1
            if c > _MAXN[i]:
                raise Rmcp2Error(_ERR_DUPLICATE_CONTROL)
            cnt[i] = c
            if c == 1:
                pos[i] = o
            end = o + ln
            a = buf[o + 2] if ln > 2 else 0
            b = buf[o + 3] if ln > 3 else 0
            if _HI[i]:  # one code byte, then reserved zero / PREFER / Key_Flag
                if i == _I_AUTH_ANS:
                    if a < 1 or a > 3 or b > 1:
                        raise Rmcp2Error(_ERR_VALUE)
                elif i == _I_KEY_INFO or i == _I_AUTH:
                    if b or a < _LO[i] or a > _HI[i]:
                        raise Rmcp2Error(_ERR_VALUE)
                elif i <= _I_AUTH_CAPAB:
                    if a < 1 or a > _HI[i] or b < 1 or b > _PREFER[i]:
                        raise Rmcp2Error(_ERR_VALUE)
                    bit = 1 << (i * 8 + a)
                    if seen & bit:
                        capab_dup = True
                    seen |= bit
                elif i == 5:  # AUTH_MECH: MEMBERSHIP, MEM_AUTH
                    if a != 1 or b != 1:
                        raise Rmcp2Error(_ERR_VALUE)
                elif b or a < _LO[i] or a > _HI[i]:
                    raise Rmcp2Error(_ERR_VALUE)
            else:
                _other(buf, o, i, ln)
            if i == _I_KEY_INFO:
                km = o + 4
                end = _key_material(buf, km, n, a)
            elif i == _I_AUTH_ANS:
                if b:
                    akm = end
                    end = _key_material(buf, akm, n, 0)
                if end < n and buf[end] == 0x81:
                    ma = end
                    end = _ma_auth(buf, end, n)
            elif i == _I_AUTH:
                if end < n and buf[end] == 0x81:
                    ma = end
                    end = _ma_auth(buf, end, n)
            elif i == _I_ACL_LIST:
                end = _acl_data(buf, end, n)
            if mtype == 0xB0 and ((k & 1) == 0) != (9 <= i <= 13):
                pairs_bad = True
            if k < _SLOTS:
                starts[k] = o
                ends[k] = end
            k += 1
            o = end
        # after the walk (B.12): mandatory controls, then the cross-field conditions
        if _mask(rule + 1) & ~_present(cnt):
            raise Rmcp2Error(_ERR_MISSING_CONTROL)
        if mtype == 0x02:  # SUBSREQ: SERV_USER_IDENT from an RMA only (11.2.1)
            if cnt[_I_SUI] and nt != 3:
                raise Rmcp2Error(_ERR_UNEXPECTED_CONTROL)
        elif mtype == 0x21:  # SECAGREQ (11.2.5.1 g)
            if nt == 2 and not cnt[_I_SMA_PROPOSE]:
                raise Rmcp2Error(_ERR_MISSING_CONTROL)
            if nt != 2 and cnt[_I_SMA_PROPOSE]:
                raise Rmcp2Error(_ERR_UNEXPECTED_CONTROL)
            if nt == 3 and (cnt[1] or cnt[2] or cnt[3]):
                raise Rmcp2Error(_ERR_UNEXPECTED_CONTROL)
            if capab_dup:
                raise Rmcp2Error(_ERR_DUPLICATE_CONTROL)
        elif mtype == 0x27:  # SECALGREQ: at least one *_DELIVER
            if not k:
                raise Rmcp2Error(_ERR_MISSING_CONTROL)
        elif mtype == 0xB0:  # SECALGANS: (*_DELIVER, DELIVER_RESULT) pairs
            if not k or k & 1 or pairs_bad:
                raise Rmcp2Error(_ERR_MISSING_CONTROL)
        elif mtype == 0xA2:  # PPROBREQ: PROBE_AUTH exactly from an RMA (B.3)
            if nt == 3 and not cnt[_I_PROBE_AUTH]:
                raise Rmcp2Error(_ERR_MISSING_CONTROL)
            if nt != 3 and cnt[_I_PROBE_AUTH]:
                raise Rmcp2Error(_ERR_UNEXPECTED_CONTROL)
        elif mtype == 0x24:  # KEYDELIVER: Ks by the SM, Kg by a DMA, Kc by the SMA (11.2.9.1 b)
            kt = buf[pos[_I_KEY_INFO] + 2]
            if nt != (1 if kt == 1 else 5 if kt == 2 else 2):
                raise Rmcp2Error(_ERR_NODE_TYPE)
        self.buf = buf
        self.mtype = mtype
        self.nt = nt
        self.n = n
        self.count = k
        self.km = km
        self.akm = akm
        self.ma = ma
        self.skipped = skipped
        return mtype

    # accessors (offsets into buf; no allocation except where bytes are asked for)
    def has(self, code):
        i = index(code)
        return i >= 0 and self.pos[i] != 0

    def byte(self, code, k):
        """Byte k of the first control `code` (0 = type, 1 = length, 2.. = fields)."""
        return self.buf[self.pos[index(code)] + k]

    def same(self, at, ref):
        """Whether the 8 header bytes at `at` (4: Session ID, 12: MAID) equal `ref`."""
        b = self.buf
        for i in range(8):
            if b[at + i] != ref[i]:
                return False
        return True

    def key_type(self, at):
        """Key_Type of the KEY_MATERIAL at offset `at` (self.km or self.akm), 0 if none."""
        return self.buf[at + 3] if at else 0

    def key_data(self, at):
        """memoryview of the KEY_DATA at offset `at` (valid while buf is), or None."""
        if not at:
            return None
        b = self.buf
        ln = (b[at + 1] << 8) | b[at + 2]
        return memoryview(b)[at + 4:at + ln]

    def view(self, start, end):
        return memoryview(self.buf)[start:end]


def _present(cnt):
    m = 0
    for i in range(_NCTL):
        if cnt[i]:
            m |= 1 << i
    return m


def _other(buf, o, i, ln):
    """Value checks of the controls without a single code byte (A.6, B.4)."""
    if i == 0 or i == 4:  # SMA_PROPOSE, GK_MECH: GP 1-2, GK_MECHA 0-7, then 1-4 / 1-5, 3 zero bytes
        if buf[o + 5] or buf[o + 6] or buf[o + 7]:
            raise Rmcp2Error(_ERR_VALUE)
        if buf[o + 2] < 1 or buf[o + 2] > 2 or buf[o + 3] > 7:
            raise Rmcp2Error(_ERR_VALUE)
        if buf[o + 4] < 1 or buf[o + 4] > (4 if i == 0 else 5):
            raise Rmcp2Error(_ERR_VALUE)
    elif i == _I_RESULT:
        if buf[o + 3] or buf[o + 2] not in _RESULTS:
            raise Rmcp2Error(_ERR_VALUE)
    elif i == _I_SUI:
        if ln < 3:
            raise Rmcp2Error(_ERR_CONTROL_LENGTH)
    elif i == 21 or i == 22 or i == _I_PROBE_AUTH:  # KTLS_NONCE, KTLS_SEED, PROBE_AUTH
        if buf[o + 2] or buf[o + 3]:
            raise Rmcp2Error(_ERR_VALUE)
    elif i == _I_STATUS:
        if buf[o + 7]:
            raise Rmcp2Error(_ERR_VALUE)
    elif i == _I_CANDIDATE:
        if not _nonzero(buf, o + 2):
            raise Rmcp2Error(_ERR_MAID)


def _sub(buf, s, n, want, minimum):
    """The sub-control `want` at s: return its end (B.2)."""
    if s + 3 > n or buf[s] != want:
        raise Rmcp2Error(_ERR_SUBCONTROL)
    ln = (buf[s + 1] << 8) | buf[s + 2]
    if ln < minimum or s + ln > n:
        raise Rmcp2Error(_ERR_SUBCONTROL)
    return s + ln


def _key_material(buf, s, n, kt):
    """KEY_MATERIAL (11.2.4.3, 11.2.9.3); kt = KEY_INFO's Key_Type, 0 after AUTH_ANS."""
    end = _sub(buf, s, n, 0x01, 4)
    if end - s > _MAX_KM:
        raise Rmcp2Error(_ERR_SUBCONTROL)
    t = buf[s + 3]
    if t < 1 or t > 3:
        raise Rmcp2Error(_ERR_VALUE)
    if kt and t != kt:
        raise Rmcp2Error(_ERR_SUBCONTROL)
    return end


def _ma_auth(buf, s, n):
    end = _sub(buf, s, n, 0x81, 4)
    if buf[s + 3] < 1 or buf[s + 3] > 3:
        raise Rmcp2Error(_ERR_VALUE)
    return end


def _acl_data(buf, s, n):
    end = _sub(buf, s, n, 0x02, 6)
    if buf[s + 3]:
        raise Rmcp2Error(_ERR_VALUE)
    cnt = (buf[s + 4] << 8) | buf[s + 5]
    if cnt > _MAX_ACL or end - s - 6 != cnt * 32:
        raise Rmcp2Error(_ERR_SUBCONTROL)
    return end


class Writer:
    """Builds one message at a time in a preallocated buffer; end() returns a memoryview
    of it, valid until the next begin(). Building allocates only small objects (slices
    and the result view: 32-42 bytes per message on the unix port); decoding allocates
    nothing (fwtest_rmcp2_codec.py runs it under heap_lock)."""

    def __init__(self, size=512, buf=None):
        self.buf = buf if buf is not None else bytearray(size)
        self.mv = memoryview(self.buf)
        self.n = 0

    def begin(self, mtype, nt, sid, maid):
        b = self.buf
        b[0] = 0x40 | nt
        b[1] = mtype
        b[4:12] = sid
        b[12:20] = maid
        self.n = _HDR
        return self

    def c2(self, code, a, b):
        """A 4-byte control: type, 4, a, b."""
        o = self.n
        buf = self.buf
        buf[o] = code
        buf[o + 1] = 4
        buf[o + 2] = a
        buf[o + 3] = b
        self.n = o + 4
        return self

    def cdata(self, code, head, data):
        """A control of 2 + len(head) + len(data) bytes (head: reserved/fixed bytes)."""
        o = self.n
        k = 2 + len(head)
        ln = k + len(data)
        if ln > 255:
            raise ValueError("control too long")
        buf = self.buf
        buf[o] = code
        buf[o + 1] = ln
        buf[o + 2:o + k] = head
        buf[o + k:o + ln] = data
        self.n = o + ln
        return self

    def sub(self, code, first, data):
        """A sub-control: type, Length(2), one byte, data."""
        o = self.n
        ln = 4 + len(data)
        buf = self.buf
        buf[o] = code
        buf[o + 1] = ln >> 8
        buf[o + 2] = ln & 0xFF
        buf[o + 3] = first
        buf[o + 4:o + ln] = data
        self.n = o + ln
        return self

    def end(self):
        n = self.n
        self.buf[2] = n >> 8
        self.buf[3] = n & 0xFF
        return self.mv[:n]


# -- the messages an RMA sends (A.5, B.3); each returns Writer.end()'s memoryview
_Z2 = b"\x00\x00"


def subsreq(w, sid, maid, ident=None):
    """SUBSREQ (11.2.1), with SERV_USER_IDENT in a closed group."""
    w.begin(0x02, 3, sid, maid)
    if ident:
        w.cdata(0x22, b"", ident)
    return w.end()


def secagreq(w, sid, maid):
    """SECAGREQ of an RMA: no controls (11.2.5.1 g)."""
    return w.begin(0x21, 3, sid, maid).end()


def secalgreq(w, sid, maid, items):
    """SECALGREQ (11.2.7): items = ((*_DELIVER code, value), ...)."""
    w.begin(0x27, 3, sid, maid)
    for code, v in items:
        w.c2(code, v, 0)
    return w.end()


def secagans(w, sid, maid, ret):
    """SECAGANS with SEC_RETURN (11.2.8)."""
    return w.begin(0x23, 3, sid, maid).c2(0x1F, ret, 0).end()


def ktlsreq(w, sid, maid, nonce):
    """KTLSREQ with KTLS_NONCE (B.3, B.5)."""
    return w.begin(0xB1, 3, sid, maid).cdata(0xC2, _Z2, nonce).end()


def empty(w, mtype, sid, maid):
    """HSOLICIT, HB: header only."""
    return w.begin(mtype, 3, sid, maid).end()


def hb_addr(w, sid, maid, udp, tcp):
    """HB with CONTENT_ADDR (B.4 code 0xC8, defined by this project): Length 8, Reserved(2)
    zero, then the UDP and TCP ports this RMA takes content on, big-endian (0: not over that
    transport). The Decoder does not know 0xC8 and skips it like any unknown control (B.2):
    a board never receives it."""
    w.begin(0xAD, 3, sid, maid)
    o = w.n
    b = w.buf
    b[o] = 0xC8
    b[o + 1] = 8
    b[o + 2] = 0
    b[o + 3] = 0
    b[o + 4] = udp >> 8
    b[o + 5] = udp & 0xFF
    b[o + 6] = tcp >> 8
    b[o + 7] = tcp & 0xFF
    w.n = o + 8
    return w.end()


def result(w, mtype, sid, maid, code):
    """LEAVREQ, LEAVANS, TERMANS with RESULT (B.3, B.9)."""
    return w.begin(mtype, 3, sid, maid).c2(0xC1, code, 0).end()
