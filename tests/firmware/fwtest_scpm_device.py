# SCPM device engine flows driven by hand-built KSN frames, inside MicroPython.
import gc

from tessera_fw.scpm.device import Device, check_pdu  # first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import DEV, KSN, MASTER1, SETUP, USER1, MiniKSN, enrol, new_dev, one  # noqa: E402
from tessera_fw.scpm import const as C  # noqa: E402
from tessera_fw.scpm.const import SCPMError  # noqa: E402
from tessera_fw.scpm.frame import Key  # noqa: E402
from tessera_fw.scpm.store import MemFS, Store  # noqa: E402


def test_enrolment_and_persistence():
    fs = MemFS()
    d = None
    d = new_dev(fs)
    assert not d.enrolled
    ksn = enrol(d)
    assert d.enrolled and d.ksn == KSN and d.master.gen == 1
    assert ("enrolled", KSN) in d.events
    d2 = new_dev(fs)  # reboot
    assert d2.enrolled and d2.master.key == MASTER1 and d2.keys[16].key == USER1
    # the rebooted device still talks to the KSN under the master key
    m = ksn.keys[(4, 0, 1)]
    p, _ = ksn.open(one(d2.receive(ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16))))))
    assert p[0] == C.OP_SYNC_RESP and p[19] == 1 and p[20] == 0


def test_enrolment_refusals():
    d = new_dev()
    ksn = MiniKSN()
    setup = ksn.add(0, 0, 1, SETUP)
    body = bytes(16) + b"\x01" + MASTER1 + b"\x01" + USER1
    # no challenge outstanding
    p, dd = ksn.open(one(d.receive(ksn.frame(setup, ksn.km(C.OP_USER_KEY_INIT, body)))))
    assert p[0] == C.OP_KM_ERROR and p[3] == C.ERR_STATE and dd.key.kind == 0
    ch = bytes(one(d.receive(ksn.frame(None, ksn.km(C.OP_ENROL_HELLO)))))
    # wrong nonce (a captured enrolment answering an older challenge)
    p, _ = ksn.open(one(d.receive(ksn.frame(setup, ksn.km(C.OP_USER_KEY_INIT, body)))))
    assert p[3] == C.ERR_CONFIRM and not d.enrolled
    # a node that never read the label: MAC fails, nothing answered
    rogue = Key(0, 0, 1, b"\x99" * 16)
    good_body = ch[14:30] + b"\x01" + MASTER1 + b"\x01" + USER1
    assert d.receive(ksn.frame(rogue, ksn.km(C.OP_USER_KEY_INIT, good_body), snf=50)) == []
    assert d.errors.get(C.ERR_MAC) == 1 and not d.enrolled
    # only ENROL_HELLO is accepted in clear
    p, _ = ksn.open(one(d.receive(ksn.frame(None, ksn.km(C.OP_SP_KEY_INIT, bytes(18))))))
    assert p[3] == C.ERR_AUTHORITY
    f = ksn.frame(setup, ksn.km(C.OP_USER_KEY_INIT, good_body))
    ack = one(d.receive(f))
    assert d.enrolled
    assert d.receive(f) == []  # the same frame again: replay, not answered
    assert d.errors[C.ERR_REPLAY] == 1
    # re-enrolment refused; a rogue HELLO is counted (ERR_STATE) and not answered
    n = d.errors.get(C.ERR_STATE, 0)
    assert d.receive(ksn.frame(None, ksn.km(C.OP_ENROL_HELLO))) == []
    assert d.errors[C.ERR_STATE] == n + 1
    p, _ = ksn.open(one(d.receive(ksn.frame(setup, ksn.km(C.OP_USER_KEY_INIT, good_body)))))
    assert p[3] == C.ERR_STATE and d.master.key == MASTER1
    assert ack


def test_enrolled_device_reflects_nothing_to_plain_frames():
    # issue 11 #12: a spoofed plain ENROL_HELLO (14 bytes) to an enrolled device drew a
    # 16-byte KM_ERROR to the claimed source; once enrolled, no plain frame is answered
    d = new_dev()
    ksn = enrol(d)
    before = dict(d.errors)
    plain = [ksn.frame(None, ksn.km(C.OP_ENROL_HELLO), sa=sa) for sa in (1, 0x0A0000EE, 0xFFFFFFFF)]
    plain += [ksn.frame(None, ksn.km(C.OP_SP_KEY_INIT, bytes(18))),  # any other plain KM request
              ksn.frame(None, ksn.km(C.OP_APP_GET, b"\x01")),  # plain application request
              ksn.frame(None, b"\x01")]  # short PDU
    for f in plain:
        assert d.receive(f) == [], f
    assert d.errors[C.ERR_STATE] == before.get(C.ERR_STATE, 0) + len(plain)
    assert d.enrolled and d._challenge is None  # no challenge was issued either
    # an unenrolled device still answers ENROL_HELLO (that is how enrolment starts)
    d2 = new_dev()
    assert len(d2.receive(ksn.frame(None, ksn.km(C.OP_ENROL_HELLO)))) == 1


