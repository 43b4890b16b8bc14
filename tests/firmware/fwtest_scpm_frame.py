# SCPM codec, SNF rules and key store inside MicroPython (docs/scpm-profile.md 2-5, 10).
import gc

from mpytest import raises

from fwtest_scpm_util import DEV, KSN, MiniKSN
from tessera_fw.scpm import const as C
from tessera_fw.scpm.const import SCPMError
from tessera_fw.scpm.frame import Codec, Key, encode
from tessera_fw.scpm.snf import RxWindow, TxCounter
from tessera_fw.scpm.store import MemFS, Store, pack, unpack

KINDS = ((0, 0), (1, 0), (2, 0), (2, 15), (3, 0), (4, 0))


class Ring:
    def __init__(self, keys):
        self.keys = keys

    def lookup(self, sa, kind, index, gen):
        for k in self.keys:
            if k.kind == kind and k.index == index and k.gen == gen:
                return k
        return None

    def window(self, sa, key):
        # called only for a peer the key has no window for, once its frame authenticated;
        # the codec finds the window in key.rx from then on
        w = key.rx[sa] = RxWindow()
        return w


def _err(code, fn, *a):
    e = raises(SCPMError, fn, *a)
    assert e.code == code, "%s != %s" % (C.name(e.code), C.name(code))


def test_round_trip_every_service_and_kind():
    for kind, index in KINDS:
        k = Key(kind, index, 7, bytes(range(16)))
        r = Ring([k])
        c = Codec(DEV)
        snf = 1
        for svc in (1, 2, 3):
            for n in (0, 1, 13, 14, 15, 16, 31, 255, 1024):
                p = bytes((i * 7 + n) & 0xFF for i in range(n))
                f = encode(KSN, DEV, k, snf, p, svc)
                d = c.decode(f, r)
                assert bytes(d.padata()) == p, (kind, svc, n)
                assert d.sa == KSN and d.snf == snf and d.service == svc and d.authority == kind
                assert d.key is k
                snf += 1
    # plain frames
    c = Codec(DEV)
    d = c.decode(encode(KSN, DEV, None, 0, b"\x01\x00\x01"), Ring([]))
    assert d.hd == C.HD_PLAIN and bytes(d.padata()) == b"\x01\x00\x01" and d.authority == 0


def test_sizes_and_layout():
    k = Key(1, 0, 1, bytes(16))
    assert len(encode(1, 2, k, 1, b"", 1)) == 11 + 8 + 2 + 16
    assert len(encode(1, 2, k, 1, b"", 2)) == 11 + 8 + 16
    assert len(encode(1, 2, k, 1, bytes(12), 2)) == 11 + 8 + 16
    assert len(encode(1, 2, k, 1, bytes(13), 2)) == 11 + 8 + 32
    assert len(encode(1, 2, k, 1, bytes(14), 3)) == 11 + 8 + 16 + 16
    f = encode(0x01020304, 0x05060708, k, 0x0A0B0C0D, b"xy", 1)
    assert f[:11] == b"\x11\x01\x02\x03\x04\x05\x06\x07\x08\x00\x1c"
    assert f[11:19] == b"\x11\x01\x10\x01\x0a\x0b\x0c\x0d"
    assert f[19:23] == b"\x00\x02xy"
    raises(SCPMError, encode, 1, 2, k, 1, bytes(1025), 3)
    assert len(encode(1, 2, k, 1, bytes(1024), 3)) == 11 + 8 + 1040 + 16


def test_header_errors():
    k = Key(1, 0, 1, bytes(16))
    c = Codec(DEV)
    r = Ring([k])
    good = bytes(encode(KSN, DEV, k, 1, b"abc", 3))

    def mod(i, v):
        b = bytearray(good)
        b[i] = v
        return bytes(b)

    _err(C.ERR_HEADER, c.decode, mod(0, 0x12), r)
    _err(C.ERR_LENGTH, c.decode, mod(10, good[10] + 1), r)
    _err(C.ERR_NOT_FOR_ME, c.decode, mod(8, 9), r)
    _err(C.ERR_SHD, c.decode, mod(11, 0x23), r)  # version 2
    _err(C.ERR_SHD, c.decode, mod(11, 0x17), r)  # reserved bits
    _err(C.ERR_SHD, c.decode, mod(11, 0x10), r)  # service 0
    _err(C.ERR_ALGORITHM, c.decode, mod(12, 0x01), r)
    _err(C.ERR_ALGORITHM, c.decode, mod(12, 0x21), r)
    _err(C.ERR_SHD, c.decode, mod(13, 0x50), r)  # kind 5
    _err(C.ERR_SHD, c.decode, mod(13, 0x11), r)  # index on a user key
    _err(C.ERR_SHD, c.decode, mod(14, 0), r)  # generation 0
    _err(C.ERR_NO_KEY, c.decode, mod(14, 2), r)
    _err(C.ERR_SNF, c.decode, bytes(encode(KSN, DEV, k, 0, b"abc", 3)), r)
    _err(C.ERR_OVERSIZE, c.decode, b"\x10" + bytes(8) + b"\x04\x4d" + bytes(1101), r)
    c.decode(good, r)
    _err(C.ERR_REPLAY, c.decode, good, r)


