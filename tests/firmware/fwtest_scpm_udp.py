# The UDP adapter on the unix port over 127.0.0.1: one frame per datagram, answers go back
# to the sender, device-initiated frames to the KSN's learned address; config from scpm.json.
import gc

from tessera_fw.scpm import udp  # noqa: I001 - compile the big modules first
from tessera_fw.scpm.device import Device

gc.collect()
import socket  # noqa: E402
import time  # noqa: E402

from fwtest_scpm_util import DEV, SETUP, MiniKSN, enrol  # noqa: E402
from tessera_fw.scpm import const as C  # noqa: E402


def _bind(dev):
    import os

    base = 30000 + (int.from_bytes(os.urandom(2), "big") % 20000)
    for i in range(20):
        try:
            return udp.UDPDevice(dev, "127.0.0.1", base + i)
        except OSError:
            pass
    raise AssertionError("no free UDP port")


def _exchange(u, client, frame):
    client.sendto(frame, socket.getaddrinfo("127.0.0.1", u.port)[0][-1])
    for _ in range(200):
        u.poll()
        try:
            return client.recvfrom(1200)[0]
        except OSError:
            time.sleep_ms(2) if hasattr(time, "sleep_ms") else time.sleep(0.002)
    return None


def _recv(client, tries=100):
    for _ in range(tries):
        try:
            return client.recvfrom(1200)[0]
        except OSError:
            time.sleep(0.002)
    return None


def test_udp_round_trip_enrol_and_request():
    d = Device(DEV, SETUP)
    u = _bind(d)
    client = _client()
    try:
        class Link:
            addr = DEV

            def receive(self, f, now=0):
                r = _exchange(u, client, f)
                return [] if r is None else [r]

        ksn = enrol(Link(), MiniKSN())  # the whole enrolment over UDP
        assert d.enrolled and u.rx == 2 and u.tx == 2
        m = ksn.keys[(4, 0, 1)]
        p, _ = ksn.open(_exchange(u, client, ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16)))))
        assert p[0] == C.OP_SYNC_RESP
        assert u.ksn_addr is not None  # learned from an authenticated KSN frame
        # a device-initiated MKU_REQUEST retry goes to the learned KSN address
        u.request_update(1)
        got = _recv(client)
        assert got is not None and ksn.open(got)[0][0] == C.OP_MKU_REQUEST
        d._req[2] = 0  # the retry is due now
        u.poll()
        got = _recv(client)
        assert got is not None and ksn.open(got)[0][0] == C.OP_MKU_REQUEST
        # garbage is counted and not answered; the adapter keeps serving
        assert _exchange(u, client, b"\x00garbage") is None
        assert d.errors.get(C.ERR_TRUNCATED) == 1
        assert _exchange(u, client, ksn.frame(m, ksn.km(C.OP_SYNC_REQ, bytes(16)))) is not None
    finally:
        client.close()
        u.close()


def test_config_file():
    import os

    path = "/tmp/fwtest_scpm_cfg.json"
    with open(path, "w") as f:
        f.write('{"address": "0a000002", "setup_key": "40", "port": 24767}')  # short key
    try:
        raised = False
        try:
            udp.load_config(path)
        except (ValueError, KeyError, TypeError):
            raised = True
        assert raised
        with open(path, "w") as f:
            f.write('{"address": "0a000002", "setup_key": "404142434445464748494a4b4c4d4e4f"}')
        cfg = udp.load_config(path)
        assert cfg["address"] == DEV and cfg["setup_key"] == SETUP
        assert udp.load_config("/tmp/does-not-exist.json") is None
    finally:
        os.remove(path)


def test_config_errors_name_the_problem():
    import os

    path = "/tmp/fwtest_scpm_cfg2.json"
    cases = (("not json", "JSON"), ("[1]", "object"), ('{"setup_key": "404142434445464748494a4b4c4d4e4f"}', "address"),
             ('{"address": "zz", "setup_key": "404142434445464748494a4b4c4d4e4f"}', "address"),
             ('{"address": "0a000002"}', "setup_key"), ('{"address": "0a000002", "setup_key": "4g"}', "setup_key"),
             ('{"address": 0, "setup_key": "404142434445464748494a4b4c4d4e4f"}', "non-zero"))
    try:
        for text, word in cases:
            with open(path, "w") as f:
                f.write(text)
            try:
                udp.load_config(path)
            except ValueError as e:
                assert word in str(e) and path in str(e), (text, str(e))
                assert "4041424344" not in str(e)
            else:
                raise AssertionError("accepted: " + text)
    finally:
        os.remove(path)


def _client():
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(socket.getaddrinfo("127.0.0.1", 0)[0][-1])
    c.setblocking(False)
    return c


def _hello_through_the_loop(u, idle_ms):
    """Run u.run() in asyncio, let it idle for idle_ms, send ENROL_HELLO from a client and
    wait up to 1.5 s for the answer. Returns (answer or None, wake-ups while idle)."""
    import asyncio

    client = _client()
    ksn = MiniKSN()
    got = []

    async def scenario():
        task = asyncio.create_task(u.run())
        await asyncio.sleep_ms(idle_ms)
        idle = u.wakeups
        client.sendto(ksn.frame(None, ksn.km(C.OP_ENROL_HELLO)), socket.getaddrinfo("127.0.0.1", u.port)[0][-1])
        t0 = time.ticks_ms()
        while time.ticks_diff(time.ticks_ms(), t0) < 1500 and not got:
            try:
                got.append(client.recvfrom(1200)[0])
            except OSError:
                await asyncio.sleep_ms(1)
        u.running = False
        await task
        return idle

    try:
        idle = asyncio.run(scenario())
    finally:
        client.close()
        u.close()
    if got:
        assert ksn.open(got[0])[0][0] == C.OP_ENROL_CHALLENGE
    return (got[0] if got else None), idle


def test_run_waits_on_the_socket_and_answers():
    # the asyncio loop: an idle device sleeps in asyncio's I/O queue (a few wake-ups for
    # the timers), and a datagram that arrives is answered without waiting for a tick
    gc.collect()
    u = _bind(Device(DEV, SETUP))
    answer, idle = _hello_through_the_loop(u, 350)
    assert answer is not None
    assert 1 <= idle <= 8, idle  # 350 ms idle: about 4 wake-ups, not 70 polls
    assert u.rx == 1 and u.tx == 1


def test_loop_interrupted_from_the_scheduler_then_restarted():
    # Ctrl-C on a board lands in asyncio's scheduler while run() is parked in the I/O
    # queue. close() must take the socket (and with it the parked task, the adapter and
    # its device) out of asyncio's I/O queue, and a new adapter on the same port in a new
    # loop must serve.
    import asyncio

    gc.collect()
    q = asyncio.core._io_queue
    real = q.wait_io_event
    state = {"n": 0}

    def interrupting(dt):
        state["n"] += 1
        if state["n"] == 3:
            raise KeyboardInterrupt
        return real(dt)

    u = _bind(Device(DEV, SETUP))
    port = u.port
    q.wait_io_event = interrupting
    try:
        asyncio.run(u.run())
        raise AssertionError("the loop was not interrupted")
    except KeyboardInterrupt:
        pass
    finally:
        q.wait_io_event = real
        u.close()
    assert state["n"] == 3
    assert not q.map, "the interrupted adapter is still held by asyncio's I/O queue"
    u = None
    asyncio.new_event_loop()
    answer, _ = _hello_through_the_loop(udp.UDPDevice(Device(DEV, SETUP), "127.0.0.1", port), 20)
    assert answer is not None
