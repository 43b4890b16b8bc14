# SCPM master key update flows (profile 6.3-6.5) driven by a hand-built KSN, inside MicroPython.
import gc

import tessera_fw.scpm.device  # noqa: F401 - first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import enrol, mku_derive, new_dev, one  # noqa: E402
from tessera_fw.crypto import dh  # noqa: E402
from tessera_fw.scpm import const as C  # noqa: E402
from tessera_fw.scpm.store import MemFS  # noqa: E402


class KsnMku:
    """KSN side of a master key update (profile 6.3) with a fixed exponent."""

    def __init__(self, ksn, txid, new_gen, secret=b"\x07" * 32):
        self.ksn = ksn
        self.txid = txid
        self.new_gen = new_gen
        self.nonce_k = b"\xab" * 16
        self.dh = dh.DH(secret)

    def start(self):
        return self.ksn.km(C.OP_MKU_START, bytes((self.new_gen,)) + self.nonce_k + self.dh.public, self.txid)

    def finish(self, resp):
        assert resp[0] == C.OP_MKU_RESPONSE and resp[3] == self.new_gen, resp[:5]
        nonce_d, yd, confirm_d = resp[4:20], resp[20:276], resp[276:292]
        z = self.dh.shared(yd)
        mk, cd, ck = mku_derive(self.txid, self.new_gen, self.nonce_k, nonce_d, self.dh.public, yd, z)
        assert cd == confirm_d
        self.mk = mk
        return self.ksn.km(C.OP_MKU_COMMIT, bytes((self.new_gen,)) + ck, self.txid)


def _pending_then_retransmitted(fs):
    """A device with a pending update whose MKU_START was retransmitted 4 times; returns
    (ksn, the retransmissions, the MKU_RESPONSE). Its own function so that nothing on the
    test's stack keeps this device alive (the GC scans stale stack slots too) when the test
    builds the rebooted one."""
    d = new_dev(fs)
    ksn = enrol(d)
    old = ksn.keys[(4, 0, 1)]
    u = KsnMku(ksn, 0x5151, 2)  # the KSN's own pair, not counted
    start = u.start()
    with _CountDH() as c:
        resp, _ = ksn.open(one(d.receive(ksn.frame(old, start))))
        assert c.n == 1
        writes = fs.writes
        retx = []
        for _ in range(4):  # what KsnEngine._timeout sends: same PDU, SNF skipped 64 on
            ksn.tx[(4, 0, 1)].next += 64
            retx.append(ksn.frame(old, start))
            again, _ = ksn.open(one(d.receive(retx[-1])))
            assert again == resp
        assert c.n == 1 and fs.writes == writes, ("DH", c.n, "writes", fs.writes - writes)
    return ksn, retx, resp


def test_retransmitted_mku_start_costs_no_dh_and_no_flash_write():
    # issue 9 #3: the KSN retransmits with its SNF moved 64 on (past the device's flash
    # reservation), so each retransmitted MKU_START cost the device a flash write
    fs = MemFS()
    ksn, retx, resp = _pending_then_retransmitted(fs)
    old = ksn.keys[(4, 0, 1)]
    u2 = KsnMku(ksn, 0x5252, 2)
    # power cut before anything else was written: the update is still pending, a replay
    # of a retransmission gets the stored answer and changes nothing
    d = new_dev(fs)
    assert d.pending.txid == 0x5151
    again, _ = ksn.open(one(d.receive(retx[-1])))
    assert again == resp and d.pending.txid == 0x5151
    # the KSN aborts it; the retransmissions replayed afterwards start nothing
    ksn.tx[(4, 0, 1)].next += 64
    assert d.receive(ksn.frame(old, ksn.km(C.OP_MKU_ABORT, b"\x02", 0x5151))) == []
    assert d.pending is None
    for f in retx:
        for a in d.receive(f):
            p, _ = ksn.open(a)
            assert p[0] == C.OP_KM_ERROR
        assert d.pending is None and d.mku_state == "IDLE"
    # and a fresh update (new TXID) goes through
    resp2, _ = ksn.open(one(d.receive(ksn.frame(old, u2.start()))))
    commit = u2.finish(resp2)
    assert ksn.open(one(d.receive(ksn.frame(ksn.add(4, 0, 2, u2.mk), commit))))[0][0] == C.OP_MKU_COMMIT_ACK