def test_tamper_every_byte_then_still_works():
    k = Key(2, 3, 9, bytes(range(16, 32)))
    for svc in (1, 2, 3):
        r = Ring([k])
        k.rx = {}  # each service on a fresh window
        c = Codec(DEV)
        good = bytes(encode(KSN, DEV, k, 5, b"hello tessera", svc))
        for i in range(len(good)):
            b = bytearray(good)
            b[i] ^= 0x01
            try:
                c.decode(bytes(b), r)
                ok = True
            except SCPMError as e:
                ok = False
                code = e.code
            if ok and i == 0:  # HD 0x11 -> 0x10 reads as a plain frame: authority 0
                assert c.hd == C.HD_PLAIN and c.authority == 0
                continue
            if svc != 2 or i < 19:
                assert not ok, (svc, i)
            if not ok and i >= 19 and svc != 2:
                assert code == C.ERR_MAC, (svc, i, code)
            if not ok and i >= 15 and i < 19:
                assert code in (C.ERR_MAC, C.ERR_SNF, C.ERR_REPLAY, C.ERR_PADDING, C.ERR_BCC, C.ERR_LENGTH, C.ERR_TOO_OLD, C.ERR_OVERSIZE), (svc, i, code)
        # service 2 detects corruption with the BCC (not an integrity guarantee)
        d = c.decode(good, r)
        assert bytes(d.padata()) == b"hello tessera"


def test_truncation_every_length():
    k = Key(1, 0, 1, bytes(16))
    r = Ring([k])
    c = Codec(DEV)
    for svc in (1, 2, 3):
        good = bytes(encode(KSN, DEV, k, svc, bytes(40), svc))
        for n in range(len(good)):
            e = raises(SCPMError, c.decode, good[:n], r)
            assert e.code in (C.ERR_TRUNCATED, C.ERR_LENGTH), (svc, n, e.code)
            # fixed BC: the frame claims its own shorter length
            b = bytearray(good[:n])
            if n >= 11:
                b[9] = (n - 11) >> 8
                b[10] = (n - 11) & 0xFF
                e = raises(SCPMError, c.decode, bytes(b), r)
                assert e.code in (C.ERR_TRUNCATED, C.ERR_PADDING, C.ERR_MAC, C.ERR_LENGTH), (svc, n, e.code)
        c.decode(good, r)


def test_wrong_key_and_generation():
    k = Key(1, 0, 1, bytes(16))
    other = Key(1, 0, 1, b"\x01" * 16)
    c = Codec(DEV)
    for svc, code in ((1, C.ERR_MAC), (3, C.ERR_MAC)):
        _err(code, c.decode, bytes(encode(KSN, DEV, other, 1, b"x", svc)), Ring([k]))
    e = raises(SCPMError, c.decode, bytes(encode(KSN, DEV, other, 1, b"xyz", 2)), Ring([k]))
    assert e.code in (C.ERR_BCC, C.ERR_LENGTH, C.ERR_PADDING, C.ERR_OVERSIZE)
    _err(C.ERR_NO_KEY, c.decode, bytes(encode(KSN, DEV, Key(1, 0, 2, bytes(16)), 1, b"x", 3)), Ring([k]))
    _err(C.ERR_NO_KEY, c.decode, bytes(encode(KSN, DEV, Key(2, 1, 1, bytes(16)), 1, b"x", 3)), Ring([k]))


def test_padding_must_be_zero():
    k = Key(1, 0, 1, bytes(16))
    from tessera_fw.scpm.frame import _sha256  # noqa
    import cryptolib

    # hand-build service 3 with a non-zero PDG byte
    f = bytearray(encode(KSN, DEV, k, 1, b"abc", 3))
    pt = bytearray(16)
    pt[1] = 3
    pt[2:5] = b"abc"
    pt[15] = 1
    iv = k.ecb.encrypt(bytes(f[11:19]) + bytes(f[1:9]))
    f[19:35] = cryptolib.aes(k.k_enc, 2, iv).encrypt(pt)
    f[35:] = k.mac(bytes(f[:35]))[:16]
    _err(C.ERR_PADDING, Codec(DEV).decode, bytes(f), Ring([k]))
    pt[15] = 0
    pt[1] = 15  # PBC beyond the blocks
    f[19:35] = cryptolib.aes(k.k_enc, 2, iv).encrypt(pt)
    f[35:] = k.mac(bytes(f[:35]))[:16]
    _err(C.ERR_LENGTH, Codec(DEV).decode, bytes(f), Ring([k]))


