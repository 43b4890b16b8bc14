"""KSN engine against firmware device engines (mpshim): life cycle, crash recovery at every
point of an update, device-requested updates, and the negative matrix."""
import pytest

from tessera.scpm import codec as C
from tessera.scpm.codec import ErrorCode, KeyKind
from tessera.scpm.sim import DetRng, memfs_store

from .conftest import World, setup_key

DEV = 0x0A000010


def test_lifecycle_small_fleet(world):
    devs = {a: world.enrolled(a) for a in range(0x0A000100, 0x0A000108)}
    for a, dev in devs.items():
        assert world.run(world.engine.provision(a, KeyKind.SP, 2)).status == "done"
        t = world.run(world.engine.rotate(a))
        assert (t.status, t.result, dev.master.gen) == ("done", 2, 2)
        t = world.run(world.engine.app_get(a, 1))
        assert t.result == (0, b"\x00")
    rec = world.store.device(0x0A000100)
    assert rec.state == "enrolled" and rec.master_gen == 2 and rec.held == {"1/0": 1, "2/2": 1}


def test_enrol_needs_the_label_key(world):
    dev = world.add(DEV)
    t = world.run(world.engine.enrol(DEV, bytes(16)))  # a node that never read the label
    assert t.status == "failed" and not dev.enrolled
    assert dev.errors.get(int(ErrorCode.MAC))  # USER_KEY_INIT refused at step 4, no answer
    t = world.run(world.engine.enrol(DEV, setup_key(DEV)))
    assert t.status == "done" and dev.enrolled and dev.ksn == C.KSN_ADDRESS


def test_enrolled_device_refuses_a_second_enrolment(world):
    world.enrolled(DEV)
    t = world.run(world.engine.enrol(DEV, setup_key(DEV)))
    assert t.status == "failed" and t.error.code == ErrorCode.STATE
    assert "already enrolled" in str(t.error)  # says why the hello got no answer


def _frames_of_rotate(tmp_path):
    """How many frames (both directions) one clean update takes."""
    (tmp_path / "count").mkdir(exist_ok=True)
    w = World(tmp_path / "count", "count")
    w.enrolled(DEV)
    n = [0]

    def hook(d, a, f):
        n[0] += 1
        return f

    w.fleet.hook = hook
    assert w.run(w.engine.rotate(DEV)).status == "done"
    return n[0]


