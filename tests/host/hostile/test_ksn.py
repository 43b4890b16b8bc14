"""Hostile input against a running `tessera ksn serve` (issue 11, docs/security.md "SCPM KSN"):
a flood of UDP junk and forged frames from another process while a genuine device is
enrolled, queried and re-keyed through the server. Loopback only, bounded in count and time.

Checks: the server neither crashes nor hangs, the genuine flow succeeds throughout (p99
latency reported), memory stays bounded, and its log gets a periodic summary, not a line
per datagram (issue 11 #10: 265k INFO lines from one flood before)."""
import os
import random
import re
import signal
import socket
import sys
import threading
import time

import pytest

from tessera.cli import main
from tessera.scpm import codec as C

from ..scpm.udpdev import UdpDevice, start_serve

SETUP = "00112233445566778899aabbccddeeff"
DEV = 0x0A000002
FLOOD = 20_000  # datagrams thrown
FLOOD_MAX_S = 30.0  # the flooder stops after this whatever it sent
SETUP_ENV = {"TESSERA_KSN_SETUP_KEY": SETUP}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def junk(rnd: random.Random, replays: list[bytes]) -> bytes:
    """One hostile datagram: every kind the KSN must drop without answering."""
    k = rnd.randrange(8)
    if k == 0:
        return rnd.randbytes(rnd.randrange(0, 1400))
    if k == 1:  # secure frame claiming the genuine device, random SHD/SNF/MAC (ERR_MAC, ERR_NO_KEY, ...)
        body = rnd.randbytes(rnd.randrange(8, 200))
        return bytes([C.HD_SECURE]) + DEV.to_bytes(4, "big") + C.KSN_ADDRESS.to_bytes(4, "big") + len(body).to_bytes(2, "big") + body
    if k == 2:  # well-formed master-key header from the device, forged MAC
        shd = C.SecureHeader(C.Service.AUTH_CONF, C.KeyKind.MASTER, 0, rnd.choice((1, 2, 3)))
        return C.seal(DEV, C.KSN_ADDRESS, shd, rnd.randrange(1, 1 << 31), rnd.randbytes(40), C.UsageKey(rnd.randbytes(16)))
    if k == 3:  # from a thousand made-up devices
        sa = rnd.randrange(1, 1 << 32)
        shd = C.SecureHeader(C.Service.AUTH, C.KeyKind.USER, 0, 1)
        return C.seal(sa, C.KSN_ADDRESS, shd, rnd.randrange(1, 1 << 31), rnd.randbytes(20), C.UsageKey(bytes(16)))
    if k == 4:  # plain ENROL_CHALLENGE / KM_ERROR guesses (no enrolment running)
        pdu = C.EnrolChallenge(rnd.randrange(1, 65536), rnd.randbytes(16)) if rnd.random() < 0.5 else \
            C.KmError(rnd.randrange(1, 65536), 17, 1)
        return C.encode_plain(DEV, C.KSN_ADDRESS, pdu.encode())
    if k == 5 and replays:  # replayed genuine frames of the device
        return rnd.choice(replays)
    if k == 6:  # oversize / lying BC
        return bytes([C.HD_SECURE]) + DEV.to_bytes(4, "big") + C.KSN_ADDRESS.to_bytes(4, "big") + (2000).to_bytes(2, "big") + bytes(rnd.randrange(0, 2100))
    return rnd.randbytes(rnd.randrange(11, 40))  # short garbage


def flooder(port: int, n: int, replays: list[bytes], seed: int) -> tuple[int, int]:
    """Child process: throw `n` datagrams (or stop at FLOOD_MAX_S); returns via its exit."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            rnd = random.Random(seed)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sent, t_end = 0, time.monotonic() + FLOOD_MAX_S
            for i in range(n):
                try:
                    s.sendto(junk(rnd, replays), ("127.0.0.1", port))
                    sent += 1
                except OSError:
                    pass
                if i % 200 == 199:
                    time.sleep(0.05)  # bursts of 200: about 4,000 datagrams/s for 5 s
                    if time.monotonic() > t_end:
                        break
            os.write(w, str(sent).encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def ksn(db, *argv):
    return main(["ksn", *argv, "--db", str(db), "--port", "0", "--timeout", "0.5"])


@pytest.mark.slow
def test_ksn_flood_while_a_genuine_device_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_KSN_SETUP_KEY", SETUP)
    db = tmp_path / "k.sqlite"
    dev = UdpDevice(DEV, bytes.fromhex(SETUP))
    logf = tmp_path / "serve.log"
    proc, port = start_serve(db, logf)
    try:
        assert ksn(db, "enrol", "0x0A000002", "--setup-key-env", "TESSERA_KSN_SETUP_KEY",
                   "--device", f"127.0.0.1:{dev.port}") == 0
        assert ksn(db, "sp-key", "--all", "--index", "1") == 0
        assert ksn(db, "app", "get", "0x0A000002", "3") == 0
        replays = list(dev.sent)
        lines_before = len(logf.read_text().splitlines())
        rss_before = rss_kb(proc.pid)

        pid, r = flooder(port, FLOOD, replays, seed=24767)
        rot: dict = {}

        def rotate() -> None:  # a master-key update while the flood runs, next to the queries
            t0 = time.monotonic()
            rot["rc"] = ksn(db, "rotate", "0x0A000002")
            rot["s"] = time.monotonic() - t0

        rotator = threading.Thread(target=rotate)
        lat, ok, tries = [], 0, 0
        t_flood = time.monotonic()
        rotator.start()
        reaped = False
        while tries < 200 and time.monotonic() - t_flood < FLOOD_MAX_S:  # only while the flood lasts
            reaped = os.waitpid(pid, os.WNOHANG)[0] != 0
            if reaped:
                break
            tries += 1
            t0 = time.monotonic()
            ok += ksn(db, "app", "get", "0x0A000002", "1") == 0
            lat.append(time.monotonic() - t0)
        if not reaped:
            os.waitpid(pid, 0)
        rotator.join(120)
        with os.fdopen(r) as f:
            sent = int(f.read() or 0)
        time.sleep(0.5)  # let the server drain its socket
        assert proc.poll() is None, "the KSN died under the flood"
        assert ksn(db, "app", "get", "0x0A000002", "2") == 0  # still serving after it
        rss_after = rss_kb(proc.pid)
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        dev.close()
    out = logf.read_text()
    flood_lines = out.splitlines()[lines_before:]
    dropped = sum(int(x) for x in re.findall(r"dropped (\d+) frame\(s\)", out))
    report = (f"thrown {sent}, dropped and counted by the KSN {dropped}, good requests {ok}/{tries} "
              f"(p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms), rotate {rot.get('s', -1):.2f} s, "
              f"RSS {rss_before} -> {rss_after} kB, log lines during the flood {len(flood_lines)}")
    print(report)
    with capsys.disabled():
        sys.stderr.write(f"\n[hostile ksn] {report}\n")
    assert sent >= FLOOD // 2
    assert ok == tries and tries >= 5  # every genuine request succeeded during the flood
    assert rot.get("rc") == 0 and dev.dev.master.gen == 2  # and the update
    assert 0 < dropped <= sent  # counted (the kernel may drop some before the KSN reads them)
    assert len(flood_lines) < 60, flood_lines[:20]  # a summary, not a line per datagram
    assert "Traceback" not in out
    assert rss_after - rss_before < 50_000  # kB: no per-datagram state
    assert proc.returncode == 0
