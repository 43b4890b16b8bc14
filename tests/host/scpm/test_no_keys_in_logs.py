"""Representative SCPM flows at DEBUG (enrolment, SP key, master key update with a lost
commit and SYNC, application frames, refused frames): no setup, master, user or SP key,
derived key or storage key appears in the logs, in the engine's objects' reprs, or in
decoded frames' reprs (PADATA of key-management frames carries keys)."""
from __future__ import annotations

import logging

from ..security.leaks import find_leaks
from .conftest import SKEY, setup_key
from tessera.scpm import codec as C
from tessera.scpm.codec import KeyKind

DEV = 0x0A000200


def _secrets(world) -> dict[str, bytes]:
    out = {"storage key": SKEY, "setup key": setup_key(DEV)}
    for (kind, idx, gen), raw in world.store.home_keys().items():
        out[f"home key {kind}/{idx}/{gen}"] = raw
    for gen, k in world.engine.peer(DEV).masters.items():
        out[f"master {gen}"] = k.raw
    for name, k in list(out.items()):
        if len(k) == 16:
            u = C.UsageKey(k)
            out[name + " (enc)"], out[name + " (mac)"] = u.enc, u.mac
    return out


def test_scpm_flows_leak_no_key_material(world, caplog):
    caplog.set_level(logging.DEBUG)
    seen: dict[str, bytes] = {}
    reprs: list[str] = []
    dev = world.enrolled(DEV)
    seen.update(_secrets(world))
    e = world.engine
    assert world.run(e.provision(DEV, KeyKind.SP, 0)).status == "done"
    seen.update(_secrets(world))
    # a master key update with a frame lost on the way (retransmitted), then a SYNC
    drop = {"n": 0}

    def lose_ack(direction, addr, frame):
        if direction == "dev->ksn" and dev.pending is None and drop["n"] == 0 and e.peer(DEV).pending is not None:
            drop["n"] += 1
            return None
        return frame

    world.fleet.hook = lose_ack
    t = world.run(e.rotate(DEV))
    world.fleet.hook = None
    reprs.append(repr(t))
    world.run(e.sync(DEV))
    seen.update(_secrets(world))
    assert e.peer(DEV).masters and dev.master.gen == max(e.peer(DEV).masters)
    t = world.run(e.app_set(DEV, 2, b"\x00\x09", kind=KeyKind.SP))
    assert t.result == (0, b"\x00\x09")
    # refused frames: replay of a KSN frame at the device, garbage at the KSN
    _, sends = e.app_get(DEV, 1)
    dev.receive(sends[0].frame, 0)
    dev.receive(sends[0].frame, 0)
    e.handle(b"\x11" + bytes(40))
    reprs += [repr(e.peer(DEV)), repr(world.store.device(DEV))]
    reprs += [repr(k) for k in world.store.device_keys(DEV)]
    # decoded key-management frames: a USER_KEY_INIT carries the master and user keys
    master = next(iter(e.peer(DEV).masters.values()))
    pdu = C.UserKeyInit(txid=5, nonce_d=bytes(16), master_gen=1, master_key=master.raw, user_gen=1,
                        user_key=bytes(range(16)))
    skey = C.UsageKey(setup_key(DEV))
    frame = C.seal(0x1, DEV, C.SecureHeader(C.Service.AUTH_CONF, KeyKind.SETUP, 0, 1), 1, pdu.encode(), skey)
    rec = C.receive(frame, DEV, lambda sa, shd: skey, lambda sa, shd: C.ReplayWindow())
    reprs += [repr(pdu), repr(rec), repr(C.decode_pdu(rec.padata))]
    text = caplog.text + "\n".join(reprs)
    assert "master key update" in caplog.text.lower() or "mku" in caplog.text.lower()  # the flows did log
    where = [i for i, r in enumerate([caplog.text] + reprs) if find_leaks(seen, r)]
    assert find_leaks(seen, text) == [], where
