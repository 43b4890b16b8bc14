# Persistence of the SCPM device (docs/scpm-firmware.md "Flash wear", profile section 10):
# functions of the Device (device.py), in their own module so that compiling device.py
# from source fits the esp32 heap (the parse tree of one module is the compile peak).
# Keys body (format 2, binary, in store.py's slot framing):
#   0x02 | KSN(4) | n(1) | n x (kind << 4 | index, gen, key(16))
#   | 0, or 1 | txid(2) | gen(1) | MK'(16) | confirm_k(16) | len(2) | MKU_RESPONSE PADATA
#   | SNF reservation entries
# Counters body (Store.save_counters prefixes the keys seq): the entries alone. An entry is
#   kind << 4 | index, gen, peer(4), tx reserved(4), rx reserved(4)   (0: none)
# save() writes the keys slots only when a key, the pending update or the KSN address
# changed (compared by object identity with dev._kref), else the small counters image.
from micropython import const

from tessera_fw.scpm.store import COFF, get32, put32

_SETUP = const(0)  # key kinds (const.py)
_MASTER = const(4)


class Pending:
    def __init__(self, txid, key, confirm_k, response):
        self.txid = txid
        self.key = key  # Key(KIND_MASTER, 0, new_gen, MK')
        self.confirm_k = confirm_k
        self.response = response  # MKU_RESPONSE PADATA, resent for a retransmitted MKU_START


def restore(dev, rec):
    # imported here: the slot store alone (self-test, tests) does not pull the engine in
    from tessera_fw.scpm.frame import Key

    if isinstance(rec, dict):  # JSON record of format 1: migrated by the next save
        from tessera_fw.scpm.migrate import body_from_json

        kb, cb = body_from_json(rec), None
    else:
        kb, cb = rec
    if kb[0] != 2:
        raise ValueError("key store format")
    dev.ksn = get32(kb, 1)
    o = 6
    for _ in range(kb[5]):
        kind, index = kb[o] >> 4, kb[o] & 15
        dev.keys[kb[o]] = Key(kind, index, kb[o + 1], bytes(kb[o + 2:o + 18]))
        o += 18
    if kb[o]:
        rl = (kb[o + 36] << 8) | kb[o + 37]
        dev.pending = Pending((kb[o + 1] << 8) | kb[o + 2],
                              Key(_MASTER, 0, kb[o + 3], bytes(kb[o + 4:o + 20])),
                              bytes(kb[o + 20:o + 36]), bytes(kb[o + 38:o + 38 + rl]))
        dev.mku_state = "PENDING"
        o += 38 + rl
    else:
        o += 1
    _restore_counters(dev, kb, o)
    if cb is not None:
        _restore_counters(dev, cb, 0)
    if isinstance(rec, dict):
        dev._kref = None
    else:
        _note_keys(dev, False)


def _restore_counters(dev, b, o):
    from tessera_fw.scpm.snf import RxWindow, TxCounter

    n = len(b)
    while o + 14 <= n:
        kind, gen, peer = b[o] >> 4, b[o + 1], get32(b, o + 2)
        k = dev.lookup(peer, kind, 0, gen) if kind == _MASTER else dev.keys[b[o]]
        if k is not None and k.gen == gen:
            tx, rx = get32(b, o + 6), get32(b, o + 10)
            c = k.tx.get(peer)
            if tx and (c is None or c.reserved < tx):  # reservations never move back
                k.tx[peer] = TxCounter(tx)
            w = k.rx.get(peer)
            if rx and (w is None or w.reserved < rx):
                k.rx[peer] = RxWindow(rx)
        o += 14


def _note_keys(dev, check):
    """check: True when the keys, pending update or KSN differ (object identity) from what
    was last written; else record the current ones as written."""
    r = dev._kref
    if check:
        if r is None or r[0] != dev.ksn or r[1] is not dev.pending:
            return True
        j = 2
        n = len(r)
        for k in dev.keys:
            if k is not None:
                if j >= n or k is not r[j]:
                    return True
                j += 1
        return j != n
    r = dev._kref = [dev.ksn, dev.pending]
    for k in dev.keys:
        if k is not None:
            r.append(k)


def _snf_entries(k, b, o):
    """Write (b not None) or count the SNF entries of key k; returns the new offset."""
    if k is None:
        return o
    tx, rx = k.tx, k.rx
    ki = (k.kind << 4) | k.index
    for peer in tx:
        if b is not None:
            w = rx.get(peer)
            b[o] = ki
            b[o + 1] = k.gen
            put32(b, o + 2, peer)
            put32(b, o + 6, tx[peer].reserved)
            put32(b, o + 10, w.reserved if w else 0)
        o += 14
    for peer in rx:
        if peer not in tx:
            if b is not None:
                b[o] = ki
                b[o + 1] = k.gen
                put32(b, o + 2, peer)
                put32(b, o + 6, 0)
                put32(b, o + 10, rx[peer].reserved)
            o += 14
    return o


def _counters(dev, b, o):
    for k in dev.keys:
        o = _snf_entries(k, b, o)
    p = dev.pending
    return _snf_entries(p.key if p else None, b, o)


def record(dev):
    """The keys body (format 2) of the current state."""
    n = 0
    for k in dev.keys:
        if k is not None and k.kind != _SETUP:
            n += 1
    p = dev.pending
    o = 6 + 18 * n + (38 + len(p.response) if p else 1)
    b = bytearray(_counters(dev, None, o))
    b[0] = 2
    put32(b, 1, dev.ksn)
    b[5] = n
    i = 6
    for k in dev.keys:
        if k is not None and k.kind != _SETUP:
            b[i] = (k.kind << 4) | k.index
            b[i + 1] = k.gen
            b[i + 2:i + 18] = k.key
            i += 18
    if p:
        rl = len(p.response)
        b[i] = 1
        b[i + 1] = p.txid >> 8
        b[i + 2] = p.txid & 0xFF
        b[i + 3] = p.key.gen
        b[i + 4:i + 20] = p.key.key
        b[i + 20:i + 36] = p.confirm_k
        b[i + 36] = rl >> 8
        b[i + 37] = rl & 0xFF
        b[i + 38:i + 38 + rl] = p.response
    _counters(dev, b, o)
    return b


def save(dev):
    """Make the current state durable (keys slots when a key changed, else the SNF
    reservations). On failure RAM goes back to the last durable state and OSError is
    raised: nothing that was not written is ever acted on."""
    st = dev.store
    try:
        if not dev._ok:
            raise OSError(5)  # EIO: the last rollback did not complete
        if st.slot < 0 or _note_keys(dev, True):
            st.save(record(dev))
            _note_keys(dev, False)
        else:
            n = _counters(dev, None, 0)
            _counters(dev, st.counters_buf(n), COFF)
            st.save_counters(n)
    except (OSError, MemoryError):
        rollback(dev)
        raise OSError(5)


def rollback(dev):
    """Back to the last durable state (after a failed store write). It comes from the
    store's images in RAM, not from flash: a read failing then (the fault that failed the
    write often fails reads too) made the device forget its enrolment, and the next two
    saves overwrote both slots with an empty state (issue 9 #6)."""
    dev._ok = False
    dev._reset_state()
    dev.mku_state = "IDLE"
    dev._req = None
    dev._last = {}
    rec = dev.store.current()
    if rec:
        restore(dev, rec)
    dev._kref = None  # the slot a failed keys write went to holds an unknown state: rewrite
    dev._ok = True
