"""Write tests/vectors/asm/*.json. The hex is assembled here by hand from the Annex A UL
table and struct packing, independently of tessera.asm.codec; the two worked examples are
copied from the reference (docs/asm.md) and must come out identical."""
from __future__ import annotations

import json
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "asm"
PRE = "060e2b34020501010207" "01"


def ul(xx: int, yy: int) -> str:
    return f"{PRE}{xx:02x}{yy:02x}000000"


def klv(key: str, value: bytes) -> str:
    return key + "83" + len(value).to_bytes(3, "big").hex() + value.hex()


def u32(v): return struct.pack(">I", v)
def u64(v): return struct.pack(">Q", v)
def u8(v): return struct.pack(">B", v)
def batch(items, n): return u32(len(items)) + u32(n) + b"".join(items)


KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY2 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
XML = b'<?xml version="1.0"?><LogRecord/>'


def lekey(kid, key, exp, attr): return u32(kid) + key + u32(exp) + u64(attr)


REQ_COPY = bytes.fromhex(klv(ul(2, 0x10), u32(9)))
cases = [
    ("GetTime request (reference worked example)", "GetTimeRequest", {"request_id": 1}, klv(ul(2, 0x10), u32(1)), "reference"),
    ("LEKeyLoad request (reference worked example)", "LEKeyLoadRequest",
     {"request_id": 3, "keys": [{"key_id": 4001, "key": KEY.hex(), "expire": 3600, "attribute": 123456789}]},
     klv(ul(3, 0x20), u32(3) + batch([lekey(4001, KEY, 3600, 123456789)], 32)), "reference"),
    ("GetTime response", "GetTimeResponse", {"request_id": 1, "time": 1767225600, "response": 0},
     klv(ul(2, 0x11), u32(1) + u64(1767225600) + u8(0)), "project"),
    ("GetEventList request", "GetEventListRequest", {"request_id": 7, "time_start": 1767225600, "time_stop": 1767229200},
     klv(ul(2, 0x12), u32(7) + u32(1767225600) + u32(1767229200)), "project"),
    ("GetEventList response", "GetEventListResponse", {"request_id": 7, "event_ids": [5, 6, 9], "response": 0},
     klv(ul(2, 0x13), u32(7) + batch([u32(5), u32(6), u32(9)], 4) + u8(0)), "project"),
    ("GetEventList response, empty batch", "GetEventListResponse", {"request_id": 8, "event_ids": [], "response": 0},
     klv(ul(2, 0x13), u32(8) + batch([], 4) + u8(0)), "project"),
    ("GetEventList response, window too large to list (Failed, empty batch)", "GetEventListResponse",
     {"request_id": 9, "event_ids": [], "response": 1},
     klv(ul(2, 0x13), u32(9) + batch([], 4) + u8(1)), "project"),
    ("GetEventID request", "GetEventIDRequest", {"request_id": 10, "event_id": 6},
     klv(ul(2, 0x14), u32(10) + u32(6)), "project"),
    ("GetEventID response", "GetEventIDResponse", {"request_id": 10, "log_record": XML.hex(), "response": 0},
     klv(ul(2, 0x15), u32(10) + XML + u8(0)), "project"),
    ("QuerySPB request", "QuerySPBRequest", {"request_id": 11}, klv(ul(2, 0x16), u32(11)), "project"),
    ("QuerySPB response, security alert", "QuerySPBResponse",
     {"request_id": 11, "protocol_version": 1, "status": 2, "response": 0},
     klv(ul(2, 0x17), u32(11) + u8(1) + u8(2) + u8(0)), "project"),
    ("LEKeyLoad request, two keys", "LEKeyLoadRequest",
     {"request_id": 12, "keys": [{"key_id": 1, "key": KEY.hex(), "expire": 60, "attribute": 1},
                                 {"key_id": 2, "key": KEY2.hex(), "expire": 4294967295, "attribute": 18446744073709551615}]},
     klv(ul(3, 0x20), u32(12) + batch([lekey(1, KEY, 60, 1), lekey(2, KEY2, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)], 32)), "project"),
    ("LEKeyLoad response, overflow", "LEKeyLoadResponse", {"request_id": 12, "overflow": 1, "response": 1},
     klv(ul(3, 0x21), u32(12) + u8(1) + u8(1)), "project"),
    ("LEKeyQueryID request", "LEKeyQueryIDRequest", {"request_id": 13, "key_id": 4001},
     klv(ul(3, 0x22), u32(13) + u32(4001)), "project"),
    ("LEKeyQueryID response", "LEKeyQueryIDResponse", {"request_id": 13, "present": 1, "response": 0},
     klv(ul(3, 0x23), u32(13) + u8(1) + u8(0)), "project"),
    ("LEKeyQueryAll request", "LEKeyQueryAllRequest", {"request_id": 14}, klv(ul(3, 0x24), u32(14)), "project"),
    ("LEKeyQueryAll response", "LEKeyQueryAllResponse", {"request_id": 14, "key_ids": [4001, 4002], "response": 0},
     klv(ul(3, 0x25), u32(14) + batch([u32(4001), u32(4002)], 4) + u8(0)), "project"),
    ("LEKeyPurgeID request", "LEKeyPurgeIDRequest", {"request_id": 15, "key_id": 4001},
     klv(ul(3, 0x26), u32(15) + u32(4001)), "project"),
    ("LEKeyPurgeID response, key absent", "LEKeyPurgeIDResponse", {"request_id": 15, "no_key_id": 1, "response": 0},
     klv(ul(3, 0x27), u32(15) + u8(1) + u8(0)), "project"),
    ("LEKeyPurgeAll request", "LEKeyPurgeAllRequest", {"request_id": 16}, klv(ul(3, 0x28), u32(16)), "project"),
    ("LEKeyPurgeAll response", "LEKeyPurgeAllResponse", {"request_id": 16, "response": 0},
     klv(ul(3, 0x29), u32(16) + u8(0)), "project"),
    ("BadRequest response with copy", "BadRequestResponse", {"request_copy": REQ_COPY.hex(), "response": 2},
     klv(ul(1, 0x01), REQ_COPY + u8(2)), "project"),
    ("BadRequest response, busy (empty copy)", "BadRequestResponse", {"request_copy": "", "response": 3},
     klv(ul(1, 0x01), u8(3)), "project"),
]

