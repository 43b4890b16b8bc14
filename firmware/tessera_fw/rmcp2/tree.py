# Secure RMCP-2 on the board, part 2 (tree join, docs/rmcp2-profile.md B.3, B.4, B.11):
# the messages an RMA sends on the tree and the HASHED_MAID / probe proof of B.5. Apart from
# msg.py and seal.py so that the admission path does not hold them in the heap
# (docs/benchmarks.md, "RMCP-2 board RMA").
import hashlib

from tessera_fw.rmcp2.seal import hmac256


def relreq(w, sid, maid, ma_pass=0, ma_data=b""):
    """RELREQ with AUTH MEM_AUTH (11.2.3), and MA_AUTH when ma_pass (B.11)."""
    w.begin(0x09, 3, sid, maid).c2(0x23, 1, 0)
    if ma_pass:
        w.sub(0x81, ma_pass, ma_data)
    return w.end()


def pprobreq(w, sid, maid, hmaid, nonce, proof):
    """PPROBREQ of an RMA with PROBE_AUTH (B.3, B.4)."""
    w.begin(0xA2, 3, sid, maid)
    o = w.n
    w.cdata(0xC6, b"\x00\x00", hmaid)
    w.buf[o + 1] = 36
    w.buf[o + 20:o + 28] = nonce
    w.buf[o + 28:o + 36] = proof
    w.n = o + 36
    return w.end()


def status(w, mtype, sid, maid, children, members, gen):
    """STANS / STCOLANS with STATUS (B.4)."""
    w.begin(mtype, 3, sid, maid)
    o = w.n
    b = w.buf
    b[o] = 0xC5
    b[o + 1] = 8
    b[o + 2] = children >> 8
    b[o + 3] = children & 0xFF
    b[o + 4] = members >> 8
    b[o + 5] = members & 0xFF
    b[o + 6] = gen
    b[o + 7] = 0
    w.n = o + 8
    return w.end()


def hashed_maid(sid, maid):
    h = hashlib.sha256(b"RMCP2-HASHED-MAID")
    h.update(sid)
    h.update(maid)
    return h.digest()[:16]


def probe_proof(h_ktls, sid, nonce):
    return hmac256(h_ktls, b"RMCP2-PROBE", sid, nonce)[:8]
