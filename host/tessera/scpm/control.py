"""The KSN's local control socket: CLI commands reach a running `tessera ksn serve` through it.

Protocol: JSON lines over AF_UNIX. The client sends one request line
`{"op": name, "args": {...}}`; the server answers `{"progress": line}`* then
`{"ok": true, "result": ...}` or `{"ok": false, "error": message}`.

Who may talk to whom (issue 11 #7): the socket lives in a **private directory** (mode 0700,
owned by the user, never a symlink): `.<db name>.ctl-<uid>/` next to the database, or, when
that path is too long for AF_UNIX, `$XDG_RUNTIME_DIR/tessera/` (if it is private) or
`<tmp>/tessera-<uid>/`, always checked the same way. Both ends check the other's kernel
credentials (SO_PEERCRED): the server serves only its own uid, and the client sends nothing
(a setup key, for instance) to a socket or a listener that belongs to another uid.

Limits (issue 11 #9, #10): at most MAX_CLIENTS connections at once, the request line must
arrive within READ_DEADLINE seconds and be at most MAX_REQUEST bytes, and every argument is
checked against the operation's schema. A malformed request gets one log line and a clean
error; an unexpected failure is logged with its exception type (the traceback only at DEBUG)
and the client gets "internal error", never the exception's text.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError

log = logging.getLogger("tessera.scpm.control")

MAX_CLIENTS = 8
READ_DEADLINE = 5.0  # seconds for the whole request line
MAX_REQUEST = 64 * 1024
_SUN_PATH = 100  # AF_UNIX path limit (108 on Linux) with a margin

# op -> {argument: (accepted types, required)}
_ADDRS = (list, type(None))
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "list": {},
    "enrol": {"addr": ((int,), True), "setup_key": ((str,), True), "host": ((str,), True),
              "port": ((int,), True), "name": ((str,), False)},
    "provision": {"addrs": (_ADDRS, False), "kind": ((str,), True), "idx": ((int,), False),
                  "new": ((bool,), False), "key": ((str, type(None)), False)},
    "sync": {"addrs": (_ADDRS, False)},
    "rotate": {"addrs": (_ADDRS, False), "parallel": ((int,), False)},
    "app": {"addr": ((int,), True), "op": ((str,), True), "prop": ((int,), True), "value": ((str,), False),
            "kind": ((str,), False), "idx": ((int,), False), "service": ((int,), False)},
}
_CHOICES = {("provision", "kind"): ("sp", "maker", "user"), ("app", "op"): ("get", "set"),
            ("app", "kind"): ("user", "sp", "maker"), ("app", "service"): (1, 2, 3)}


class MalformedRequest(TesseraError):
    pass


# ------------------------------------------------------------------ where the socket lives


def _uid() -> int:
    return os.getuid()


def check_private_dir(d: Path) -> None:
    """`d` must be a real directory (not a symlink) owned by this user, mode 0700 or stricter."""
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise TesseraError(f"control directory {d} is not a directory (a symlink?): refusing to use it")
    if st.st_uid != _uid():
        raise TesseraError(f"control directory {d} belongs to uid {st.st_uid}, not to you: refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise TesseraError(f"control directory {d} is accessible by others (mode "
                           f"{stat.S_IMODE(st.st_mode):o}): refusing to use it")


def make_private_dir(d: Path) -> None:
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    check_private_dir(d)


def _runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        with contextlib.suppress(OSError, TesseraError):
            check_private_dir(Path(xdg))
            return Path(xdg) / "tessera"
    return Path(tempfile.gettempdir()) / f"tessera-{_uid()}"


def control_path(db: Path) -> Path:
    """Where `tessera ksn serve` on `db` listens (the same answer in the server and the CLI)."""
    near = db.parent / f".{db.name}.ctl-{_uid()}" / "ksn.sock"
    if len(os.fsencode(str(near))) <= _SUN_PATH:
        return near
    digest = hashlib.sha256(os.fsencode(str(db.resolve()))).hexdigest()[:16]
    return _runtime_dir() / f"ksn-{digest}.sock"


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED: pid, uid, gid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# ------------------------------------------------------------------ requests


def check_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Parse and validate one request line against SCHEMA; MalformedRequest says what is wrong
    in our own words (never echoing the request)."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequest("malformed request: not JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise MalformedRequest("malformed request: expected {\"op\": name, \"args\": {...}}")
    op = req["op"]
    schema = SCHEMA.get(op)
    if schema is None:
        raise MalformedRequest("malformed request: unknown operation")
    args = req.get("args", {})
    if not isinstance(args, dict):
        raise MalformedRequest(f"malformed request: {op} arguments must be an object")
    for name, value in args.items():
        if name not in schema:
            raise MalformedRequest(f"malformed request: {op} takes no argument of that name")
        types, _ = schema[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise MalformedRequest(f"malformed request: {op} argument {name} has the wrong type")
        if isinstance(value, list) and not all(isinstance(a, int) and not isinstance(a, bool) for a in value):
            raise MalformedRequest(f"malformed request: {op} argument {name} must be a list of addresses")
        choices = _CHOICES.get((op, name))
        if choices is not None and value not in choices:
            raise MalformedRequest(f"malformed request: {op} argument {name} must be one of {choices}")
    missing = [n for n, (_, required) in schema.items() if required and n not in args]
    if missing:
        raise MalformedRequest(f"malformed request: {op} needs {', '.join(missing)}")
    return op, args


# ------------------------------------------------------------------ server


class ControlServer:
    """Serves `dispatch(op, args, progress)` to the user's own CLI."""

    def __init__(self, dispatch, path: Path, max_clients: int = MAX_CLIENTS,
                 read_deadline: float = READ_DEADLINE) -> None:
        self.dispatch, self.path = dispatch, path
        self.max_clients, self.read_deadline = max_clients, read_deadline
        self.active = 0
        self.refused = {"busy": 0, "uid": 0, "slow": 0, "malformed": 0, "internal": 0}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        make_private_dir(self.path.parent)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:  # a socket left by a KSN that died (we hold the database lock): ours to remove
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != _uid():
                raise TesseraError(f"{self.path} exists and is not a control socket of yours: refusing to replace it")
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(OSError):  # the private directory too, when nothing else is in it
            self.path.parent.rmdir()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def emit(obj: dict) -> None:
            if not writer.is_closing():
                writer.write((json.dumps(obj) + "\n").encode())

        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if uid != _uid():
                self.refused["uid"] += 1
                log.warning("control socket: refused a connection from uid %d", uid)
                return
            if self.active >= self.max_clients:
                self.refused["busy"] += 1
                log.warning("control socket: refused a connection: %d already open", self.active)
                emit({"ok": False, "error": f"the KSN is busy: {self.active} control connections open"})
                return
            self.active += 1
            try:
                await self._serve_one(reader, emit)
            finally:
                self.active -= 1
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), self.read_deadline)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, emit) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), self.read_deadline)
        except asyncio.TimeoutError:
            self.refused["slow"] += 1
            log.warning("control socket: no request within %g s; connection closed", self.read_deadline)
            emit({"ok": False, "error": f"no request within {self.read_deadline:g} s"})
            return
        except (ValueError, asyncio.LimitOverrunError, ConnectionError):
            self.refused["malformed"] += 1
            log.warning("control socket: request line over %d bytes or broken; refused", MAX_REQUEST)
            emit({"ok": False, "error": f"malformed request: over {MAX_REQUEST} bytes"})
            return
        if not line:
            return
        try:
            op, args = check_request(line)
        except MalformedRequest as e:
            self.refused["malformed"] += 1
            log.warning("control socket: %s", e)
            emit({"ok": False, "error": str(e)})
            return
        try:
            result = await self.dispatch(op, args, lambda text: emit({"progress": text}))
            emit({"ok": True, "result": result})
        except TesseraError as e:  # our own one-line errors: meant for the user
            emit({"ok": False, "error": str(e)})
        except Exception as e:  # a bug: one line in the log, no internals to the client
            self.refused["internal"] += 1
            log.error("control request %s failed: %s (run with -vv for the traceback)", op, type(e).__name__)
            log.debug("control request failed", exc_info=True)
            emit({"ok": False, "error": "internal error in the KSN server (see its log)"})


