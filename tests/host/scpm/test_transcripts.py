"""The host KSN reproduces every KSN frame of tests/vectors/scpm/transcripts.json byte for
byte when fed the device's frames (the firmware tests do the converse)."""
import json
from pathlib import Path

import pytest

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
            assert emitted.pop(0).hex() == ev["frame"], f"KSN frame {n_ksn} ({ev['pdu']})"
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
    assert ksn.peer(sc["device"]).master == sc["final"]["master_gen"]
    assert n_ksn > 0
