# Key-management requests of the SCPM device (docs/scpm-profile.md section 6, answers
# pinned in 6.6). Functions of the Device (device.py), kept in their own module so that
# compiling either from source fits a board heap.
from micropython import const

from tessera_fw import acquire, ct_equal, release
from tessera_fw.scpm.frame import Key, SCPMError, hmac_sha256, next_gen
from tessera_fw.scpm.persist import Pending

# numbers of const.py (profile sections 1-8), folded by the compiler (issue 9 #9)
_ERR_AUTHORITY = const(15)
_ERR_WRONG_KSN = const(16)
_ERR_STATE = const(17)
_ERR_MALFORMED = const(18)
_ERR_DH = const(19)
_ERR_CONFIRM = const(20)
_ERR_UNKNOWN_OP = const(22)
_KIND_SETUP = const(0)
_KIND_USER = const(1)
_KIND_SP = const(2)
_KIND_MAKER = const(3)
_KIND_MASTER = const(4)
_OP_ENROL_HELLO = const(0x01)
_OP_ENROL_CHALLENGE = const(0x02)
_OP_USER_KEY_INIT = const(0x03)
_OP_USER_KEY_INIT_ACK = const(0x04)
_OP_SP_KEY_INIT = const(0x05)
_OP_SP_KEY_INIT_ACK = const(0x06)
_OP_MAKER_KEY_INIT = const(0x07)
_OP_USER_KEY_SET = const(0x09)
_OP_MKU_START = const(0x10)
_OP_MKU_RESPONSE = const(0x11)
_OP_MKU_COMMIT = const(0x12)
_OP_MKU_COMMIT_ACK = const(0x13)
_OP_MKU_ABORT = const(0x14)
_OP_SYNC_REQ = const(0x18)
_OP_SYNC_RESP = const(0x19)

IDLE = "IDLE"
PENDING = "PENDING"

def handle(dev, f, op, txid, p, now_ms):
    """Execute one key-management request; return (answer PADATA or None, key to send under)."""
    key = f.key
    sa = f.sa
    if key is None:  # plain frame: only ENROL_HELLO
        if op != _OP_ENROL_HELLO:
            raise SCPMError(_ERR_AUTHORITY)
        if dev.enrolled:
            raise SCPMError(_ERR_STATE)
        nonce = bytes(dev.rand(16))
        dev._challenge = nonce
        return bytes((_OP_ENROL_CHALLENGE, txid >> 8, txid & 0xFF)) + nonce, None
    if key.kind == _KIND_SETUP:
        if op != _OP_USER_KEY_INIT:
            raise SCPMError(_ERR_AUTHORITY)
        return _user_key_init(dev, f, txid, p)
    if op == _OP_ENROL_HELLO or op == _OP_USER_KEY_INIT:
        raise SCPMError(_ERR_STATE)
    if sa != dev.ksn:
        raise SCPMError(_ERR_WRONG_KSN)
    if key.kind != _KIND_MASTER:
        raise SCPMError(_ERR_AUTHORITY)
    last = dev._last.get(op)
    if last is not None and last[0] == txid and last[1] is not None and dev.lookup(sa, _KIND_MASTER, 0, last[1].gen) is last[1]:
        return last[2], last[1]  # retransmission: same answer, not re-executed
    if op == _OP_SP_KEY_INIT:
        if p[3] > 15 or p[4] == 0:
            raise SCPMError(_ERR_MALFORMED)
        if dev._install(_KIND_SP, p[3], p[4], p[5:21]):
            dev.save()
        ans = bytes((_OP_SP_KEY_INIT_ACK, txid >> 8, txid & 0xFF, p[3], p[4]))
    elif op == _OP_MAKER_KEY_INIT or op == _OP_USER_KEY_SET:
        if p[3] == 0:
            raise SCPMError(_ERR_MALFORMED)
        kind = _KIND_MAKER if op == _OP_MAKER_KEY_INIT else _KIND_USER
        if dev._install(kind, 0, p[3], p[4:20]):
            dev.save()
        ans = bytes((op + 1, txid >> 8, txid & 0xFF, p[3]))
    elif op == _OP_MKU_START:
        return _mku_start(dev, key, txid, p), dev.master
    elif op == _OP_MKU_COMMIT:
        return _mku_commit(dev, key, txid, p)
    elif op == _OP_MKU_ABORT:
        pd = dev.pending
        if pd is not None:
            if pd.key.gen != p[3]:
                raise SCPMError(_ERR_STATE)
            drop_pending(dev)
            dev.save()
            dev.events.append(("mku_aborted", p[3]))
        return None, None
    elif op == _OP_SYNC_REQ:
        pd = dev.pending
        m = dev.master
        ans = (bytes((_OP_SYNC_RESP, txid >> 8, txid & 0xFF)) + bytes(p[3:19]) +
               bytes((m.gen if m else 0, pd.key.gen if pd else 0,
                      (pd.txid >> 8) if pd else 0, (pd.txid & 0xFF) if pd else 0)))
        return ans, key
    else:
        raise SCPMError(_ERR_UNKNOWN_OP)
    dev._last[op] = (txid, key, ans)
    return ans, key