# ------------------------------------------------------------------ client


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Connect to the KSN serving `path`, or None when none is running. Raises TesseraError,
    sending nothing, when the directory, the socket or the listener is not the user's own."""
    try:
        check_private_dir(path.parent)
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != _uid():
        raise TesseraError(f"{path} is not a control socket of yours (owner uid {st.st_uid}): refusing to use it")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_REQUEST), 5)
    except (ConnectionRefusedError, FileNotFoundError):
        log.debug("stale control socket %s", path)
        return None
    uid = peer_uid(writer.get_extra_info("socket"))
    if uid != _uid():
        writer.close()
        raise TesseraError(f"the process listening on {path} runs as uid {uid}, not as you: refusing to send it anything")
    return reader, writer


async def request(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], op: str, args: dict, progress,
                  timeout: float = 3600.0):
    reader, writer = conn
    try:
        writer.write((json.dumps({"op": op, "args": args}) + "\n").encode())
        await writer.drain()
    except ConnectionError:
        pass  # refused before it read the request (busy): its answer is still there to read
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise TesseraError("the KSN server closed the control connection")
            msg = json.loads(line)
            if "progress" in msg:
                progress(msg["progress"])
            elif msg.get("ok"):
                return msg["result"]
            else:
                raise TesseraError(msg.get("error", "KSN server error"))
    finally:
        writer.close()
