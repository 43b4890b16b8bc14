# The host's RMCP-2 vectors (tests/vectors/rmcp2/, tools/gen_rmcp2_vectors.py) reproduced by the
# firmware codec inside MicroPython: every valid message is accepted with the same controls,
# what an RMA sends is built byte for byte, every corpus case gets the same error number.
import gc

import micropython

from tessera_fw.rmcp2 import msg as W  # first: compiling it needs the most heap

gc.collect()
from fwtest_scpm_util import iter_array  # noqa: E402
from mpytest import unhex  # noqa: E402
from tessera_fw.rmcp2.const import Rmcp2Error  # noqa: E402
from tessera_fw.rmcp2.msg import Decoder, Writer  # noqa: E402
from tessera_fw.rmcp2 import tree as T  # noqa: E402 (the part-2 builders)


def test_messages_decode_with_the_same_controls():
    d = Decoder()
    n = 0
    for c in iter_array("rmcp2/messages.json", "cases"):
        raw = unhex(c["msg"])
        assert d.decode(raw) == c["type"], c["name"]
        assert d.nt == c["nt"] and d.n == len(raw) and d.skipped == c["skipped"], c["name"]
        spans = c["spans"]
        assert d.count == len(spans), c["name"]
        for k in range(d.count):
            code, hx = spans[k]
            assert raw[d.starts[k]] == code, (c["name"], k)
            assert bytes(d.view(d.starts[k], d.ends[k])) == unhex(hx), (c["name"], k)
        n += 1
    assert n >= 60


def test_fields_an_rma_reads():
    d = Decoder()
    for c in iter_array("rmcp2/messages.json", "cases"):
        raw = unhex(c["msg"])
        d.decode(raw)
        desc = c["desc"]
        assert d.same(4, unhex(desc["session_id"])) and d.same(12, unhex(desc["maid"]))
        assert not d.same(12, b"\x00" * 8)
        for ctl in desc["controls"]:
            if ctl["control"] == "KeyInfo":
                assert d.key_type(d.km) == raw[d.pos[15] + 2] and bytes(d.key_data(d.km)) == unhex(ctl["key_data"])
            elif ctl["control"] == "AuthAns":
                if ctl["key"]:
                    assert bytes(d.key_data(d.akm)) == unhex(ctl["key"]["key_data"])
                else:
                    assert d.akm == 0 and d.key_data(d.akm) is None
            elif ctl["control"] == "ResultCtl":
                assert d.has(0xC1) and d.byte(0xC1, 2) == raw[d.pos[20] + 2]
            elif ctl["control"] == "GkMech":
                assert d.byte(0x15, 2) in (1, 2) and d.byte(0x15, 4) in (1, 2, 3, 4, 5)
        if c["type"] == 0x0C and desc["controls"][0]["ma_auth"]:
            assert d.ma and raw[d.ma] == 0x81


def _arg(a):
    if isinstance(a, str):
        return unhex(a)
    if isinstance(a, list):
        return [tuple(x) for x in a]
    return a


def test_rma_messages_built_byte_for_byte():
    w = Writer()
    n = 0
    for c in iter_array("rmcp2/messages.json", "cases"):
        r = c["rma"]
        if r is None:
            continue
        desc = c["desc"]
        sid, maid = unhex(desc["session_id"]), unhex(desc["maid"])
        fn = getattr(W, r[0], None) or getattr(T, r[0])
        args = [_arg(a) for a in r[1:]]
        out = fn(w, sid, maid, *args) if r[0] not in ("empty", "status", "result") else fn(w, args[0], sid, maid, *args[1:])
        assert bytes(out) == unhex(c["msg"]), c["name"]
        n += 1
    assert n >= 18


def test_corpus_same_error_numbers():
    d = Decoder()
    total = bad = 0
    for c in iter_array("rmcp2/corpus.json", "cases"):
        try:
            d.decode(unhex(c["msg"]))
            got = 0
        except Rmcp2Error as e:
            got = e.code
        assert got == c["error"], (c["tag"], got, c["error"])
        total += 1
        bad += got != 0
    assert total > 500 and bad > 300


def test_decode_allocates_nothing():
    # the valid vectors decoded again with the heap locked: any allocation is a MemoryError
    d = Decoder()
    raws = []
    for c in iter_array("rmcp2/messages.json", "cases"):
        if len(raws) < 40:
            raws.append(unhex(c["msg"]))
    gc.collect()
    micropython.heap_lock()
    try:
        for _ in range(3):
            for raw in raws:
                d.decode(raw)
    finally:
        micropython.heap_unlock()


def test_oversize_is_refused_before_anything_else():
    d = Decoder()
    big = bytearray(1025)
    try:
        d.decode(big)
    except Rmcp2Error as e:
        assert e.code == 3
    else:
        raise AssertionError("1025 bytes accepted")


def test_hb_with_content_addr_exact_bytes():
    # B.4 CONTENT_ADDR (0xC8, defined by this project), the contract's example: UDP 40000,
    # TCP 40001 -> c8 08 00 00 9c 40 9c 41, inside an RMA's HB (Length 28)
    w = Writer()
    sid, maid = unhex("0123456789abcdef"), unhex("7f000001b1010001")
    out = bytes(W.hb_addr(w, sid, maid, 40000, 40001))
    assert out == unhex("43ad001c") + sid + maid + unhex("c80800009c409c41"), out
    assert bytes(W.hb_addr(w, sid, maid, 0, 65535))[20:] == unhex("c8080000" + "0000ffff")
    # the host codec's vectors (tests/vectors/rmcp2/messages.json content_addr_cases): the
    # RMA's HB built by the board byte for byte, and every case decoded with 0xC8 skipped
    n = 0
    for c in iter_array("rmcp2/messages.json", "content_addr_cases"):
        msg = unhex(c["msg"])
        d = c["desc"]
        if d["nt"] == "RMA" and d["type"] == "HB":
            ca = d["controls"][0]
            built = bytes(W.hb_addr(w, unhex(d["session_id"]), unhex(d["maid"]), ca["udp"], ca["tcp"]))
            assert built == msg, (c["name"], built)
            n += 1
        dd = Decoder()
        assert dd.decode(msg) == c["type"] and dd.skipped >= 1, c["name"]
    assert n >= 1
    # the board's own decoder skips it as an unknown control (B.2): an HB with one skipped
    d = Decoder()
    assert d.decode(out) == 0xAD and d.skipped == 1 and d.count == 0 and d.n == 28