def test_snf_window():
    w = RxWindow()
    _err(C.ERR_SNF, w.check, 0)
    for s in (1, 2, 5, 4, 3):
        w.check(s)
        w.commit(s)
    for s in (1, 2, 3, 4, 5):
        _err(C.ERR_REPLAY, w.check, s)
    w.check(100)
    w.commit(100)
    w.check(68)  # 32 below the highest: inside the window
    w.commit(68)
    _err(C.ERR_REPLAY, w.check, 68)
    _err(C.ERR_TOO_OLD, w.check, 67)
    for s in range(99, 68, -1):  # reordering within the window
        w.check(s)
        w.commit(s)
    for s in range(68, 101):
        _err(C.ERR_REPLAY, w.check, s)
    w.check(101 + 64)  # a jump of 64 clears the whole ring
    w.commit(101 + 64)
    for s in range(101 + 64 - 32, 101 + 64):
        w.check(s)
    w.check(0xFFFFFFFE)
    w.commit(0xFFFFFFFE)
    _err(C.ERR_TOO_OLD, w.check, 100)
    _err(C.ERR_REPLAY, w.check, 0xFFFFFFFE)
    w.check(0xFFFFFFFD)


def test_snf_reservations():
    w = RxWindow()
    assert w.commit(1)  # first frame reserves 65
    assert w.reserved == 65
    for s in range(2, 65):
        w.check(s)
        assert not w.commit(s)
    w.check(65)
    assert w.commit(65) and w.reserved == 129
    w2 = RxWindow(w.reserved)  # after a reboot: everything up to the reservation is seen
    for s in (65, 100, 129):
        raises(SCPMError, w2.check, s)
    w2.check(130)
    t = TxCounter()
    assert t.take() == 1 and t.dirty and t.reserved == 65
    t.dirty = False
    for i in range(2, 65):
        assert t.take() == i and not t.dirty
    assert t.take() == 65 and t.dirty and t.reserved == 129
    t2 = TxCounter(t.reserved)
    assert t2.take() == 129  # resumes at the reservation: never reuses a number
    t3 = TxCounter(0xFFFFFFF0)
    for i in range(0xFFFFFFF0, 0xFFFFFFFF):
        assert t3.take() == i
    _err(C.ERR_SNF_EXHAUSTED, t3.take)


def test_store_power_cut_every_offset():
    fs = MemFS()
    st = Store(fs)
    assert st.load() is None
    st.save({"n": 1, "k": "00" * 16})
    st.save({"n": 2, "k": "11" * 16})
    assert Store(fs).load()["n"] == 2
    old = dict(fs.files)
    st.save({"n": 3, "k": "22" * 16})
    new = fs.files[st_slot_name(st)]
    for cut in range(len(new)):
        fs2 = MemFS()
        fs2.files = dict(old)
        fs2.files[st_slot_name(st)] = new[:cut]  # torn write
        assert Store(fs2).load()["n"] == 2, cut
        b = bytearray(new)
        b[cut] ^= 0x40  # corrupted byte
        fs2.files[st_slot_name(st)] = bytes(b)
        assert Store(fs2).load()["n"] == 2, cut
    assert Store(fs).load()["n"] == 3
    # the older slot is the one rewritten, so the latest good state always survives
    s3 = Store(fs)
    s3.load()
    s3.save({"n": 4})
    assert unpack(fs.files["scpm_a.bin"]) and unpack(fs.files["scpm_b.bin"])
    assert Store(fs).load()["n"] == 4
    assert unpack(pack(7, b"{}")) == (7, b"{}")


def test_store_sequence_wraps():
    # 2^32 writes will not happen on flash, but a wrap must not bring back an old state
    from tessera_fw.scpm.store import newer

    assert newer(0, 0xFFFFFFFF) and not newer(0xFFFFFFFF, 0)
    assert newer(5, 4) and not newer(4, 5) and not newer(7, 7)
    fs = MemFS()
    fs.files["scpm_a.bin"] = pack(0xFFFFFFFE, b'{"n": 1}')
    fs.files["scpm_b.bin"] = pack(0xFFFFFFFF, b'{"n": 2}')
    st = Store(fs)
    assert st.load()["n"] == 2
    st.save({"n": 3})  # seq 0, into slot a
    assert unpack(fs.files["scpm_a.bin"])[0] == 0
    assert Store(fs).load()["n"] == 3
    st.save({"n": 4})  # seq 1, into slot b
    assert Store(fs).load()["n"] == 4