def _user_key_init(dev, f, txid, p):
    last = dev._last.get(_OP_USER_KEY_INIT)
    if dev.enrolled:
        if last is not None and last[0] == txid and f.sa == dev.ksn and last[1] is dev.master:
            return last[2], last[1]
        raise SCPMError(_ERR_STATE)
    if p[19] == 0 or p[36] == 0:
        raise SCPMError(_ERR_MALFORMED)
    ch = dev._challenge
    if ch is None:
        raise SCPMError(_ERR_STATE)
    if not ct_equal(ch, p[3:19]):
        raise SCPMError(_ERR_CONFIRM)
    dev._challenge = None
    mgen, ugen = p[19], p[36]
    dev._install(_KIND_MASTER, 0, mgen, p[20:36])
    dev._install(_KIND_USER, 0, ugen, p[37:53])
    dev.ksn = f.sa
    dev.from_ksn = True  # the enrolling KSN: where device-initiated frames go
    dev.mku_state = IDLE
    dev.save()
    dev.events.append(("enrolled", f.sa))
    m = dev.master
    ans = bytes((_OP_USER_KEY_INIT_ACK, txid >> 8, txid & 0xFF, mgen, ugen))
    dev._last[_OP_USER_KEY_INIT] = (txid, m, ans)
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
    dh, fresh = acquire("tessera_fw.crypto.dh")
    try:
        return _mku_start_dh(dev, key, txid, p, dh)
    finally:
        dh = None
        if fresh:
            release("tessera_fw.crypto.dh")


def _mku_start_dh(dev, key, txid, p, dh):
    pd = dev.pending
    if key is not dev.master:
        raise SCPMError(_ERR_STATE)  # MKU_START travels under the current master key
    if pd is not None and pd.txid == txid:
        return pd.response  # retransmission: the stored answer, no DH, no flash write
    if txid == dev._done_txid:  # a retransmission of an update already resolved
        raise SCPMError(_ERR_STATE)
    new_gen = p[3]
    if new_gen != next_gen(key.gen):
        raise SCPMError(_ERR_STATE)
    try:
        yk = dh.decode_public(p[20:276])
    except dh.DHError:
        raise SCPMError(_ERR_DH)
    if pd is not None:  # a new TXID replaces the pending update
        drop_pending(dev)
    nonce_d = bytes(dev.rand(16))
    d = dev._next_dh  # (x, public) made while idle (Device.precompute), or now
    dev._next_dh = None  # one MKU_START only, whatever happens next
    try:
        if d is None:
            d = dh.DH(bytes(dev.rand(32)))
            d = (d._x, d.public)
    except dh.DHError:
        raise SCPMError(_ERR_DH)
    x, public = d
    d = None
    z = pow(yk, x, dh.P)
    x = None  # the exponent is forgotten with the pair
    if z < 2:
        raise SCPMError(_ERR_DH)
    z = z.to_bytes(dh.SIZE, "big")
    t = bytes(p[1:3]) + bytes((new_gen,)) + bytes(p[4:20]) + nonce_d + bytes(p[20:276]) + public
    mk = hmac_sha256(z, b"SCPM-MK", t)[:16]
    confirm_d = hmac_sha256(mk, b"SCPM-CONFIRM-D", t)[:16]
    confirm_k = hmac_sha256(mk, b"SCPM-CONFIRM-K", t)[:16]
    resp = bytes((_OP_MKU_RESPONSE, txid >> 8, txid & 0xFF, new_gen)) + nonce_d + public + confirm_d
    dev.pending = Pending(txid, Key(_KIND_MASTER, 0, new_gen, mk), confirm_k, resp)
    dev.mku_state = PENDING
    dev._req = None
    dev.save()  # PENDING is durable before the response leaves
    return resp

def _mku_commit(dev, key, txid, p):
    pd = dev.pending
    if pd is None or key is not pd.key:
        raise SCPMError(_ERR_STATE)
    if txid != pd.txid or p[3] != pd.key.gen:
        raise SCPMError(_ERR_STATE)
    if not ct_equal(p[4:20], pd.confirm_k):
        raise SCPMError(_ERR_CONFIRM)
    old = dev.master
    dev.keys[64] = pd.key
    dev.pending = None
    dev.mku_state = IDLE
    if old is not None:
        old.forget()
    dev._done_txid = txid
    dev.save()
    dev.events.append(("mku_committed", pd.key.gen))
    ans = bytes((_OP_MKU_COMMIT_ACK, txid >> 8, txid & 0xFF, pd.key.gen))
    dev._last[_OP_MKU_COMMIT] = (txid, pd.key, ans)
    return ans, pd.key
