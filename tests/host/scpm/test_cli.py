"""`tessera ksn` on loopback UDP against firmware device engines (mpshim) behind real sockets,
in-process commands and a `tessera ksn serve` subprocess reached through its control socket."""
import json
import os
import re
import signal
import socket
import sys
import time

import pytest

from tessera.cli import main
from tessera.scpm import codec as C

from .udpdev import UdpDevice, start_serve

SETUP = "00112233445566778899aabbccddeeff"


@pytest.fixture
def dev():
    d = UdpDevice(0x0A000002, bytes.fromhex(SETUP))
    yield d
    d.close()


def ksn(db, *argv):
    return main(["ksn", *argv, "--db", str(db), "--port", "0", "--timeout", "0.3"])


def test_cli_in_process(tmp_path, dev, capsys):
    db = tmp_path / "k.sqlite"
    assert ksn(db, "enrol", "0x0A000002", "--setup-key", SETUP, "--device", f"127.0.0.1:{dev.port}", "--name", "meter") == 0
    assert ksn(db, "sp-key", "--all", "--index", "2") == 0
    assert ksn(db, "maker-key", "10.0.0.2") == 0
    assert ksn(db, "rotate", "--all") == 0
    assert ksn(db, "app", "get", "0x0A000002", "3") == 0
    assert ksn(db, "app", "set", "0x0A000002", "2", "--hex", "0102") == 2  # user key: no authority
    assert ksn(db, "app", "set", "0x0A000002", "2", "--hex", "0102", "--key-kind", "sp", "--index", "2") == 0
    assert ksn(db, "app", "set", "0x0A000002", "3", "2.0", "--key-kind", "maker", "--service", "1") == 0
    assert ksn(db, "rotate", "--all", "--every", "0.01", "--count", "2") == 0
    assert ksn(db, "sync", "--all") == 0
    out = capsys.readouterr().out
    assert "enrolled: master key generation 1" in out and "[1/1] 0x0A000002 master key generation 1 -> 2" in out
    assert "property 3 = 302e312e30 ('0.1.0')" in out and "generation 3 -> 4" in out and "in sync at generation 4" in out
    assert dev.dev.get_prop("tariff") == b"\x01\x02" and dev.dev.get_prop("firmware") == b"2.0"
    assert main(["ksn", "list", "--db", str(db), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["master_gen"] == 4 == dev.dev.master.gen and rows[0]["held"] == {"1/0": 1, "2/2": 1, "3/0": 1}
    assert main(["ksn", "list", "--db", str(db)]) == 0
    assert "user g1, sp[2] g1, maker g1" in capsys.readouterr().out


def test_cli_errors_are_clean(tmp_path, capsys, caplog):
    db = tmp_path / "sub" / "k.sqlite"
    # only serve and enrol create a database: a mistyped --db is an error, not a new KSN
    for cmd in (["rotate", "0x0A000009"], ["sync", "--all"], ["app", "get", "0x0A000009", "1"]):
        assert ksn(db, *cmd) == 2, cmd
    assert main(["ksn", "list", "--db", str(db)]) == 2
    assert "no KSN database at" in caplog.text and not db.parent.exists()
    assert ksn(db, "enrol", "0x0", "--setup-key", SETUP, "--device", "127.0.0.1:9") == 2
    assert ksn(db, "enrol", "0x5", "--setup-key", "abc", "--device", "127.0.0.1:9") == 2
    assert ksn(db, "enrol", "0x5", "--setup-key", SETUP, "--device", "nowhere") == 2
    # a device that never answers: the enrolment times out with a clear message (short timers:
    # the defaults, sized for a Pico W, wait ~9 s; the timing itself is tested in test_ksn/boardspeed)
    assert ksn(db, "enrol", "0x5", "--setup-key", SETUP, "--device", "127.0.0.1:9", "--timeout", "0.2",
               "--retries", "2") == 2
    assert ksn(db, "rotate", "0x0A000009") == 2
    assert "unknown device" in caplog.text and "out of range" in caplog.text and "no answer" in caplog.text
    with pytest.raises(SystemExit):
        main(["ksn", "--help"])
    assert "rotate" in capsys.readouterr().out


def test_sync_failure_exits_2(tmp_path, dev, caplog):
    """Issue 10: `tessera ksn sync` exits 2 when a device cannot be synchronised (docs/scpm.md)."""
    db = tmp_path / "k.sqlite"
    assert ksn(db, "enrol", "0x0A000002", "--setup-key", SETUP, "--device", f"127.0.0.1:{dev.port}") == 0
    assert ksn(db, "sync", "--all") == 0
    dev.close()  # the device is gone: nothing answers SYNC_REQ
    assert ksn(db, "sync", "--all", "--retries", "1") == 2
    assert "1 of 1 key synchronisations failed" in caplog.text


def test_serve_keeps_serving_and_takes_commands(tmp_path, dev, capsys):
    db = tmp_path / "k.sqlite"
    logf = tmp_path / "serve.log"
    proc, port = start_serve(db, logf, "--timeout", "0.3")
    try:
        # garbage from a stranger does not stop the service
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for payload in (b"", b"\x11" * 5, b"\x10" + bytes(10), os.urandom(1200), b"\x11" + bytes(2000)):
            junk.sendto(payload, ("127.0.0.1", port))
        junk.close()
        assert ksn(db, "enrol", "0x0A000002", "--setup-key", SETUP, "--device", f"127.0.0.1:{dev.port}") == 0
        assert ksn(db, "rotate", "0x0A000002") == 0
        assert "generation 1 -> 2" in capsys.readouterr().out
        # a second engine on the same database is refused while serve owns it
        from tessera.scpm.server import open_engine
        from tessera.errors import TesseraError
        with pytest.raises(TesseraError, match="another KSN process"):
            open_engine(db)
        # device-requested update through the serving KSN's UDP port
        with dev.lock:
            frames = dev.dev.request_update(1, 0)
        for f in frames:
            dev.sock.sendto(bytes(f), ("127.0.0.1", port))
        deadline = time.monotonic() + 10
        while dev.dev.master.gen != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dev.dev.master.gen == 3
        assert ksn(db, "sync", "0x0A000002") == 0
        assert "in sync at generation 3" in capsys.readouterr().out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    out = logf.read_text()
    assert proc.returncode == 0, out
    assert re.search(r"dropped [5-9] frame\(s\) that failed the checks in the last \d+ s \(ERR_", out), out
    assert "Traceback" not in out


def test_serve_rotates_on_a_schedule_and_recovers_at_start(tmp_path, dev):
    import asyncio

    from tessera.scpm.ksn import KsnEngine, Timing
    from tessera.scpm.server import serve
    from tessera.scpm.store import Store

    db = tmp_path / "k.sqlite"
    assert ksn(db, "enrol", "0x0A000002", "--setup-key", SETUP, "--device", f"127.0.0.1:{dev.port}") == 0
    # leave an update half done: MKU_START sent, the KSN gone before the answer arrived,
    # and a pending key in the store as if the KSN died after persisting it
    eng = KsnEngine(Store(db))
    t, sends = eng.rotate(0x0A000002)
    with dev.lock:
        dev.dev.receive(sends[0].frame, 0)  # device now PENDING; its answer is lost
    eng.store.put_device_key(0x0A000002, 4, 0, 2, "pending", bytes(32), t.txid)  # a key the device never agreed
    eng.store.close()
    assert dev.dev.pending is not None

    async def go():
        stop = asyncio.Event()
        box = {}
        task = asyncio.create_task(serve(db, "127.0.0.1", 0, every=0.4, stop=stop, timing=Timing.configured(0.3),
                                         ready=lambda s: box.setdefault("srv", s)))
        deadline = asyncio.get_running_loop().time() + 20
        while dev.dev.master.gen < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)
        return box["srv"]

    srv = asyncio.run(go())
    # start-up SYNC aborted the foreign pending update (6.4 case 3), then the schedule rotated
    assert dev.dev.pending is None and dev.dev.master.gen >= 3
    assert srv.engine.peer(0x0A000002).master == dev.dev.master.gen


def test_keys_come_from_a_file_the_environment_or_a_prompt(tmp_path, dev, caplog, monkeypatch):
    """Issue 11 #13: keys stay out of argv; the old flags still work but warn."""
    import getpass

    db = tmp_path / "k.sqlite"
    keyf = tmp_path / "label.txt"
    keyf.write_text(SETUP + "\n")
    os.chmod(keyf, 0o600)
    where = ["--device", f"127.0.0.1:{dev.port}"]

    def enrol(*how):
        dev.dev.factory_reset()
        caplog.clear()
        return ksn(db, "enrol", "0x0A000002", *how, *where)

    monkeypatch.delenv("TESSERA_KSN_SETUP_KEY", raising=False)
    assert enrol("--setup-key-file", str(keyf)) == 0 and "warning" not in caplog.text
    monkeypatch.setenv("MY_LABEL_KEY", SETUP)
    assert enrol("--setup-key-env", "MY_LABEL_KEY") == 0 and "warning" not in caplog.text
    monkeypatch.setenv("TESSERA_KSN_SETUP_KEY", SETUP)
    assert enrol() == 0  # the default variable
    monkeypatch.delenv("TESSERA_KSN_SETUP_KEY")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    asked = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt: asked.append(prompt) or SETUP)
    assert enrol() == 0 and asked and "setup key" in asked[0]
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert enrol() == 2 and "--setup-key-file" in caplog.text  # nothing to read it from: clear error
    assert enrol("--setup-key", SETUP) == 0  # deprecated, still works, with a warning
    assert "puts the key on the command line" in caplog.text
    assert enrol("--setup-key", SETUP, "--setup-key-env", "MY_LABEL_KEY") == 2  # one way only
    # provisioning keys the same way
    spf = tmp_path / "sp.key"
    spf.write_text("aa" * 16)
    os.chmod(spf, 0o600)
    dev.dev.factory_reset()
    assert ksn(db, "enrol", "0x0A000002", "--setup-key-file", str(keyf), *where) == 0
    caplog.clear()
    assert ksn(db, "sp-key", "--all", "--index", "4", "--key-file", str(spf)) == 0 and "warning" not in caplog.text
    assert dev.dev.keys[2 * 16 + 4].key == bytes.fromhex("aa" * 16)
    assert ksn(db, "maker-key", "--all", "--key-env", "NOT_SET_ANYWHERE") == 2
    assert "NOT_SET_ANYWHERE" in caplog.text and "is not set" in caplog.text
    monkeypatch.setenv("MAKER_KEY", "bb" * 16)
    assert ksn(db, "maker-key", "--all", "--key-env", "MAKER_KEY") == 0
    assert dev.dev.keys[3 * 16].key == bytes.fromhex("bb" * 16)
    assert ksn(db, "user-key", "--all", "--key", "cc" * 16) == 0 and "puts the key on the command line" in caplog.text


def test_bad_key_values_are_one_line_errors(tmp_path, dev, caplog):
    db = tmp_path / "k.sqlite"
    assert ksn(db, "enrol", "0x0A000002", "--setup-key", SETUP, "--device", f"127.0.0.1:{dev.port}") == 0
    for bad in ("zz" * 16, "ab" * 15, "not hex at all"):
        caplog.clear()
        assert ksn(db, "sp-key", "--all", "--key", bad) == 2  # was a ValueError traceback, exit 1
        assert "must be 32 hex digits" in caplog.text and bad not in caplog.text.replace("--key", "")
