"""tessera.api.boards.Board against virtual boards: the deploy shares the command's checks
(the UDP port guard), board speed and the bridge's status are values, and `tessera board`
is a layer over Board (its output is Board's values)."""
from __future__ import annotations

import json
import os
import socket

import pytest

from tessera import Board, BoardError, BoardStatus, BridgeStatus, SelftestReport
from tessera import cli


def _scpm(b: Board, port: int) -> None:
    b.files.mkdir(parents=True, exist_ok=True)
    (b.files / "scpm.json").write_text(json.dumps(
        {"address": "0a000e21", "setup_key": "00" * 16, "port": port, "bind": "127.0.0.1"}))


def test_deploy_refuses_a_udp_port_another_process_holds(tessera_var):
    """Board.deploy runs the same guard as `tessera board deploy` (docs/boards.md, one board
    per port): before, it copied the firmware onto a board whose port another socket held."""
    b = Board.virtual("api-guard", "esp32").start(fresh=True)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the firmware binds it
            s.bind(("127.0.0.1", 0))
            taken = s.getsockname()[1]
            _scpm(b, taken)
            copied: list[str] = []
            with pytest.raises(BoardError, match=rf"UDP port {taken} on 127.0.0.1 is already held by pid {os.getpid()} "):
                b.deploy(progress=lambda i, n, path, size: copied.append(path))
        assert copied == [] and not (b.files / "lib" / "tessera_fw").exists()  # refused before any copy
    finally:
        b.stop()


@pytest.mark.slow
def test_speed_bridge_status_and_power_cut(tessera_var, capsys):
    b = Board.virtual("api-speed", "rp2040").start(fresh=True, speed="board")
    try:
        br = b.bridge()
        assert isinstance(br, BridgeStatus)
        assert br.speed == "board" and br.slowdown > 1 and br.boots == 1 and br.console_dropped == 0
        assert br.pty == b.port and br.fs == b.files and br.udp_port is None
        fast = b.set_speed("fast")
        assert fast.speed == "fast" and fast.slowdown is None and b.bridge() == fast
        b.start(speed="board")  # a running board: start(speed=...) switches it
        assert b.bridge().speed == "board" and b.bridge().slowdown == br.slowdown  # calibrated once per bridge
        with pytest.raises(BoardError, match="unknown speed 'warp'"):
            b.set_speed("warp")  # type: ignore[arg-type]
        # the command's power cut, booting again at the speed it asks for
        assert cli.main(["board", "virtual", "power-cut", "rp2040", "--name", "api-speed", "--speed", "fast"]) == 0
        assert capsys.readouterr().out.strip().endswith("booted again (boot 2, fast)")
        assert b.bridge().boots == 2 and b.bridge().speed == "fast"
        res = b.deploy()
        st = b.status()
        assert st.firmware == res.firmware and st.bridge == b.bridge() and st.bridge.boots == 2
        assert {k: st.raw[k] for k in ("speed", "boots", "console_dropped", "udp_port")} == {
            "speed": "fast", "boots": 2, "console_dropped": 0, "udp_port": None}
    finally:
        b.stop()
    assert not b.is_running()
    with pytest.raises(BoardError, match="not running"):
        b.bridge()


def test_real_board_has_no_bridge():
    b = Board.serial("/dev/does-not-exist", "rp2040")
    assert b.bridge() is None
    with pytest.raises(BoardError, match="real board"):
        b.set_speed("board")


def test_cli_status_and_selftest_are_boards_values(tessera_var, monkeypatch, capsys):
    """`tessera board status` / `selftest` print what Board returns, and selftest's exit
    status is the report's verdict: the command has no board logic of its own."""
    raw = {"firmware": "9.9.9", "platform": "linux", "micropython": "1.0.0", "mem_free": 1, "mem_alloc": 2}
    monkeypatch.setattr(Board, "status", lambda self: BoardStatus("9.9.9", "1.0.0", "linux", 1, 2, raw))

    def selftest(self, on_line=None):
        for ln in ("FAIL boom", "SELFTEST FAIL 0/1"):
            on_line(ln)
        return SelftestReport(False, "SELFTEST FAIL 0/1", ["FAIL boom", "SELFTEST FAIL 0/1"])

    monkeypatch.setattr(Board, "selftest", selftest)
    assert cli.main(["board", "status", "--port", "/dev/does-not-exist", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == raw
    assert cli.main(["board", "selftest", "--port", "/dev/does-not-exist"]) == 1
    assert capsys.readouterr().out == "FAIL boom\nSELFTEST FAIL 0/1\n"