def test_master_key_update_full_flow_and_retransmissions():
    fs = MemFS()
    d = None
    d = new_dev(fs)
    ksn = enrol(d)
    old = ksn.keys[(4, 0, 1)]
    u = KsnMku(ksn, 0x4242, 2)
    start = u.start()
    resp, dd = ksn.open(one(d.receive(ksn.frame(old, start))))
    assert dd.key is old and d.mku_state == "PENDING"
    # retransmitted MKU_START: the same MKU_RESPONSE, the device never forks the key
    resp2, _ = ksn.open(one(d.receive(ksn.frame(old, start))))
    assert resp2 == resp
    commit = u.finish(resp)
    new = ksn.add(4, 0, 2, u.mk)
    # power cut while PENDING: the pending key survives the reboot
    d = None
    d = new_dev(fs)
    assert d.mku_state == "PENDING" and d.pending.key.gen == 2
    ksn.tx[(4, 0, 1)].next += 64  # a rebooted receiver refuses up to 64 numbers (profile 4)
    p, _ = ksn.open(one(d.receive(ksn.frame(old, ksn.km(C.OP_SYNC_REQ, b"\x11" * 16)))))
    assert p[0] == C.OP_SYNC_RESP and p[3:19] == b"\x11" * 16 and p[19:23] == b"\x01\x02\x42\x42"
    # a wrong confirmation is refused and leaves the update pending
    bad = commit[:4] + bytes(16)
    p, _ = ksn.open(one(d.receive(ksn.frame(new, bad))))
    assert p[0] == C.OP_KM_ERROR and p[3] == C.ERR_CONFIRM and d.pending is not None
    ack, dd = ksn.open(one(d.receive(ksn.frame(new, commit))))
    assert ack[0] == C.OP_MKU_COMMIT_ACK and ack[3] == 2 and dd.key is new
    assert d.master.gen == 2 and d.pending is None and d.mku_state == "IDLE"
    ack2, _ = ksn.open(one(d.receive(ksn.frame(new, commit))))  # retransmitted commit
    assert ack2 == ack
    # the old master key is gone everywhere
    assert d.receive(ksn.frame(old, ksn.km(C.OP_SYNC_REQ, bytes(16)))) == []
    d = None
    d = new_dev(fs)
    assert d.master.key == u.mk and d.master.gen == 2 and d.pending is None
    ksn.tx[(4, 0, 2)].next += 64
    p, _ = ksn.open(one(d.receive(ksn.frame(new, ksn.km(C.OP_SYNC_REQ, bytes(16))))))
    assert p[19:23] == b"\x02\x00\x00\x00"


def test_mku_abort_new_txid_and_bad_values():
    d = new_dev()
    ksn = enrol(d)
    old = ksn.keys[(4, 0, 1)]
    u = KsnMku(ksn, 0x0101, 2)
    resp, _ = ksn.open(one(d.receive(ksn.frame(old, u.start()))))
    # MKU_ABORT drops the pending key; nothing is answered
    assert d.receive(ksn.frame(old, ksn.km(C.OP_MKU_ABORT, b"\x02", 0x0101))) == []
    assert d.pending is None and d.mku_state == "IDLE"
    assert ("mku_aborted", 2) in d.events
    # wrong new generation, bad DH public value
    p, _ = ksn.open(one(d.receive(ksn.frame(old, ksn.km(C.OP_MKU_START, b"\x05" + bytes(16) + u.dh.public)))))
    assert p[3] == C.ERR_STATE
    p, _ = ksn.open(one(d.receive(ksn.frame(old, ksn.km(C.OP_MKU_START, b"\x02" + bytes(16) + (1).to_bytes(256, "big"))))))
    assert p[3] == C.ERR_DH
    p, _ = ksn.open(one(d.receive(ksn.frame(old, ksn.km(C.OP_MKU_START, b"\x02" + bytes(16) + (dh.P - 1).to_bytes(256, "big"))))))
    assert p[3] == C.ERR_DH
    # a new TXID replaces a pending update
    u1 = KsnMku(ksn, 0x0201, 2)
    d.receive(ksn.frame(old, u1.start()))
    u2 = KsnMku(ksn, 0x0202, 2, secret=b"\x09" * 32)
    resp, _ = ksn.open(one(d.receive(ksn.frame(old, u2.start()))))
    assert d.pending.txid == 0x0202
    commit = u2.finish(resp)
    new = ksn.add(4, 0, 2, u2.mk)
    assert ksn.open(one(d.receive(ksn.frame(new, commit))))[0][0] == C.OP_MKU_COMMIT_ACK


