# Helpers for the SCPM firmware tests (no tests here): a minimal hand-built KSN that
# encodes frames with frame.encode and opens the device's answers with its own Codec.

from tessera_fw.scpm import const as C
from tessera_fw.scpm.frame import Codec, Key, encode, hmac_sha256
from tessera_fw.scpm.snf import RxWindow, TxCounter

DEV = 0x0A000002
KSN = 1
SETUP = bytes(range(0x40, 0x50))
MASTER1 = bytes(range(0x10, 0x20))
USER1 = bytes(range(0x20, 0x30))


class Seq:
    """Deterministic rand(n): counter bytes."""

    def __init__(self, start=1):
        self.i = start

    def __call__(self, n):
        out = bytearray(n)
        for j in range(n):
            out[j] = self.i & 0xFF
            self.i += 1
        return bytes(out)


class MiniKSN:
    def __init__(self, addr=KSN, dev=DEV):
        self.addr = addr
        self.dev = dev
        self.keys = {}  # (kind, index, gen) -> Key
        self.tx = {}
        self.rx = {}
        self.codec = Codec(addr)
        self.txid = 0x100

    def add(self, kind, index, gen, raw):
        k = Key(kind, index, gen, raw)
        self.keys[(kind, index, gen)] = k
        return k

    def lookup(self, sa, kind, index, gen):
        return self.keys.get((kind, index, gen))

    def window(self, sa, key):
        w = key.rx.get(sa)
        if w is None:
            w = key.rx[sa] = RxWindow()
        return w

    def next_txid(self):
        self.txid += 1
        return self.txid

    def frame(self, key, padata, svc=3, snf=None, sa=None, da=None):
        if key is None:
            return bytes(encode(sa or self.addr, da or self.dev, None, 0, padata))
        if snf is None:
            t = (key.kind, key.index, key.gen)
            c = self.tx.get(t)
            if c is None:
                c = self.tx[t] = TxCounter()
            snf = c.take()
        return bytes(encode(sa or self.addr, da or self.dev, key, snf, padata, svc))

    def open(self, f):
        d = self.codec.decode(f, self)
        return bytes(d.padata()), d

    def km(self, op, body=b"", txid=None):
        if txid is None:
            txid = self.next_txid()
        return bytes((op, txid >> 8, txid & 0xFF)) + body


def new_dev(fs=None, rand=None):
    """A device engine on an in-memory store with predictable randomness."""
    import gc

    from tessera_fw.scpm.device import Device
    from tessera_fw.scpm.store import MemFS, Store

    gc.collect()  # a device owns two ~1.1 KB frame buffers: keep the heap unfragmented
    return Device(DEV, SETUP, store=Store(fs if fs is not None else MemFS()), rand=rand or Seq())


def one(out):
    assert len(out) == 1, out
    return out[0]


def enrol(dev, ksn=None, mgen=1, ugen=1):
    """Drive a full enrolment; return the KSN with master/user keys."""
    if ksn is None:
        ksn = MiniKSN(dev=dev.addr)
    out = dev.receive(ksn.frame(None, ksn.km(C.OP_ENROL_HELLO)))
    assert len(out) == 1
    ch = bytes(out[0])
    assert ch[0] == C.HD_PLAIN and ch[11] == C.OP_ENROL_CHALLENGE
    nonce = ch[14:30]
    setup = ksn.add(C.KIND_SETUP, 0, 1, SETUP)
    body = nonce + bytes((mgen,)) + MASTER1 + bytes((ugen,)) + USER1
    out = dev.receive(ksn.frame(setup, ksn.km(C.OP_USER_KEY_INIT, body)))
    ksn.add(C.KIND_MASTER, 0, mgen, MASTER1)
    ksn.add(C.KIND_USER, 0, ugen, USER1)
    assert len(out) == 1, dev.errors
    p, d = ksn.open(out[0])
    assert p[0] == C.OP_USER_KEY_INIT_ACK and p[3] == mgen and p[4] == ugen
    assert d.key.kind == C.KIND_MASTER
    return ksn


def mku_derive(txid, new_gen, nonce_k, nonce_d, yk, yd, z):
    t = bytes((txid >> 8, txid & 0xFF, new_gen)) + nonce_k + nonce_d + yk + yd
    mk = hmac_sha256(z, b"SCPM-MK", t)[:16]
    return mk, hmac_sha256(mk, b"SCPM-CONFIRM-D", t)[:16], hmac_sha256(mk, b"SCPM-CONFIRM-K", t)[:16]


from vecstream import iter_array  # noqa: E402,F401 (moved; the SCPM tests import it from here)


def scalar(rel, member):
    """A top-level scalar (number) of a JSON vector file, without loading the file."""
    import mpytest

    pat = b'"' + member.encode() + b'":'
    with open(mpytest.ROOT + "/tests/vectors/" + rel, "rb") as f:
        head = f.read(4096)
    i = head.find(pat)
    j = i + len(pat)
    while head[j] in b" \n\t":
        j += 1
    k = j
    while head[k] in b"0123456789":
        k += 1
    return int(head[j:k])
