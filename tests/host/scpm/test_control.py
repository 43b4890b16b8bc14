"""The KSN control socket (issue 11 #7, #9, #10): a private directory, peer credentials checked
on both ends (another uid neither serves nor gets served), a read deadline, a cap on
connections, and clean one-line answers to malformed requests."""
import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from tessera.cli import main
from tessera.errors import TesseraError
from tessera.scpm import control
from tessera.scpm.control import ControlServer, control_path

NOBODY = 65534
SETUP = "00112233445566778899aabbccddeeff"
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid (setuid)")


@pytest.fixture
def shared_tmp(monkeypatch):
    """A world-writable sticky directory standing in for /tmp (reachable by uid nobody)."""
    d = tempfile.mkdtemp(prefix="tessera-fake-tmp-")
    os.chmod(d, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", d)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fork_as(uid, fn):
    """Run fn() in a child process as `uid`; returns (pid, read end of a pipe fn's result goes to)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(r)
            out = fn(uid)
            os.write(w, out)
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            os.write(w, f"child error {type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def collect(pid, r):
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read()


def listener(path, bind_first=False, accept_for=4.0):
    """A rogue listener at `path` as another uid: reports every byte a client sends it."""

    def run(uid):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if bind_first:  # bound by root in root's directory, then served as `uid`
            s.bind(str(path))
            os.setgid(uid)
            os.setuid(uid)
        else:
            os.setgid(uid)
            os.setuid(uid)
            try:
                os.makedirs(path.parent, mode=0o700, exist_ok=True)
                s.bind(str(path))
            except OSError as e:
                return f"could not listen: {e.strerror}".encode()
        s.listen(4)
        s.settimeout(accept_for)
        got = b""
        try:
            c, _ = s.accept()
            c.settimeout(2)
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (TimeoutError, socket.timeout, OSError):
            pass
        return b"received:" + got

    return run


def test_socket_in_a_private_directory(tmp_path, shared_tmp):
    db = tmp_path / "k.sqlite"
    p = control_path(db)
    assert p.parent == tmp_path / f".k.sqlite.ctl-{os.getuid()}"
    long_db = tmp_path / ("d" * 120) / "k.sqlite"
    lp = control_path(long_db)
    assert lp.parent == Path(shared_tmp) / f"tessera-{os.getuid()}"
    assert len(str(lp)) < 100

    async def go():
        for path in (p, lp):
            srv = ControlServer(lambda op, a, pr: asyncio.sleep(0, {"op": op}), path)
            await srv.start()
            st = os.lstat(path.parent)
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert await control.request(await control.connect(path), "list", {}, print) == {"op": "list"}
            await srv.stop()
            assert not path.exists()

    asyncio.run(go())


@as_root
def test_cli_sends_nothing_to_a_listener_of_another_uid(tmp_path, shared_tmp, caplog):
    """The attack of issue 11 #7: the database path is long, so the control socket is not next
    to it; uid nobody listens where the CLI looks. The CLI must refuse and send nothing (it
    used to send root's `ksn enrol` request, setup key included)."""
    long_dir = tmp_path / ("d" * 120)
    long_dir.mkdir()
    db = long_dir / "k.sqlite"
    pid, r = fork_as(NOBODY, listener(control_path(db)))
    time.sleep(0.5)  # the listener is up (or could not be)
    rc = main(["ksn", "enrol", "0x0A000002", "--setup-key", SETUP, "--device", "127.0.0.1:9", "--db", str(db),
               "--port", "0", "--timeout", "0.2", "--retries", "1"])
    out = collect(pid, r)
    assert SETUP.encode() not in out and not out.startswith(b"received:{"), out
    assert rc == 2
    assert "refusing" in caplog.text or "no answer" in caplog.text


@as_root
def test_client_checks_the_listeners_credentials(tmp_path):
    """A socket file that looks right (ours, in our private directory) but whose listener runs
    as another uid: SO_PEERCRED tells, and the client sends nothing."""
    path = control_path(tmp_path / "k.sqlite")
    control.make_private_dir(path.parent)
    pid, r = fork_as(NOBODY, listener(path, bind_first=True))
    time.sleep(0.5)

    async def go():
        with pytest.raises(TesseraError, match="runs as uid 65534"):
            await control.connect(path)

    asyncio.run(go())
    out = collect(pid, r)
    assert out == b"received:", out


@as_root
def test_client_refuses_a_directory_or_socket_of_another_uid(tmp_path):
    path = control_path(tmp_path / "k.sqlite")
    control.make_private_dir(path.parent)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    try:
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(TesseraError, match="not a control socket of yours"):
            asyncio.run(control.connect(path))
        os.chown(path, 0, 0)
        os.chown(path.parent, NOBODY, NOBODY)
        with pytest.raises(TesseraError, match="belongs to uid 65534"):
            asyncio.run(control.connect(path))
        os.chown(path.parent, 0, 0)
        os.chmod(path.parent, 0o755)
        with pytest.raises(TesseraError, match="accessible by others"):
            asyncio.run(control.connect(path))
    finally:
        s.close()


@as_root
def test_server_refuses_a_client_of_another_uid(shared_tmp, caplog):
    path = control_path(Path(shared_tmp) / "k.sqlite")  # a directory uid nobody can reach
    calls = []

    async def dispatch(op, args, progress):
        calls.append(op)
        return "secret-result"

    def client(uid):
        os.setgid(uid)
        os.setuid(uid)
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(3)
        c.connect(str(path))
        c.sendall(b'{"op": "list"}\n')
        got = b""
        while chunk := c.recv(4096):
            got += chunk
        return b"got:" + got

    async def go():
        srv = ControlServer(dispatch, path)
        await srv.start()
        os.chmod(path.parent, 0o711)  # let uid nobody reach the socket (never in real use)
        os.chmod(path, 0o666)
        pid, r = fork_as(NOBODY, client)
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(None, collect, pid, r)
        await srv.stop()
        return out, srv

    out, srv = asyncio.run(go())
    assert out == b"got:", out
    assert calls == [] and srv.refused["uid"] == 1
    assert "refused a connection from uid 65534" in caplog.text


# ------------------------------------------------------------------ limits and malformed requests


def _raw(path, payload: bytes | None, timeout=5.0):
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(timeout)
    c.connect(str(path))
    if payload is not None:
        try:
            c.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at once (busy): its answer is already there to read
    got = b""
    try:
        while chunk := c.recv(65536):
            got += chunk
    except OSError:
        pass
    c.close()
    return got


BAD = [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "expected"),
    (b'{"op": "format-disk"}\n', "unknown operation"),
    (b'{"op": "rotate", "args": {"addrs": "all"}}\n', "wrong type"),
    (b'{"op": "rotate", "args": {"addrs": [true]}}\n', "list of addresses"),
    (b'{"op": "enrol", "args": {"addr": 5}}\n', "needs"),
    (b'{"op": "sync", "args": {"__class__": 1}}\n', "no argument of that name"),
    (b'{"op": "app", "args": {"addr": 1, "op": "rm", "prop": 1}}\n', "must be one of"),
    (b'{"op": "list", "args": []}\n', "must be an object"),
    (b"\xff\xfe\n", "not JSON"),
    (b"x" * (control.MAX_REQUEST + 10) + b"\n", "over"),
]


def test_malformed_requests_get_a_clean_error_and_one_log_line(tmp_path, caplog):
    path = control_path(tmp_path / "k.sqlite")

    async def dispatch(op, args, progress):
        if op == "sync":
            raise RuntimeError("internal detail /secret/path")
        return "ok"

    async def go():
        srv = ControlServer(dispatch, path)
        await srv.start()
        loop = asyncio.get_running_loop()
        answers = []
        for payload, _ in BAD:
            answers.append(await loop.run_in_executor(None, _raw, path, payload))
        internal = await loop.run_in_executor(None, _raw, path, b'{"op": "sync", "args": {}}\n')
        good = await loop.run_in_executor(None, _raw, path, b'{"op": "list"}\n')
        await srv.stop()
        return answers, internal, good, srv

    caplog.set_level(logging.DEBUG, "tessera.scpm.control")
    caplog.set_level(logging.INFO, "asyncio")
    answers, internal, good, srv = asyncio.run(go())
    for (payload, why), ans in zip(BAD, answers):
        msg = json.loads(ans)
        assert msg["ok"] is False and why in msg["error"], (payload[:40], msg)
    assert json.loads(internal) == {"ok": False, "error": "internal error in the KSN server (see its log)"}
    assert json.loads(good) == {"ok": True, "result": "ok"}
    warn = [r for r in caplog.records if r.name == "tessera.scpm.control" and r.levelno >= logging.WARNING]
    assert len(warn) == len(BAD) + 1  # one line per malformed request, one for the internal error
    assert not any(r.exc_info for r in warn) and "secret" not in "".join(r.getMessage() for r in warn)
    assert srv.refused["malformed"] == len(BAD) and srv.refused["internal"] == 1


def test_idle_clients_are_cut_and_connections_capped(tmp_path):
    path = control_path(tmp_path / "k.sqlite")
    gate = asyncio.Event()

    async def dispatch(op, args, progress):
        await gate.wait()
        return "done"

    async def go():
        srv = ControlServer(dispatch, path, max_clients=3, read_deadline=0.5)
        await srv.start()
        loop = asyncio.get_running_loop()
        # a client that connects and never sends: closed after the deadline, with a reason
        t0 = time.monotonic()
        idle = await loop.run_in_executor(None, _raw, path, None)
        idle_s = time.monotonic() - t0
        # three requests in progress fill the server; a fourth is refused at once
        readers = [await asyncio.open_unix_connection(str(path)) for _ in range(3)]
        for _, w in readers:
            w.write(b'{"op": "list"}\n')
            await w.drain()
        for _ in range(100):
            if srv.active == 3:
                break
            await asyncio.sleep(0.02)
        busy = await loop.run_in_executor(None, _raw, path, b'{"op": "list"}\n')
        gate.set()
        done = [json.loads(await r.readline()) for r, _ in readers]
        for _, w in readers:
            w.close()
        after = await loop.run_in_executor(None, _raw, path, b'{"op": "list"}\n')
        await srv.stop()
        return idle, idle_s, busy, done, after, srv

    idle, idle_s, busy, done, after, srv = asyncio.run(go())
    assert b"no request within" in idle and idle_s < 5  # not held forever
    assert b"busy" in busy and srv.refused["busy"] == 1
    assert done == [{"ok": True, "result": "done"}] * 3
    assert json.loads(after) == {"ok": True, "result": "done"}
    assert srv.refused["slow"] == 1 and srv.active == 0