def test_device_requested_update_retries_then_gives_up():
    d = new_dev()
    ksn = enrol(d)
    m = ksn.keys[(4, 0, 1)]
    p, _ = ksn.open(one(d.request_update(C.REASON_OPERATOR, now_ms=1000)))
    assert p[0] == C.OP_MKU_REQUEST and p[3] == 1 and d.mku_state == "REQUESTED"
    txid = (p[1] << 8) | p[2]
    assert txid
    assert d.tick(5999) == []
    for t in (6000, 11000, 16000):
        p2, _ = ksn.open(one(d.tick(t)))
        assert p2 == p  # same PDU, new SNF
    assert d.tick(21000) == [] and d.mku_state == "IDLE"
    assert ("mku_request_failed", 1) in d.events
    # answered this time: MKU_START with the request's TXID
    p, _ = ksn.open(one(d.request_update(C.REASON_COMPROMISE, now_ms=30000)))
    txid = (p[1] << 8) | p[2]
    u = KsnMku(ksn, txid, 2)
    resp, _ = ksn.open(one(d.receive(ksn.frame(m, u.start()))))
    assert d.mku_state == "PENDING" and d.tick(99999) == []
    new = ksn.add(4, 0, 2, u.mk if hasattr(u, "mk") else u.finish(resp) and u.mk)
    commit = ksn.km(C.OP_MKU_COMMIT, b"\x02" + mku_derive(txid, 2, u.nonce_k, resp[4:20], u.dh.public, resp[20:276], u.dh.shared(resp[20:276]))[2], txid)
    assert ksn.open(one(d.receive(ksn.frame(new, commit))))[0][0] == C.OP_MKU_COMMIT_ACK




class _CountDH:
    """Counts the DH key pairs the device makes (each is one 2048-bit exponentiation)."""

    def __enter__(self):
        self.real = dh.DH
        self.n = 0
        counter = self

        class Counting(self.real):
            def __init__(self, *a, **kw):
                counter.n += 1
                super().__init__(*a, **kw)

        dh.DH = Counting
        return self

    def __exit__(self, *exc):
        dh.DH = self.real


def test_precomputed_dh_pair_used_once():
    d = new_dev()
    assert not d.precompute()  # not enrolled: nothing to update
    ksn = enrol(d)
    u, u2 = KsnMku(ksn, 0x6161, 2), KsnMku(ksn, 0x6262, 3)  # the KSN's own pairs, not counted
    with _CountDH() as c:
        assert d.precompute() and not d.precompute()  # one pair, made once
        assert c.n == 1
        y = d._next_dh[1]  # (x, public)
        resp, _ = ksn.open(one(d.receive(ksn.frame(ksn.keys[(4, 0, 1)], u.start()))))
        assert c.n == 1 and resp[20:276] == y  # MKU_START made no key pair: it used this one
        assert d._next_dh is None and not d.precompute()  # PENDING: none made
        commit = u.finish(resp)
        new = ksn.add(4, 0, 2, u.mk)
        assert ksn.open(one(d.receive(ksn.frame(new, commit))))[0][0] == C.OP_MKU_COMMIT_ACK
        # the next update without a precomputed pair makes a fresh one: never the old one
        resp2, _ = ksn.open(one(d.receive(ksn.frame(new, u2.start()))))
        assert c.n == 2 and resp2[20:276] != y
