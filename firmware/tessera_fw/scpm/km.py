# Key-management requests of the SCPM device (docs/scpm-profile.md section 6, answers
# pinned in 6.6). Functions of the Device (device.py), kept in their own module so that
# compiling either from source fits a board heap.
from tessera_fw.scpm import const as C
from tessera_fw.scpm.const import SCPMError
from tessera_fw.crypto.hmac import ct_equal
from tessera_fw.scpm.frame import Key, hmac_sha256, next_gen

IDLE = "IDLE"
PENDING = "PENDING"

# PDU length after OP | TXID (section 6, 7): fixed, or -minimum for variable-length PDUs
_PDU_LEN = {
    0x01: 0, 0x02: 16, 0x03: 50, 0x04: 2, 0x05: 18, 0x06: 2, 0x07: 17, 0x08: 1, 0x09: 17,
    0x0A: 1, 0x10: 273, 0x11: 289, 0x12: 17, 0x13: 1, 0x14: 1, 0x15: 1, 0x18: 16, 0x19: 20,
    0x1F: 2, 0x40: 1, 0x41: -1, 0x42: -2,
}
# answers and device-to-KSN messages: a device never answers them
RESPONSES = (0x02, 0x04, 0x06, 0x08, 0x0A, 0x11, 0x13, 0x15, 0x19, 0x1F, 0x42)


def check_pdu(p):
    """Validate the length of a KM or application PDU: ERR_MALFORMED / ERR_UNKNOWN_OP."""
    n = len(p)
    if n < 3:
        raise SCPMError(C.ERR_MALFORMED)
    want = _PDU_LEN.get(p[0])
    if want is None:
        raise SCPMError(C.ERR_UNKNOWN_OP)
    if n - 3 != want if want >= 0 else n - 3 < -want:
        raise SCPMError(C.ERR_MALFORMED)
    if n > C.MAX_PADATA:
        raise SCPMError(C.ERR_OVERSIZE)


class Pending:
    def __init__(self, txid, key, confirm_k, response):
        self.txid = txid
        self.key = key  # Key(KIND_MASTER, 0, new_gen, MK')
        self.confirm_k = confirm_k
        self.response = response  # MKU_RESPONSE PADATA, resent for a retransmitted MKU_START



def handle(dev, f, op, txid, p, now_ms):
    """Execute one key-management request; return (answer PADATA or None, key to send under)."""
    key = f.key
    sa = f.sa
    if key is None:  # plain frame: only ENROL_HELLO
        if op != C.OP_ENROL_HELLO:
            raise SCPMError(C.ERR_AUTHORITY)
        if dev.enrolled:
            raise SCPMError(C.ERR_STATE)
        nonce = bytes(dev.rand(16))
        dev._challenge = nonce
        return bytes((C.OP_ENROL_CHALLENGE, txid >> 8, txid & 0xFF)) + nonce, None
    if key.kind == C.KIND_SETUP:
        if op != C.OP_USER_KEY_INIT:
            raise SCPMError(C.ERR_AUTHORITY)
        return _user_key_init(dev, f, txid, p)
    if op == C.OP_ENROL_HELLO or op == C.OP_USER_KEY_INIT:
        raise SCPMError(C.ERR_STATE)
    if sa != dev.ksn:
        raise SCPMError(C.ERR_WRONG_KSN)
    if key.kind != C.KIND_MASTER:
        raise SCPMError(C.ERR_AUTHORITY)
    last = dev._last.get(op)
    if last is not None and last[0] == txid and last[1] is not None and dev.lookup(sa, C.KIND_MASTER, 0, last[1].gen) is last[1]:
        return last[2], last[1]  # retransmission: same answer, not re-executed
    if op == C.OP_SP_KEY_INIT:
        if p[3] > 15 or p[4] == 0:
            raise SCPMError(C.ERR_MALFORMED)
        if dev._install(C.KIND_SP, p[3], p[4], p[5:21]):
            dev.save()
        ans = bytes((C.OP_SP_KEY_INIT_ACK, txid >> 8, txid & 0xFF, p[3], p[4]))
    elif op == C.OP_MAKER_KEY_INIT or op == C.OP_USER_KEY_SET:
        if p[3] == 0:
            raise SCPMError(C.ERR_MALFORMED)
        kind = C.KIND_MAKER if op == C.OP_MAKER_KEY_INIT else C.KIND_USER
        if dev._install(kind, 0, p[3], p[4:20]):
            dev.save()
        ans = bytes((op + 1, txid >> 8, txid & 0xFF, p[3]))
    elif op == C.OP_MKU_START:
        return _mku_start(dev, key, txid, p), dev.master
    elif op == C.OP_MKU_COMMIT:
        return _mku_commit(dev, key, txid, p)
    elif op == C.OP_MKU_ABORT:
        pd = dev.pending
        if pd is not None:
            if pd.key.gen != p[3]:
                raise SCPMError(C.ERR_STATE)
            drop_pending(dev)
            dev.save()
            dev.events.append(("mku_aborted", p[3]))
        return None, None
    elif op == C.OP_SYNC_REQ:
        pd = dev.pending
        m = dev.master
        ans = (bytes((C.OP_SYNC_RESP, txid >> 8, txid & 0xFF)) + bytes(p[3:19]) +
               bytes((m.gen if m else 0, pd.key.gen if pd else 0,
                      (pd.txid >> 8) if pd else 0, (pd.txid & 0xFF) if pd else 0)))
        return ans, key
    else:
        raise SCPMError(C.ERR_UNKNOWN_OP)
    dev._last[op] = (txid, key, ans)
    return ans, key