def test_retransmitted_user_key_init_gets_same_ack():
    d = new_dev()
    ksn = MiniKSN()
    setup = ksn.add(0, 0, 1, SETUP)
    ch = bytes(one(d.receive(ksn.frame(None, ksn.km(C.OP_ENROL_HELLO)))))
    pdu = ksn.km(C.OP_USER_KEY_INIT, ch[14:30] + b"\x02" + MASTER1 + b"\x03" + USER1)
    d.receive(ksn.frame(setup, pdu))
    ksn.add(4, 0, 2, MASTER1)
    p, _ = ksn.open(one(d.receive(ksn.frame(setup, pdu))))  # new SNF, same TXID
    assert p[0] == C.OP_USER_KEY_INIT_ACK and p[3:5] == b"\x02\x03"


REV = bytes(USER1[15 - i] for i in range(16))


def test_key_inits_and_app_authority():
    d = new_dev()
    ksn = enrol(d)
    m = ksn.keys[(4, 0, 1)]
    sp = b"\x55" * 16
    mk = b"\x66" * 16
    pdu = ksn.km(C.OP_SP_KEY_INIT, b"\x07\x02" + sp)
    p, _ = ksn.open(one(d.receive(ksn.frame(m, pdu))))
    assert p[0] == C.OP_SP_KEY_INIT_ACK and p[1:3] == pdu[1:3] and p[3:5] == b"\x07\x02"
    writes = d.store.writes
    p2, _ = ksn.open(one(d.receive(ksn.frame(m, pdu))))  # retransmission: same answer
    assert p2 == p and d.store.writes == writes
    p, _ = ksn.open(one(d.receive(ksn.frame(m, ksn.km(C.OP_MAKER_KEY_INIT, b"\x04" + mk)))))
    assert p[0] == C.OP_MAKER_KEY_INIT_ACK and p[3] == 4
    p, _ = ksn.open(one(d.receive(ksn.frame(m, ksn.km(C.OP_USER_KEY_SET, b"\x02" + REV)))))
    assert p[0] == C.OP_USER_KEY_SET_ACK and p[3] == 2
    user = ksn.add(1, 0, 2, REV)
    spk = ksn.add(2, 7, 2, sp)
    mak = ksn.add(3, 0, 4, mk)
    # the old user generation is gone
    assert d.receive(ksn.frame(ksn.keys[(1, 0, 1)], ksn.km(C.OP_APP_GET, b"\x01"))) == []
    assert d.errors[C.ERR_NO_KEY] == 1

    def app(key, op, body, svc=3, sa=None):
        out = d.receive(ksn.frame(key, ksn.km(op, body), svc=svc, sa=sa))
        if key is None:
            return out  # an enrolled device answers no plain frame
        ksn.codec.readdress(sa or KSN)  # the answer goes back to the sender
        saved = key.rx
        if sa:
            key.rx = {}  # another receiver: its own window
        p, dd = ksn.open(one(out))
        key.rx = saved
        ksn.codec.readdress(KSN)
        assert dd.service == svc and dd.key is key
        return p

    assert app(user, C.OP_APP_SET, b"\x01\x01")[3:] == b"\x01\x00\x01"  # power: user level
    assert d.get_prop("power") == b"\x01"
    assert app(user, C.OP_APP_SET, b"\x02\x09\x09")[4] == C.ERR_AUTHORITY  # tariff: SP level
    assert app(spk, C.OP_APP_SET, b"\x02\x09\x09", svc=1)[4:] == b"\x00\x09\x09"
    assert app(spk, C.OP_APP_SET, b"\x03v2")[4] == C.ERR_AUTHORITY  # firmware: maker level
    assert app(mak, C.OP_APP_SET, b"\x03v2", svc=2)[4:] == b"\x00v2"
    assert app(user, C.OP_APP_GET, b"\x03")[4:] == b"\x00v2"
    n = d.errors.get(C.ERR_STATE, 0)
    assert app(None, C.OP_APP_GET, b"\x01") == []  # plain (authority 0): counted, not answered
    assert d.errors[C.ERR_STATE] == n + 1
    assert app(user, C.OP_APP_GET, b"\x09")[4] == C.ERR_UNKNOWN_OP
    p = app(user, C.OP_APP_GET, b"")
    assert p[0] == C.OP_KM_ERROR and p[3] == C.ERR_MALFORMED
    # key management under a user key: authority; from another node: wrong KSN
    p = app(user, C.OP_SP_KEY_INIT, b"\x01\x01" + sp)
    assert p[0] == C.OP_KM_ERROR and p[3] == C.ERR_AUTHORITY
    p = app(user, C.OP_SP_KEY_INIT, b"\x01\x01" + sp, sa=0x0B000001)
    assert p[3] == C.ERR_WRONG_KSN
    # a master-key frame from another node does not even find a key
    assert d.receive(ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16)), sa=0x0B000001)) == []
    # the application hooks are told the frame's authority, and see only requests that
    # passed the property's level
    calls = []

    def on_set(name, value, authority):
        calls.append(("set", name, value, authority))
        return C.ERR_MALFORMED if value == b"\xff\xff" else 0  # the application's own check

    def on_get(name, authority):
        calls.append(("get", name, authority))
        return b"\x2a" if name == "power" else None  # a live reading

    d.on_set, d.on_get = on_set, on_get
    assert app(spk, C.OP_APP_SET, b"\x02\x01\x02")[4:] == b"\x00\x01\x02"
    assert app(mak, C.OP_APP_SET, b"\x02\xff\xff")[4:] == bytes((C.ERR_MALFORMED,))  # refused
    assert d.get_prop("tariff") == b"\x01\x02"  # left as it was
    assert app(user, C.OP_APP_SET, b"\x02\x05\x05")[4] == C.ERR_AUTHORITY  # never reaches on_set
    assert app(user, C.OP_APP_GET, b"\x01")[4:] == b"\x00\x2a"
    assert app(mak, C.OP_APP_GET, b"\x02")[4:] == b"\x00\x01\x02"
    assert calls == [("set", "tariff", b"\x01\x02", C.KIND_SP), ("set", "tariff", b"\xff\xff", C.KIND_MAKER),
                     ("get", "power", C.KIND_USER), ("get", "tariff", C.KIND_MAKER)]