good_get_time = klv(ul(2, 0x10), u32(5))
bad = [
    # fatal: the stream cannot be framed -> the responder closes the connection
    ("not a SMPTE UL", "ffffffff" + good_get_time[8:], "fatal", "not-klv"),
    ("short-form BER length", ul(2, 0x10) + "04" + u32(5).hex(), "fatal", "ber-short-form"),
    ("2-byte BER length", ul(2, 0x10) + "810004" + u32(5).hex(), "fatal", "ber-size"),
    ("5-byte BER length", ul(2, 0x10) + "8400000004" + u32(5).hex(), "fatal", "ber-size"),
    ("length beyond the sane maximum", ul(3, 0x20) + "83ffffff" + u32(5).hex(), "fatal", "too-long"),
    # answered BadRequest (copy) -- framed but not understood
    ("wrong ASM UL prefix", "060e2b34020501010207ff" + "021000000083000004" + u32(5).hex(), "badrequest", "wrong-ul"),
    ("unknown command", klv(ul(2, 0x30), u32(5)), "badrequest", "unknown-command"),
    ("response key sent as a request", klv(ul(2, 0x11), u32(5) + u64(0) + u8(0)), "badrequest", "not-a-request"),
    ("zero Request_ID", klv(ul(2, 0x10), u32(0)), "badrequest", "zero-request-id"),
    ("value shorter than the fields", klv(ul(2, 0x12), u32(5) + u32(1)), "badrequest", "short-value"),
    ("value longer than the fields", klv(ul(2, 0x10), u32(5) + b"\0"), "badrequest", "long-value"),
    ("truncated batch", klv(ul(3, 0x20), u32(5) + u32(2) + u32(32) + lekey(1, KEY, 1, 1)), "badrequest", "truncated-batch"),
    ("batch header missing", klv(ul(3, 0x20), u32(5) + u32(1)), "badrequest", "truncated-batch"),
    ("batch count x length beyond the value", klv(ul(3, 0x20), u32(5) + u32(0x10000000) + u32(32)), "badrequest", "truncated-batch"),
    ("batch count x length below the value", klv(ul(3, 0x20), u32(5) + u32(1) + u32(32) + lekey(1, KEY, 1, 1) + lekey(2, KEY, 1, 1)), "badrequest", "long-value"),
    # answered with the command's own response, code 2 (invalid parameter)
    ("wrong batch item length", klv(ul(3, 0x20), u32(5) + u32(1) + u32(31) + lekey(1, KEY, 1, 1)[:31]), "invalid", "batch-item-length"),
    ("duplicate key IDs", klv(ul(3, 0x20), u32(5) + batch([lekey(7, KEY, 1, 1), lekey(7, KEY2, 1, 1)], 32)), "invalid", "duplicate-id"),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ref = {c[0]: c[3] for c in cases if c[4] == "reference"}
    assert ref["GetTime request (reference worked example)"] == "060e2b34020501010207010210000000" "83000004" "00000001"
    assert ref["LEKeyLoad request (reference worked example)"] == (
        "060e2b34020501010207010320000000" "8300002c" "00000003" "00000001" "00000020" "00000fa1"
        "00112233445566778899aabbccddeeff" "00000e10" "00000000075bcd15")
    (OUT / "messages.json").write_text(json.dumps({
        "description": "ASM (SMPTE 430-6) messages as hex KLV. 'reference' cases are the worked examples "
                       "of the reference, byte for byte; 'project' cases are defined by this project "
                       "(tools/gen_asm_vectors.py, assembled independently of the codec).",
        "cases": [{"name": n, "message": m, "fields": f, "hex": h, "source": s} for n, m, f, h, s in cases],
    }, indent=1) + "\n")
    (OUT / "malformed.json").write_text(json.dumps({
        "description": "Malformed requests and the expected handling: 'fatal' = the stream cannot be framed, "
                       "the responder closes the connection; 'badrequest' = BadRequest with the complete copy; "
                       "'invalid' = the command's response with general response 2. Defined by this project.",
        "cases": [{"name": n, "hex": h, "expect": e, "kind": k} for n, h, e, k in bad],
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
