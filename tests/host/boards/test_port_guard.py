"""One virtual board per UDP port and per directory (issue 9 #6, docs/boards.md).

The firmware binds its port with SO_REUSEADDR, so Linux lets a second board bind the same
127.0.0.1 port and hands every datagram to the socket bound last: the first board silently
stops hearing its KSN. Two bridges on one board directory (two starts of one board at the
same moment) also share its key-store files. Both must be refused."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tessera import cli
from tessera.boards import ops, profile
from tessera.boards.virtual import VirtualBoard, free_udp_port
from tessera.errors import TesseraError

pytestmark = pytest.mark.slow


def _scpm(vb: VirtualBoard, port: int) -> None:
    vb.fs.mkdir(parents=True, exist_ok=True)
    (vb.fs / "scpm.json").write_text(json.dumps(
        {"address": "0a000e01", "setup_key": "00" * 16, "port": port, "bind": "127.0.0.1"}))


def test_last_bound_socket_takes_every_datagram():
    """The kernel behaviour the guard exists for (evidence for docs/boards.md)."""
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(0.3)
        socks.append(s)
    try:
        socks[0].bind(("127.0.0.1", 0))
        port = socks[0].getsockname()[1]
        socks[1].bind(("127.0.0.1", port))  # accepted: both set SO_REUSEADDR
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(50):
                tx.sendto(b"%d" % i, ("127.0.0.1", port))
        got = []
        for s in socks:
            n = 0
            try:
                while True:
                    s.recv(64)
                    n += 1
            except socket.timeout:
                pass
            got.append(n)
        assert got == [0, 50]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, pytest.raises(OSError):
            probe.bind(("127.0.0.1", port))  # the guard's probe: no SO_REUSEADDR
    finally:
        for s in socks:
            s.close()


def test_a_board_refuses_a_port_another_board_or_process_holds(tessera_var, caplog):
    a, b = VirtualBoard("guard-a", "esp32"), VirtualBoard("guard-b", "esp32")
    port = free_udp_port()
    try:
        _scpm(a, port)
        a.start()
        assert a.state()["udp_port"] == port
        # another board with the same port in its scpm.json: refused, naming the holder
        _scpm(b, port)
        assert cli.main(["board", "virtual", "start", "esp32", "--name", "guard-b"]) == 2
        assert f"UDP port {port} is already held by virtual board 'guard-a'" in caplog.text
        assert not b.is_running()
        # a process that is no board (this test, with SO_REUSEADDR as the firmware does)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            other = s.getsockname()[1]
            _scpm(b, other)
            with pytest.raises(TesseraError, match=rf"UDP port {other} on 127.0.0.1 is already held by pid {os.getpid()} "):
                b.start()
        # a running board whose scpm.json is changed to a taken port: refused at reboot and at deploy
        _scpm(b, free_udp_port())
        b.start()
        _scpm(b, port)
        with pytest.raises(TesseraError, match="already held by virtual board 'guard-a'"):
            ops.deploy(ops.Target(profile.load("esp32"), b.port, True, b))
        with pytest.raises(TesseraError, match="refused to boot: UDP port .* virtual board 'guard-a'"):
            b.power_cut()
        assert not b.is_running() and "guard-a" in b.halted()
    finally:
        a.stop()
        b.stop()


def _bridges(board_dir) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "tessera.boards.virtual" in cmd and f"{board_dir}\0" in cmd:
            out.append(int(d))
    return out


def test_one_bridge_per_board_even_when_started_twice_at_once(tessera_var):
    vb = VirtualBoard("twice", "rp2040")
    code = "from tessera.boards.virtual import VirtualBoard; print(VirtualBoard('twice', 'rp2040').start())"
    try:
        starts = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
        ptys = {p.communicate(timeout=60)[0].strip() for p in starts}
        assert ptys == {vb.port}
        time.sleep(0.5)  # a second bridge, if any, would be up by now
        assert len(_bridges(vb.dir)) == 1
        # a bridge killed outright takes its interpreter with it: nothing keeps the directory
        st = vb.state()
        os.kill(st["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{st['interp_pid']}/cwd"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{st['interp_pid']}/cwd")
        assert vb.start() != ""  # and the board starts again
        assert vb.state()["pid"] != st["pid"]
    finally:
        vb.stop()
