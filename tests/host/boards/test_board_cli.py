"""`tessera board` against virtual boards: the same code path as a real board on a port."""
import json
import os
import re
import signal
import time

import pytest

from tessera import cli
from tessera.boards import build, profile
from tessera.boards.remote import Remote
from tessera.boards.virtual import VirtualBoard
from tessera.paths import boards_dir


def test_virtual_board_runs_micropython_with_board_heap(deployed_boards):
    for name, t in deployed_boards.items():
        out = Remote(t.port).exec("import sys, gc; gc.collect(); print(sys.implementation.name, gc.mem_free() + gc.mem_alloc())")
        impl, heap = out.split()
        assert impl == "micropython"
        # the GC heap total is the profile's heap minus allocator bookkeeping
        assert 0.9 * t.profile.heap_bytes < int(heap) <= t.profile.heap_bytes


def test_cli_deploy_selftest_status(tessera_var, capsys, caplog):
    caplog.set_level("INFO")
    vb = VirtualBoard("esp32", "esp32")
    try:
        assert cli.main(["board", "deploy", "--virtual", "esp32"]) == 0
        msgs = "\n".join(r.getMessage() for r in caplog.records)
        assert re.search(r"\[ *1/\d+\]", msgs) and "lib/tessera_fw/crypto/aes.mpy" in msgs  # "[ 1/16]" from 10 files on
        assert cli.main(["board", "selftest", "--virtual", "esp32"]) == 0
        out = capsys.readouterr().out
        assert "SELFTEST PASS" in out and "ok   aes-cbc" in out
        assert cli.main(["board", "status", "--virtual", "esp32", "--json"]) == 0
        st = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert st["firmware"] == "0.1.0" and "crypto" in st["lib"]
    finally:
        vb.stop()


def test_selftest_failure_is_reported(deployed_boards, tmp_path):
    t = deployed_boards["esp32"]
    r = Remote(t.port)
    r.exec("open('lib/bad_suite.py', 'w').write(\"def boom(): raise ValueError('broken')\\nCHECKS = (('boom', boom),)\\n\")")
    out = r.exec("import tessera_fw.selftest as s; print(s.run(('bad_suite',)))")
    assert "FAIL boom" in out and "SELFTEST FAIL 0/1" in out and out.strip().endswith("False")


def test_deploy_to_missing_port_is_a_clean_error(tessera_var, caplog):
    assert cli.main(["board", "status", "--port", "/dev/does-not-exist"]) == 2
    assert "mpremote on /dev/does-not-exist failed" in caplog.text


def test_deploy_needs_board_with_port(tessera_var, caplog):
    assert cli.main(["board", "deploy", "--port", "/dev/ttyACM9"]) == 2
    assert "--board is required" in caplog.text


def test_unknown_board(tessera_var, caplog):
    assert cli.main(["board", "selftest", "--virtual", "esp8266"]) == 2
    assert "unknown board 'esp8266'" in caplog.text


def test_virtual_board_reboots_when_interpreter_exits(tessera_var):
    vb = VirtualBoard("reboot-test", "rp2040")
    try:
        port = vb.start(fresh=True)
        boots = vb.state()["boots"]
        r = Remote(port)
        r.run("exec", "open('marker.txt', 'w').write('kept')")
        # machine.reset() on hardware; on the unix port the interpreter simply exits
        r.run("exec", "import sys; sys.exit(0)")
        deadline = time.monotonic() + 5
        while vb.state()["boots"] == boots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vb.state()["boots"] == boots + 1
        assert r.exec("print(open('marker.txt').read())").strip() == "kept"  # flash survives
    finally:
        vb.stop()
    assert not vb.is_running()


def test_build_every_arch_within_budget(capsys):
    assert cli.main(["board", "build", "--all"]) == 0
    out = capsys.readouterr().out
    for p in profile.load_all():
        res = build.compile_firmware(p.mpy_arch)
        assert res.total <= p.flash_budget_bytes
        assert f"{p.name}: {len(res.files)} modules" in out
        # .mpy v6 header; no native code yet, so the arch field is 0 (portable bytecode)
        data = (res.out_dir / "tessera_fw" / "crypto" / "aes.mpy").read_bytes()
        assert data[0:1] == b"M" and data[1] == 6 and data[2] >> 2 == 0


