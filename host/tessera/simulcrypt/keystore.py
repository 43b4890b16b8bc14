"""Key store for the STKM and LTKM generators (SQLite by default, ":memory:" for tests).

Kinds (project-defined labels):
  SEK  service encryption key, owner = Super_CAS_id, scope = ECM_id (stkmstream)
  PEK  program encryption key, same owner/scope; preferred over the SEK when present
  CWT  CW transport key shared by SCS and STKM generator for CW_encryption, scope 0
  LTK  delivery key of a device group for LTKMs, owner = client_id, scope = group id
Key material never leaves this module in logs or exception text.
"""
from __future__ import annotations

import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

KINDS = ("SEK", "PEK", "CWT", "LTK")


@dataclass(frozen=True)
class Key:
    kind: str
    owner: int
    scope: int
    key_id: int
    material: bytes

    def __repr__(self) -> str:  # never show the material
        return f"Key({self.kind} owner=0x{self.owner:08x} scope={self.scope} id={self.key_id})"


class KeyStore:
    def __init__(self, path: str | Path = ":memory:") -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS keys (kind TEXT NOT NULL, owner INTEGER NOT NULL, scope INTEGER NOT NULL,"
                " key_id INTEGER NOT NULL, material BLOB NOT NULL, PRIMARY KEY (kind, owner, key_id))")

    def add(self, kind: str, owner: int, scope: int, material: bytes | None = None, size: int = 16) -> Key:
        if kind not in KINDS:
            raise ValueError(f"unknown key kind {kind!r}")
        material = material if material is not None else secrets.token_bytes(size)
        if len(material) not in (16, 32):
            raise ValueError("keys are 16 or 32 bytes")
        with self._lock, self._db:
            row = self._db.execute("SELECT COALESCE(MAX(key_id), 0) FROM keys WHERE kind=? AND owner=?",
                                   (kind, owner)).fetchone()
            key_id = int(row[0]) + 1
            self._db.execute("INSERT INTO keys VALUES (?,?,?,?,?)", (kind, owner, scope, key_id, material))
        return Key(kind, owner, scope, key_id, material)

    def current(self, kind: str, owner: int, scope: int) -> Key | None:
        with self._lock:
            row = self._db.execute("SELECT key_id, material FROM keys WHERE kind=? AND owner=? AND scope=?"
                                   " ORDER BY key_id DESC LIMIT 1", (kind, owner, scope)).fetchone()
        return Key(kind, owner, scope, int(row[0]), bytes(row[1])) if row else None

    def get(self, kind: str, owner: int, key_id: int) -> Key | None:
        with self._lock:
            row = self._db.execute("SELECT scope, material FROM keys WHERE kind=? AND owner=? AND key_id=?",
                                   (kind, owner, key_id)).fetchone()
        return Key(kind, owner, int(row[0]), key_id, bytes(row[1])) if row else None

    def traffic_key(self, owner: int, scope: int) -> Key | None:
        """The key that protects STKMs of a stream: the program key if any, else the service key."""
        return self.current("PEK", owner, scope) or self.current("SEK", owner, scope)

    def close(self) -> None:
        self._db.close()