def st_slot_name(st):
    return ("scpm_a.bin", "scpm_b.bin")[st.slot]


def test_store_on_files():
    import os

    d = "/tmp/fwtest_scpm_store_%d" % (id(d) if False else 1)
    try:
        os.mkdir(d)
    except OSError:
        pass
    from tessera_fw.scpm.store import FileFS

    st = Store(FileFS(d))
    st.erase()
    st.save({"a": 1})
    st.save({"a": 2})
    assert Store(FileFS(d)).load() == {"a": 2}
    st.erase()
    assert Store(FileFS(d)).load() is None


def test_decode_heap_and_nothing_retained():
    k = Key(1, 0, 1, bytes(16))
    r = Ring([k])
    c = Codec(DEV)
    frames = [bytes(encode(KSN, DEV, k, s, bytes(256), 3)) for s in range(1, 42)]
    c.decode(frames[0], r)
    gc.collect()
    gc.disable()
    a0 = gc.mem_alloc()
    for f in frames[1:11]:
        c.decode(f, r)
    used = (gc.mem_alloc() - a0) // 10
    gc.enable()
    adata = len(frames[0]) - 11
    assert used <= 2 * adata, (used, adata)
    gc.collect()
    r1 = gc.mem_alloc()
    for i in range(11, len(frames)):
        c.decode(frames[i], r)
    gc.collect()
    assert gc.mem_alloc() - r1 <= 64, gc.mem_alloc() - r1  # nothing retained per frame


def test_addresses_at_or_above_2_30_carried_as_bytes():
    # issue 9 #8: on a 32-bit board an int >= 2^30 is a heap object; the codec keeps the
    # address bytes (addr4, sa4) and the device's answers are encoded from them
    dev, peer, other = 0xC0000001, 0x8A000002, 0x9B000003
    k = Key(1, 0, 1, bytes(range(16)))
    r = Ring([k])
    c = Codec(dev)
    assert c.addr4 == b"\xc0\x00\x00\x01"
    f = c.decode(bytes(encode(peer, dev, k, 1, b"abc", 3)), r)
    assert f.sa == peer and bytes(c.sa4) == b"\x8a\x00\x00\x02" and bytes(f.padata()) == b"abc"
    # a frame from another source that fails (MAC) leaves the last good frame's SA and bytes
    bad = bytearray(encode(other, dev, k, 2, b"abc", 3))
    bad[-1] ^= 1
    e = raises(SCPMError, c.decode, bytes(bad), r)
    assert e.code == C.ERR_MAC and c.sa == peer and bytes(c.sa4) == b"\x8a\x00\x00\x02"
    # so does one not for this node; a plain frame sets both
    e = raises(SCPMError, c.decode, bytes(encode(other, dev + 1, None, 0, b"\x01\x00\x01")), r)
    assert e.code == C.ERR_NOT_FOR_ME and c.sa == peer and bytes(c.sa4) == b"\x8a\x00\x00\x02"
    c.decode(bytes(encode(other, dev, None, 0, b"\x01\x00\x01")), r)
    assert c.sa == other and bytes(c.sa4) == b"\x9b\x00\x00\x03"
    # encode() takes the bytes as they are: the same frame as from the ints
    assert encode(c.addr4, c.sa4, k, 5, b"xyz", 3) == encode(dev, other, k, 5, b"xyz", 3)
    assert encode(c.addr4, c.sa4, None, 0, b"xyz") == encode(dev, other, None, 0, b"xyz")


def test_device_with_high_addresses_answers_from_address_bytes():
    from fwtest_scpm_util import SETUP, Seq, enrol, one
    from tessera_fw.scpm.device import Device

    dev, ksn_addr = 0xC0000001, 0x8A000002
    d = Device(dev, SETUP, rand=Seq())
    ksn = enrol(d, MiniKSN(addr=ksn_addr, dev=dev))  # every answer decoded by the KSN's codec
    assert d.ksn == ksn_addr
    out = one(d.request_update(1, 0))  # device-initiated: to the KSN, not the last sender
    assert out[1:9] == b"\xc0\x00\x00\x01\x8a\x00\x00\x02"
    p, f = ksn.open(out)
    assert p[0] == C.OP_MKU_REQUEST and f.sa == dev
