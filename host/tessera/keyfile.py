"""Storage-key files: the 32-byte keys that seal key material kept in SQLite (AES-256-GCM by
the caller), shared by every store that keeps keys at rest (SCPM KSN, ASM responder, DVB
SimulCrypt key store) so that all of them check and write their key file the same way.

The key comes from an environment variable (64 hex digits) if it is set, else from the file
`<db>.key` next to the database:

- **reading** refuses, with one line naming the file and never its content: a file that is
  not a regular file, accessible by group or others, owned by another user, or that does not
  hold exactly 64 hex digits (surrounding whitespace allowed);
- **creating** writes 32 random bytes as hex to a temporary 0600 file in the same directory,
  fsyncs it, links it into place (a rename that never replaces: two processes racing to
  create the key both end up with the one that won), removes the temporary name and fsyncs
  the directory, so a power cut leaves either no key file or a whole one, never half a key;
- the database file itself (which holds the sealed key material) is created 0600 if absent,
  and an existing one readable by group or others is tightened to 0600 with a warning.

Neither the key nor the variable's value is ever logged or put into an exception message.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from tessera.errors import TesseraError

log = logging.getLogger("tessera.keyfile")

KEY_BYTES = 32


class KeyFileError(TesseraError):
    """A storage key that cannot be used (the message never carries key material)."""


def key_file_path(db: Path) -> Path:
    return db.with_name(db.name + ".key")


def parse_hex_key(text: str, where: str, error: type[Exception] = KeyFileError) -> bytes:
    """64 hex digits -> 32 bytes; anything else is `error` naming `where`, not the value."""
    t = text.strip()
    try:
        raw = bytes.fromhex(t) if len(t) == 2 * KEY_BYTES else b""
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise error(f"{where} does not hold a {KEY_BYTES}-byte key ({2 * KEY_BYTES} hex digits)")
    return raw


def read_key_file(path: Path, error: type[Exception] = KeyFileError) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise error(f"cannot open the key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} is not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise error(f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                        "it must be 0600 (chmod 600 it)")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise error(f"{path} is not owned by this user")
        data = os.read(fd, 4 * KEY_BYTES + 64)  # a key file is 65 bytes; more is not a key file
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return parse_hex_key(text, str(path), error)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key_file(path: Path, raw: bytes) -> bool:
    """Create `path` holding `raw` in hex, atomically and durably, mode 0600. Returns False
    (writing nothing) when the file already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            data = raw.hex().encode() + b"\n"
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces an existing key file
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def private_file(path: Path) -> None:
    """Make sure the file holding sealed key material is 0600 (created so if absent)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    st = path.stat()
    if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.getuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
        log.warning("security: %s was accessible by group or others; now mode 0600", path)


def load_storage_key(db: Path, env: Mapping[str, str] | None, var: str, what: str,
                     error: type[Exception] = KeyFileError, create_db: bool = True) -> tuple[bytes, str]:
    """(32-byte key, where it came from): `var` from `env` (default os.environ) if set, else
    `<db>.key`, created with a random key if absent. `error` is the caller's exception type.
    With `create_db`, the database file is also created (or tightened to) mode 0600."""
    env = os.environ if env is None else env
    if create_db and str(db) != ":memory:":
        private_file(db)  # a missing directory is the caller's error (OSError), never created here
    if env.get(var):
        return parse_hex_key(env[var], var, error), var  # the value itself is never repeated
    path = key_file_path(db)
    if not os.path.lexists(path):
        raw = secrets.token_bytes(KEY_BYTES)
        if write_key_file(path, raw):
            log.info("created the %s storage key %s (mode 0600)", what, path)
            return raw, str(path)
    return read_key_file(path, error), str(path)


class Sealer:
    """AES-256-GCM for key material at rest in a store's rows: a fresh 96-bit nonce per
    seal, the row's name as associated data (a sealed value moved to another row does not
    open). `error(message)` is raised for anything that does not open; the message names the
    row and says which key was probably wrong, never the value."""

    def __init__(self, key: bytes, error: type[Exception], wrong_key_hint: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._error, self._hint = error, wrong_key_hint

    def seal(self, aad: str, secret: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, secret, aad.encode())

    def open(self, aad: str, blob: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad.encode())
        except Exception:  # noqa: BLE001 - InvalidTag, a short blob: the same answer
            raise self._error(f"cannot decrypt {aad} ({self._hint})") from None