def test_build_reports_compile_errors(tmp_path, monkeypatch):
    bad = tmp_path / "firmware" / "tessera_fw"
    bad.mkdir(parents=True)
    (bad / "__init__.py").write_text('VERSION = "0"\n')
    (bad / "broken.py").write_text("def f(:\n")
    monkeypatch.setenv("TESSERA_ROOT", str(tmp_path))
    from tessera.errors import TesseraError

    with pytest.raises(TesseraError, match="broken.py"):
        build.compile_firmware("armv6m", tmp_path / "out")


def test_budget_is_enforced(monkeypatch):
    p = profile.load("rp2040")
    res = build.compile_firmware(p.mpy_arch)
    from dataclasses import replace

    from tessera.errors import TesseraError

    with pytest.raises(TesseraError, match="over the flash budget"):
        build.check_budget(replace(p, flash_budget_bytes=res.total - 1), res)


@pytest.mark.parametrize("name", ["esp32", "rp2040"])
def test_package_json_is_current(name):
    """boards/<name>/package.json (for `mpremote mip install`) lists every firmware module."""
    on_disk = json.loads((boards_dir() / name / "package.json").read_text())
    assert on_disk == build.package_json(), "run `tessera board build` and commit package.json"
    for dest, src in on_disk["urls"]:
        assert (boards_dir() / name / src).resolve().is_file()


def test_mip_install_from_package_json(tessera_var):
    """The board package installs with mpremote's own mip from the local package.json."""
    vb = VirtualBoard("mip-test", "esp32")
    try:
        port = vb.start(fresh=True)
        r = Remote(port)
        r.run("mip", "install", "--no-mpy", str(boards_dir() / "esp32" / "package.json"))
        out = r.exec("import tessera_fw.selftest as s; s.run()")
        assert "SELFTEST PASS" in out
    finally:
        vb.stop()


def test_virtual_board_runs_main_py_at_boot_and_mpremote_interrupts_it(tessera_var):
    """Like hardware: main.py starts at boot; mpremote's Ctrl-C stops it and gets a REPL."""
    vb = VirtualBoard("boot-test", "esp32")
    try:
        port = vb.start(fresh=True)
        r = Remote(port)
        r.exec("open('main.py', 'w').write('import time\\nn = 0\\nwhile True:\\n    n += 1\\n    open(\"alive\", \"w\").write(str(n))\\n    time.sleep(0.05)\\n')")
        boots = vb.state()["boots"]
        r.run("exec", "import sys; sys.exit(0)")  # reboot
        deadline = time.monotonic() + 5
        while vb.state()["boots"] == boots and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = vb.fs / "alive"
        deadline = time.monotonic() + 5
        while not alive.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive.exists(), "main.py did not run at boot"
        assert r.exec("print(6 * 7)").strip() == "42"  # main.py was interrupted, REPL answered
        # a power cut while the REPL holds the console in raw mode (no ISIG): the next boot
        # must get a console on which Ctrl-C is a signal again
        st = vb.state()
        alive.unlink()
        os.kill(st["interp_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not alive.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vb.state()["boots"] == st["boots"] + 1 and alive.exists(), "main.py did not run after the power cut"
        r.timeout = 10
        assert r.exec("print(6 * 7)").strip() == "42"
    finally:
        vb.stop()


def test_repl_on_a_virtual_board_through_a_terminal(deployed_boards, tessera_var):
    """`tessera board repl` attaches the user's terminal to the board's REPL."""
    import os
    import pty
    import select
    import sys

    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a real terminal
        os.execv(sys.executable, [sys.executable, "-m", "tessera", "board", "repl", "--port", deployed_boards["rp2040"].port])
    seen = b""
    try:
        deadline = time.monotonic() + 15
        sent = False
        while time.monotonic() < deadline and b"4242" not in seen:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
            if not sent and b"Connected" in seen:
                time.sleep(0.3)
                os.write(fd, b"\rprint(42 * 101)\r")
                sent = True
        assert b"4242" in seen, seen[-300:]
        os.write(fd, b"\x1d")  # Ctrl-] leaves mpremote's terminal
        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("repl did not exit on Ctrl-]")
    finally:
        os.close(fd)