def _user_key_init(dev, f, txid, p):
    last = dev._last.get(C.OP_USER_KEY_INIT)
    if dev.enrolled:
        if last is not None and last[0] == txid and f.sa == dev.ksn and last[1] is dev.master:
            return last[2], last[1]
        raise SCPMError(C.ERR_STATE)
    if p[19] == 0 or p[36] == 0:
        raise SCPMError(C.ERR_MALFORMED)
    ch = dev._challenge
    if ch is None:
        raise SCPMError(C.ERR_STATE)
    if not ct_equal(ch, p[3:19]):
        raise SCPMError(C.ERR_CONFIRM)
    dev._challenge = None
    mgen, ugen = p[19], p[36]
    dev._install(C.KIND_MASTER, 0, mgen, p[20:36])
    dev._install(C.KIND_USER, 0, ugen, p[37:53])
    dev.ksn = f.sa
    dev.from_ksn = True  # the enrolling KSN: where device-initiated frames go
    dev.mku_state = IDLE
    dev.save()
    dev.events.append(("enrolled", f.sa))
    m = dev.master
    ans = bytes((C.OP_USER_KEY_INIT_ACK, txid >> 8, txid & 0xFF, mgen, ugen))
    dev._last[C.OP_USER_KEY_INIT] = (txid, m, ans)
    return ans, m

def drop_pending(dev):
    pd = dev.pending
    if pd is not None:
        pd.key.forget()
        dev._done_txid = pd.txid  # its MKU_START retransmissions must not start it again
    dev.pending = None
    if dev.mku_state == PENDING:
        dev.mku_state = IDLE

def _mku_start(dev, key, txid, p):
    from tessera_fw.crypto import dh

    pd = dev.pending
    if key is not dev.master:
        raise SCPMError(C.ERR_STATE)  # MKU_START travels under the current master key
    if pd is not None and pd.txid == txid:
        return pd.response  # retransmission: the stored answer, no DH, no flash write
    if txid == dev._done_txid:  # a retransmission of an update already resolved
        raise SCPMError(C.ERR_STATE)
    new_gen = p[3]
    if new_gen != next_gen(key.gen):
        raise SCPMError(C.ERR_STATE)
    try:
        yk = dh.decode_public(p[20:276])
    except dh.DHError:
        raise SCPMError(C.ERR_DH)
    if pd is not None:  # a new TXID replaces the pending update
        drop_pending(dev)
    nonce_d = bytes(dev.rand(16))
    d = dev._next_dh  # made while idle (Device.precompute), or now
    dev._next_dh = None  # one MKU_START only, whatever happens next
    try:
        if d is None:
            d = dh.DH(bytes(dev.rand(32)))
    except dh.DHError:
        raise SCPMError(C.ERR_DH)
    z = pow(yk, d._x, dh.P)
    d.forget()
    if z < 2:
        raise SCPMError(C.ERR_DH)
    z = z.to_bytes(dh.SIZE, "big")
    t = bytes(p[1:3]) + bytes((new_gen,)) + bytes(p[4:20]) + nonce_d + bytes(p[20:276]) + d.public
    mk = hmac_sha256(z, b"SCPM-MK", t)[:16]
    confirm_d = hmac_sha256(mk, b"SCPM-CONFIRM-D", t)[:16]
    confirm_k = hmac_sha256(mk, b"SCPM-CONFIRM-K", t)[:16]
    resp = bytes((C.OP_MKU_RESPONSE, txid >> 8, txid & 0xFF, new_gen)) + nonce_d + d.public + confirm_d
    dev.pending = Pending(txid, Key(C.KIND_MASTER, 0, new_gen, mk), confirm_k, resp)
    dev.mku_state = PENDING
    dev._req = None
    dev.save()  # PENDING is durable before the response leaves
    return resp

def _mku_commit(dev, key, txid, p):
    pd = dev.pending
    if pd is None or key is not pd.key:
        raise SCPMError(C.ERR_STATE)
    if txid != pd.txid or p[3] != pd.key.gen:
        raise SCPMError(C.ERR_STATE)
    if not ct_equal(p[4:20], pd.confirm_k):
        raise SCPMError(C.ERR_CONFIRM)
    old = dev.master
    dev.keys[64] = pd.key
    dev.pending = None
    dev.mku_state = IDLE
    if old is not None:
        old.forget()
    dev._done_txid = txid
    dev.save()
    dev.events.append(("mku_committed", pd.key.gen))
    ans = bytes((C.OP_MKU_COMMIT_ACK, txid >> 8, txid & 0xFF, pd.key.gen))
    dev._last[C.OP_MKU_COMMIT] = (txid, pd.key, ans)
    return ans, pd.key