def test_pdu_vectors():
    from fwtest_scpm_util import iter_array

    from mpytest import unhex

    for c in iter_array("scpm/pdus.json", "cases"):
        check_pdu(unhex(c["padata"]))
    for c in iter_array("scpm/pdus.json", "bad"):
        try:
            check_pdu(unhex(c["padata"]))
            got = 0
        except SCPMError as e:
            got = e.code
        assert got == c["error"], (c["padata"], got)


def test_master_snf_exhaustion_requests_update():
    d = new_dev()
    ksn = enrol(d)
    m = ksn.keys[(4, 0, 1)]
    from tessera_fw.scpm.snf import TxCounter

    d.master.tx[KSN] = TxCounter(C.SNF_MASTER_LIMIT + 1)
    out = d.receive(ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16))))
    assert len(out) == 2
    assert ksn.open(out[0])[0][0] == C.OP_SYNC_RESP
    p, _ = ksn.open(out[1])
    assert p[0] == C.OP_MKU_REQUEST and p[3] == C.REASON_SNF


def test_user_key_snf_exhausted_no_answer_engine_keeps_serving():
    d = new_dev()
    ksn = enrol(d)
    from tessera_fw.scpm.snf import TxCounter

    u = ksn.keys[(1, 0, 1)]
    d.keys[16].tx[KSN] = TxCounter(0xFFFFFFFF)
    assert d.receive(ksn.frame(u, ksn.km(C.OP_APP_GET, b"\x01"))) == []
    assert d.errors[C.ERR_SNF_EXHAUSTED] == 1
    m = ksn.keys[(4, 0, 1)]
    p, _ = ksn.open(one(d.receive(ksn.frame(m, ksn.km(C.OP_USER_KEY_SET, b"\x02" + bytes(16))))))
    ksn.add(1, 0, 2, bytes(16))
    assert p[0] == C.OP_USER_KEY_SET_ACK
    assert len(d.receive(ksn.frame(ksn.keys[(1, 0, 2)], ksn.km(C.OP_APP_GET, b"\x01")))) == 1


def test_tampered_km_frames_never_answered():
    d = new_dev()
    ksn = enrol(d)
    m = ksn.keys[(4, 0, 1)]
    good = ksn.frame(m, ksn.km(C.OP_SP_KEY_INIT, b"\x01\x01" + bytes(16)))
    for i in range(len(good)):
        b = bytearray(good)
        b[i] ^= 0x80
        assert d.receive(bytes(b)) == [], i
        assert d.receive(good[:i]) == [], i
    assert ksn.open(one(d.receive(good)))[0][0] == C.OP_SP_KEY_INIT_ACK
    assert sum(d.errors.values()) >= 2 * len(good)


class FailingFS(MemFS):
    def __init__(self):
        MemFS.__init__(self)
        self.fail = False

    def write(self, name, data):
        if self.fail:
            raise OSError(28)  # ENOSPC
        MemFS.write(self, name, data)


def test_store_write_failure_rolls_back_and_answers_nothing():
    fs = FailingFS()
    d = new_dev(fs)
    ksn = enrol(d)
    m = ksn.keys[(4, 0, 1)]
    pdu = ksn.km(C.OP_SP_KEY_INIT, b"\x03\x01" + b"\x77" * 16)
    fs.fail = True
    assert d.receive(ksn.frame(m, pdu)) == [] and d.store_errors == 1
    assert d.keys[2 * 16 + 3] is None  # RAM back to the durable state
    fs.fail = False
    ksn.tx[(4, 0, 1)].next += 64  # the rollback restored the receiver's reservation
    p, _ = ksn.open(one(d.receive(ksn.frame(m, pdu))))  # the KSN's retransmission
    assert p[0] == C.OP_SP_KEY_INIT_ACK and d.keys[2 * 16 + 3].key == b"\x77" * 16
    assert Device(DEV, SETUP, store=Store(fs)).keys[2 * 16 + 3].key == b"\x77" * 16
