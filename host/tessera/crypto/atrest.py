"""The 32-byte storage key that seals key material kept in SQLite (AES-256-GCM by the caller).

From an environment variable (64 hex digits) if set, else from a file next to the database,
created with O_EXCL and mode 0600 on first use. An existing file that is group/other
accessible or owned by someone else is refused. Neither the key nor the variable's value is
ever logged or put into an exception message.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("tessera.crypto.atrest")


def key_file_path(db: Path) -> Path:
    return db.with_name(db.name + ".key")


def load_storage_key(db: Path, env: Mapping[str, str] | None, var: str, what: str,
                     error: type[Exception] = ValueError) -> tuple[bytes, str]:
    """(32-byte key, where it came from): `var` from `env` (default os.environ) if set, else `<db>.key`."""
    env = os.environ if env is None else env
    if env.get(var):
        try:
            raw = bytes.fromhex(env[var].strip())
        except ValueError:
            raw = b""
        if len(raw) != 32:  # the value itself is never repeated
            raise error(f"{var} must be 64 hex digits (a 32-byte key)")
        return raw, var
    path = key_file_path(db)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise error(f"{path} is accessible by group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):o}); it must be 0600") from None
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise error(f"{path} is not owned by this user") from None
        try:
            raw = bytes.fromhex(path.read_text().strip())
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise error(f"{path} does not hold a 32-byte key in hex") from None
        return raw, str(path)
    raw = secrets.token_bytes(32)
    try:
        os.write(fd, raw.hex().encode() + b"\n")
    finally:
        os.close(fd)
    log.info("created the %s storage key %s (mode 0600)", what, path)
    return raw, str(path)