@pytest.mark.parametrize("reboot_device", [False, True])
def test_ksn_crash_at_every_point_of_an_update(tmp_path, reboot_device):
    """Cut the update after k frames (the rest are lost and the KSN dies), optionally reboot the
    device, restart the KSN from SQLite, SYNC: both sides agree and the device stays reachable."""
    total = _frames_of_rotate(tmp_path)
    assert total == 4
    for cut in range(total + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        w = World(d, f"cut{cut}")
        store = memfs_store()
        dev = w.fleet.add(DEV, setup_key(DEV), rand=DetRng(f"d{cut}"), store=store)
        assert w.run(w.engine.enrol(DEV, setup_key(DEV))).status == "done"
        seen = [0]

        def hook(direction, addr, frame):
            seen[0] += 1
            return frame if seen[0] <= cut else None

        w.fleet.hook = hook
        w.fleet.pump(w.engine.rotate(DEV)[1])
        w.fleet.hook = None
        w.restart_ksn()
        if reboot_device:
            dev = w.fleet.add(DEV, setup_key(DEV), rand=DetRng(f"d{cut}b"), store=store)
        peer = w.engine.peer(DEV)
        assert peer.needs_sync == (2 <= cut < 4)  # pending persisted once MKU_RESPONSE was checked
        t = w.run(w.engine.sync(DEV))
        assert t.status == "done", (cut, t.error)
        assert dev.master.gen == w.engine.peer(DEV).master and dev.pending is None, cut
        # once the KSN persisted the pending key (cut >= 2) SYNC completes the update; before,
        # it aborts the device's pending key (6.4)
        assert dev.master.gen == (2 if cut >= 2 else 1), cut
        t = w.run(w.engine.app_get(DEV, 3))
        assert t.result == (0, b"0.1.0"), cut
        assert w.run(w.engine.rotate(DEV)).status == "done"
        assert dev.master.gen == w.engine.peer(DEV).master


def test_mku_commit_timeout_leaves_sync_to_decide(world):
    dev = world.enrolled(DEV)
    world.fleet.hook = lambda d, a, f: None if d == "dev->ksn" and len(f) == 51 else f  # lose every ACK
    t = world.run(world.engine.rotate(DEV))
    assert t.status == "failed" and world.engine.peer(DEV).needs_sync
    with pytest.raises(C.ScpmError) as e:
        world.engine.rotate(DEV)
    assert e.value.code == ErrorCode.STATE
    world.fleet.hook = None
    assert world.run(world.engine.sync(DEV)).status == "done"
    assert world.engine.peer(DEV).master == dev.master.gen == 2


def test_device_requested_update_and_retransmitted_request(world):
    dev = world.enrolled(DEV)
    frames = dev.request_update(2, 0)
    req = bytes(frames[0])
    world.fleet.hook = lambda d, a, f: None if d == "ksn->dev" else f  # first MKU_START lost
    world.fleet.from_device(DEV, [req])
    assert world.engine.peer(DEV).km.kind == "mku"
    world.fleet.hook = None
    again = dev.tick(5000)  # the device resends after 5 s with the same TXID
    assert len(again) == 1 and bytes(again[0]) != req
    world.fleet.from_device(DEV, again)
    assert dev.master.gen == 2 == world.engine.peer(DEV).master
    assert ("mku_committed", 2) in dev.events


def test_device_request_while_busy_is_queued(world):
    dev = world.enrolled(DEV)
    t, sends = world.engine.provision(DEV, KeyKind.MAKER)
    world.fleet.from_device(DEV, dev.request_update(1, 0))
    world.fleet.pump(sends)
    assert t.status == "done" and dev.master.gen == 2


def test_app_authority(world):
    world.enrolled(DEV)
    e = world.engine
    assert world.run(e.provision(DEV, KeyKind.SP, 0)).status == "done"
    assert world.run(e.app_set(DEV, 2, b"\x00\x07")).result[0] == ErrorCode.AUTHORITY  # tariff needs SP
    assert world.run(e.app_set(DEV, 2, b"\x00\x07", kind=KeyKind.SP)).result == (0, b"\x00\x07")
    assert world.run(e.app_get(DEV, 2)).result == (0, b"\x00\x07")
    assert world.run(e.app_set(DEV, 3, b"x", kind=KeyKind.SP)).result[0] == ErrorCode.AUTHORITY
    assert world.run(e.app_get(DEV, 99)).result[0] == ErrorCode.UNKNOWN_OP
    for svc in C.Service:
        assert world.run(e.app_get(DEV, 1, service=svc)).result == (0, b"\x00")
    with pytest.raises(C.ScpmError) as ex:
        e.app_get(DEV, 1, kind=KeyKind.MAKER)  # the KSN holds no maker key yet
    assert ex.value.code == ErrorCode.NO_KEY


def _app_frame(world, prop=1):
    t, sends = world.engine.app_get(DEV, prop)
    return t, sends[0].frame


def test_negative_matrix_towards_the_device(world):
    dev = world.enrolled(DEV)
    e = world.engine
    # replayed: the same frame twice -> one answer, then ERR_REPLAY and silence
    t, f = _app_frame(world)
    assert len(dev.receive(f)) == 1 and dev.receive(f) == [] and dev.last_error == ErrorCode.REPLAY
    # reordered beyond the window: 40 newer frames first, then the old one -> ERR_TOO_OLD
    t, old = _app_frame(world)
    for _ in range(40):
        assert len(dev.receive(_app_frame(world)[1])) == 1
    assert dev.receive(old) == [] and dev.last_error == ErrorCode.TOO_OLD
    # reordered inside the window is accepted once
    _, a = _app_frame(world)
    _, b = _app_frame(world)
    assert len(dev.receive(b)) == 1 and len(dev.receive(a)) == 1
    # tampered at every byte position: a specific error each, never an answer
    _, f = _app_frame(world)
    seen = set()
    for i in range(len(f)):
        bad = bytearray(f)
        bad[i] ^= 0x5A
        assert dev.receive(bytes(bad)) == [], i
        seen.add(dev.last_error)
    assert ErrorCode.MAC in seen and seen <= {int(c) for c in ErrorCode}
    # truncated at every length
    for n in range(len(f)):
        assert dev.receive(f[:n]) == []
        assert dev.last_error in (ErrorCode.TRUNCATED, ErrorCode.LENGTH)
    # wrong key (a KSN with another user key under the same generation)
    stranger = C.seal(C.KSN_ADDRESS, DEV, C.SecureHeader(C.Service.AUTH_CONF, KeyKind.USER, 0, 1), 10**6,
                      C.AppGet(7, 1).encode(), C.UsageKey(bytes(16)))
    assert dev.receive(stranger) == [] and dev.last_error == ErrorCode.MAC
    # unknown generation
    nogen = C.seal(C.KSN_ADDRESS, DEV, C.SecureHeader(C.Service.AUTH_CONF, KeyKind.USER, 0, 9), 10**6,
                   C.AppGet(7, 1).encode(), C.UsageKey(bytes(16)))
    assert dev.receive(nogen) == [] and dev.last_error == ErrorCode.NO_KEY
    # wrong level: the user key may not set the maker's property -> answered, status ERR_AUTHORITY
    assert world.run(e.app_set(DEV, 3, b"9.9")).result[0] == ErrorCode.AUTHORITY
    # wrong KSN: key management under the user key from a node that is not the KSN
    user = e.home[(1, 0, 1)]
    rogue = C.seal(0x0A0000EE, DEV, C.SecureHeader(C.Service.AUTH_CONF, KeyKind.USER, 0, 1), 1,
                   C.SpKeyInit(9, 0, 1, bytes(16)).encode(), user)
    ans = dev.receive(rogue)
    assert dev.last_error == ErrorCode.WRONG_KSN and len(ans) == 1
    # ... and a rogue KSN cannot re-enrol it (nor draw any answer: issue 11 #12)
    assert dev.receive(C.encode_plain(0x0A0000EE, DEV, C.EnrolHello(3).encode())) == []
    assert dev.last_error == ErrorCode.STATE and dev.ksn == C.KSN_ADDRESS
    # the device and the KSN keep serving
    assert world.run(e.app_get(DEV, 1)).result == (0, b"\x00")
    assert world.run(e.rotate(DEV)).status == "done"


def test_negative_matrix_towards_the_ksn(world):
    devs = [world.enrolled(a) for a in (DEV, DEV + 1)]
    e = world.engine
    t, sends = e.app_get(DEV, 1)
    answer = bytes(devs[0].receive(sends[0].frame)[0])
    before = sum(e.errors.values())
    for i in range(len(answer)):
        bad = bytearray(answer)
        bad[i] ^= 0xA5
        assert e.handle(bytes(bad)) == []
    assert not t.finished and sum(e.errors.values()) - before == len(answer)
    assert e.errors[ErrorCode.MAC] > 0
    for n in range(len(answer)):
        assert e.handle(answer[:n]) == []
    e.handle(answer)
    assert t.result == (0, b"\x00")
    e.handle(answer)  # replayed
    assert e.errors[ErrorCode.REPLAY] == 1
    assert e.handle(b"\x00" * 3000) == [] and e.errors[ErrorCode.OVERSIZE] == 1
    # a device sending garbage does not disturb another device's update
    assert world.run(e.rotate(DEV + 1)).status == "done" and devs[1].master.gen == 2


def test_ksn_rejects_bad_dh_public_value(world):
    dev = world.enrolled(DEV)
    e = world.engine
    t, sends = e.rotate(DEV)
    resp = dev.receive(sends[0].frame)
    # forge an MKU_RESPONSE with Y_d = 1 under the genuine master key (a compromised device)
    mk = e.peer(DEV).masters[1]
    forged = C.seal(DEV, C.KSN_ADDRESS, C.SecureHeader(C.Service.AUTH_CONF, KeyKind.MASTER, 0, 1), 2,
                    C.MkuResponse(t.txid, 2, bytes(16), (1).to_bytes(256, "big"), bytes(16)).encode(), mk)
    out = e.handle(forged)
    assert t.status == "failed" and t.error.code == ErrorCode.DH and len(out) == 1  # MKU_ABORT
    assert dev.receive(out[0].frame) == [] and dev.pending is None
    assert resp  # the genuine response came too late to matter
    assert world.run(e.rotate(DEV)).status == "done"


def test_subgroup_check_matches_the_exponentiation():
    import secrets

    from tessera.crypto import dh
    from tessera.scpm.ksn import check_dh_public, jacobi

    ys = [secrets.randbelow(dh.P - 3) + 2 for _ in range(60)] + [dh.DH().public_int, 2, 4, 3]
    for y in ys:
        assert (jacobi(y, dh.P) == 1) == (pow(y, dh.Q, dh.P) == 1)
    nonres = next(y for y in ys if pow(y, dh.Q, dh.P) != 1)
    for bad in (0, 1, dh.P - 1, dh.P, dh.P + 1, nonres):
        with pytest.raises(dh.DHError):
            check_dh_public((bad % (1 << 2048)).to_bytes(256, "big"))
    check_dh_public(dh.DH().public)
    with pytest.raises(dh.DHError):
        check_dh_public(bytes(255))


def test_sync_after_abort_reaches_a_device_that_replays_stored_answers(world, monkeypatch):
    """Issue 10: after MKU_ABORT the KSN's next SYNC_REQ takes a fresh TXID, so a device that
    answers a repeated (OP, TXID) from its stored answer (profile 6) does not replay its
    SYNC_RESP from before the abort (whose nonce the KSN no longer accepts)."""
    from tessera.scpm.sim import device_class

    device_class()  # installs tessera.mpshim so that the firmware modules import
    from tessera_fw.scpm import const as FC
    from tessera_fw.scpm import km

    real = km.handle

    def strict(dev, f, op, txid, p, now_ms):  # SYNC_REQ treated like every other request
        if op == FC.OP_SYNC_REQ:
            last = dev._last.get(op)
            if last is not None and last[0] == txid:
                return last[2], last[1]
            ans, key = real(dev, f, op, txid, p, now_ms)
            dev._last[op] = (txid, key, ans)
            return ans, key
        return real(dev, f, op, txid, p, now_ms)

    monkeypatch.setattr(km, "handle", strict)
    dev = world.enrolled(DEV)
    sync_txids = []
    world.fleet.hook = lambda d, a, f: None if d == "dev->ksn" and len(f) > 300 else f  # MKU_RESPONSE lost
    world.fleet.pump(world.engine.rotate(DEV)[1])
    world.fleet.hook = None
    assert dev.pending is not None
    world.restart_ksn()  # died before it stored the pending key: the device's MK' is unknown to it
    t, sends = world.engine.sync(DEV)
    sync_txids.append(t.txid)
    t = world.run((t, sends))
    assert t.status == "done", t.error
    assert t.txid != sync_txids[0]  # the SYNC_REQ after the abort went out under a new TXID
    assert dev.pending is None and dev.master.gen == 1 == world.engine.peer(DEV).master
    assert world.run(world.engine.rotate(DEV)).status == "done" and dev.master.gen == 2


def test_reenrolment_never_reuses_an_snf_under_the_setup_key(world):
    """A device factory-reset (without a reboot) and enrolled again with the same label key:
    the KSN's USER_KEY_INIT must not repeat an SNF under that key (the IV would repeat), and the
    device, which still remembers the numbers it accepted, must accept it at once."""
    dev = world.add(DEV)
    snfs = []

    def hook(d, a, f):
        if d == "ksn->dev" and f[0] == C.HD_SECURE and f[13] == 0:  # SHD byte 2: kind 0 = setup key
            snfs.append(int.from_bytes(f[15:19], "big"))
        return f

    world.fleet.hook = hook
    for _ in range(3):
        dev.factory_reset()
        start = world.clock.t
        t = world.run(world.engine.enrol(DEV, setup_key(DEV)))
        assert t.status == "done" and world.clock.t == start  # no timeout needed
    assert len(snfs) == 3 and len(set(snfs)) == 3, snfs
    world.restart_ksn()  # the counter survives a KSN restart too
    dev.factory_reset()
    assert world.run(world.engine.enrol(DEV, setup_key(DEV))).status == "done"
    assert snfs[-1] > max(snfs[:3]), snfs
