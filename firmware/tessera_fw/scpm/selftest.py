# SCPM known-answer checks run on the board (suite of tessera_fw.selftest): frames from
# tests/vectors/scpm/frames.json, the replay window, the A/B store and an enrolment.
from binascii import unhexlify as _u

from micropython import const

from tessera_fw.scpm.frame import Codec, Key, SCPMError, encode

# Not const.py: whatever the self-test loads beyond what the device loads stays in the
# board's qstr pool for good (issue 9 #9), and const.py's public names are 70 of them.
_KIND_USER = const(1)
_KIND_SP = const(2)
_SA = const(0x0A000002)
# frames.json "user0g1-svc3-13" and "sp0g1-svc2-1"
_V3 = ("0bc5ca48b0a34079c0b9b9d1c94ffcdc", 3014, "030a11181f262d343b42495057",
       "110a0000020000000100281311100100000bc62bb4c88da864753293f5b0256c21b684f92bc309ab554fd10f725109b2232407")
_V2 = ("06da8aa3fcd529d1cbe30fd9af96674a", 2002, "03",
       "110a00000200000001001812102001000007d2cdce9ab952ac66a2f469d4d0809c5433")


class _Ring:
    def __init__(self, k):
        self.k = k

    def lookup(self, sa, kind, index, gen):
        k = self.k
        return k if (kind, index, gen) == (k.kind, k.index, k.gen) else None

    def window(self, sa, key):
        from tessera_fw.scpm.snf import RxWindow

        w = key.rx.get(sa)
        if w is None:
            w = key.rx[sa] = RxWindow()
        return w


def _kat(kind, svc, v):
    k = Key(kind, 0, 1, _u(v[0]))
    f = encode(_SA, 1, k, v[1], _u(v[2]), svc)
    if bytes(f) != _u(v[3]):
        raise AssertionError("encode")
    d = Codec(1).decode(_u(v[3]), _Ring(k))
    if bytes(d.padata()) != _u(v[2]):
        raise AssertionError("decode")


def frame_svc3():
    _kat(_KIND_USER, 3, _V3)


def frame_svc2():
    _kat(_KIND_SP, 2, _V2)


def replay_window():
    from tessera_fw.scpm.snf import RxWindow

    w = RxWindow()
    for s, want in ((40, 0), (8, 0), (7, 11), (9, 0), (8, 10), (40, 10), (0, 9)):
        try:
            w.check(s)
            w.commit(s)
            got = 0
        except SCPMError as e:
            got = e.code
        if got != want:
            raise AssertionError("window %d: %d" % (s, got))


def store_ab():
    from tessera_fw.scpm.store import MemFS, Store

    fs = MemFS()
    s = Store(fs)
    s.save({"n": 1})
    s.save({"n": 2})
    fs.files["scpm_b.bin"] = fs.files["scpm_b.bin"][:-1]  # torn write of the newer slot
    if Store(fs).load() != {"n": 1}:
        raise AssertionError("A/B fallback")


def enrolment():
    from tessera_fw.scpm.device import Device

    setup = bytes(range(16))
    d = Device(_SA, setup, rand=lambda n: bytes(n))
    ch = bytes(d.receive(encode(1, _SA, None, 0, b"\x01\x00\x07"))[0])
    pdu = b"\x03\x00\x08" + ch[14:30] + b"\x01" + bytes(16) + b"\x01" + bytes(16)
    # the KSN's side encodes under the device's own setup Key object (the same key: a
    # second Key with its two AES contexts is 1.3 KB the boot heap does not have, issue 9 #9)
    out = d.receive(encode(1, _SA, d.setup, 1, pdu, 3))
    if not d.enrolled or len(out) != 1:
        raise AssertionError("enrolment")


CHECKS = (
    ("scpm-frame-svc3", frame_svc3),
    ("scpm-frame-svc2", frame_svc2),
    ("scpm-replay-window", replay_window),
    ("scpm-store-ab", store_ab),
    ("scpm-enrolment", enrolment),
)
