# Key store migration (docs/scpm-firmware.md "Flash wear"): a JSON record of format 1, as
# the firmware before the binary store wrote it, becomes a format 2 keys body. Imported only
# when such a record is found, so the code costs no heap on a migrated device.
#   {"v": 1, "ksn": KSN, "keys": [[kind, index, gen, hex]],
#    "pend": [txid, gen, hex MK', hex confirm_k, hex response], "snf": [[kind, index, gen, peer, tx, rx]]}
from binascii import unhexlify

from tessera_fw.scpm.store import put32


def body_from_json(rec):
    keys = rec.get("keys", ())
    p = rec.get("pend")
    snf = rec.get("snf", ())
    resp = unhexlify(p[4]) if p else b""
    b = bytearray(6 + 18 * len(keys) + (38 + len(resp) if p else 1) + 14 * len(snf))
    b[0] = 2
    put32(b, 1, rec.get("ksn", 0))
    b[5] = len(keys)
    o = 6
    for kind, index, gen, k in keys:
        b[o] = (kind << 4) | index
        b[o + 1] = gen
        b[o + 2:o + 18] = unhexlify(k)
        o += 18
    if p:
        b[o] = 1
        b[o + 1] = p[0] >> 8
        b[o + 2] = p[0] & 0xFF
        b[o + 3] = p[1]
        b[o + 4:o + 20] = unhexlify(p[2])
        b[o + 20:o + 36] = unhexlify(p[3])
        b[o + 36] = len(resp) >> 8
        b[o + 37] = len(resp) & 0xFF
        b[o + 38:o + 38 + len(resp)] = resp
        o += 38 + len(resp)
    else:
        o += 1
    for kind, index, gen, peer, tx, rx in snf:
        b[o] = (kind << 4) | index
        b[o + 1] = gen
        put32(b, o + 2, peer)
        put32(b, o + 6, tx)
        put32(b, o + 10, rx)
        o += 14
    return b
