"""The host KSN reproduces every KSN frame of tests/vectors/scpm/transcripts.json byte for
byte when fed the device's frames (the firmware tests do the converse)."""
import json
from pathlib import Path

import pytest

from tessera.scpm import codec as C
from tessera.scpm.codec import KeyKind
from tessera.scpm.ksn import KsnEngine
from tessera.scpm.sim import Clock
from tessera.scpm.store import Store

V = json.loads((Path(__file__).resolve().parents[2] / "vectors" / "scpm" / "transcripts.json").read_text())


class Replay:
    def __init__(self, values):
        self.values = list(values)

    def __call__(self, n):
        v = bytes.fromhex(self.values.pop(0))
        assert len(v) == n
        return v


@pytest.mark.parametrize("sc", V["scenarios"], ids=lambda s: s["name"])
def test_ksn_reproduces_transcript(sc, tmp_path):
    rng, clock = Replay(sc["ksn_random"]), Clock()

    def engine():
        st = Store(tmp_path / "ksn.sqlite", storage_key=bytes(range(32)), durable=False)
        e = KsnEngine(st, address=sc["ksn"], rng=rng, clock=clock)
        e.register(sc["device"])
        return e

    ksn = engine()
    emitted: list[bytes] = []
    n_ksn = 0
    sent: list[tuple[str, int]] = []  # (OP name, TXID) of every KSN key-management frame
    for ev in sc["events"]:
        kind = ev["ev"]
        if kind == "call":
            args = {k: (bytes.fromhex(v) if k == "setup_key" else v) for k, v in ev["args"].items()}
            if "kind" in args:
                args["kind"] = KeyKind(args["kind"])
            _, sends = getattr(ksn, ev["call"])(sc["device"], **args)
            emitted += [s.frame for s in sends]
        elif kind == "ksn":
            assert emitted, f"KSN frame {n_ksn} ({ev['pdu']}) was not produced"
            frame = emitted.pop(0)
            assert frame.hex() == ev["frame"], f"KSN frame {n_ksn} ({ev['pdu']})"
            sent.append(_op_txid(ksn, frame))
            n_ksn += 1
        elif kind == "dev":
            if ev["delivered"]:
                emitted += [s.frame for s in ksn.handle(bytes.fromhex(ev["frame"]))]
        elif kind == "timeout":
            clock.t = max(clock.t, ksn.next_deadline())
            emitted += [s.frame for s in ksn.poll()]
        elif kind == "ksn_restart":
            emitted.clear()
            ksn.store.close()
            ksn = engine()
        elif kind == "ksn_new_key":
            ksn.new_home_key(KeyKind(ev["args"]["kind"]), ev["args"]["idx"])
    assert not emitted and not rng.values
    _check_sync_txids(sc["name"], sent)
    assert ksn.peer(sc["device"]).master == sc["final"]["master_gen"]
    assert n_ksn > 0


def _op_txid(ksn: KsnEngine, frame: bytes) -> tuple[str, int]:
    f = C.decode(frame)
    if isinstance(f, C.PlainFrame):
        pdu = C.decode_pdu(f.padata)
    else:
        key = ksn._key(ksn.peer(f.da), (int(f.shd.kind), f.shd.index, f.shd.gen))
        pdu = C.decode_pdu(C.open_frame(f, key))
    return pdu.OP.name, pdu.txid


def _check_sync_txids(name: str, sent: list[tuple[str, int]]) -> None:
    """Profile 6.4 (issue 10): a SYNC_REQ sent after an MKU_ABORT carries a TXID that no earlier
    SYNC_REQ of the scenario used; the sync-abort transcript pins the case."""
    after_abort = 0
    for i, (op, txid) in enumerate(sent):
        if op == "SYNC_REQ" and i and sent[i - 1][0] == "MKU_ABORT":
            assert txid not in {t for o, t in sent[:i] if o == "SYNC_REQ"}, (name, i, txid)
            after_abort += 1
    if name == "sync-abort":
        assert after_abort == 1
