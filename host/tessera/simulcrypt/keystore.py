"""Key store for the STKM and LTKM generators (SQLite by default, ":memory:" for tests).

Kinds (project-defined labels):
  SEK  service encryption key, owner = Super_CAS_id, scope = ECM_id (stkmstream)
  PEK  program encryption key, same owner/scope; preferred over the SEK when present
  CWT  CW transport key shared by SCS and STKM generator for CW_encryption, scope 0
  LTK  delivery key of a device group for LTKMs, owner = client_id, scope = group id

At rest the material is sealed with AES-256-GCM (table `keys_sealed`): a fresh 12-byte
nonce per row, and kind, owner, scope and key_id as associated data, so a row cannot be
moved to another key. The storage key comes from TESSERA_SIMULCRYPT_STORE_KEY (64 hex
digits) or the file `<db>.key` (made 0600 on first use); a ":memory:" store uses a random
key of its own. A table `keys` with clear material, written by earlier versions, is sealed
into `keys_sealed` and dropped when the store is opened.
Key material never leaves this module in logs or exception text.
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tessera import keyfile

log = logging.getLogger("tessera.simulcrypt.keystore")

KINDS = ("SEK", "PEK", "CWT", "LTK")
STORE_KEY_ENV = "TESSERA_SIMULCRYPT_STORE_KEY"
_AAD = b"tessera-simulcrypt-key-v1"


class KeyStoreError(ValueError):
    """The key store cannot be opened or read safely (never carries key material)."""


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
    def __init__(self, path: str | Path = ":memory:", env: Mapping[str, str] | None = None) -> None:
        self.path = str(path)
        if self.path == ":memory:":
            raw, self._source = secrets.token_bytes(32), "memory"
        else:
            raw, self._source = keyfile.load_storage_key(Path(self.path), env, STORE_KEY_ENV,
                                                        "SimulCrypt key store", KeyStoreError)
        self._aead = AESGCM(raw)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            with self._lock, self._db:
                self._db.execute("PRAGMA secure_delete=ON")  # dropped clear rows are overwritten
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS keys_sealed (kind TEXT NOT NULL, owner INTEGER NOT NULL,"
                    " scope INTEGER NOT NULL, key_id INTEGER NOT NULL, nonce BLOB NOT NULL, sealed BLOB NOT NULL,"
                    " PRIMARY KEY (kind, owner, key_id))")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"KeyStore({self.path!r}, storage key from {self._source})"

    @staticmethod
    def _aad(kind: str, owner: int, scope: int, key_id: int) -> bytes:
        return _AAD + kind.encode() + struct.pack(">QQQ", owner, scope, key_id)

    def _seal(self, kind: str, owner: int, scope: int, key_id: int, material: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(12)
        return nonce, self._aead.encrypt(nonce, material, self._aad(kind, owner, scope, key_id))

    def _open(self, kind: str, owner: int, scope: int, key_id: int, nonce: bytes, sealed: bytes) -> Key:
        try:
            material = self._aead.decrypt(nonce, sealed, self._aad(kind, owner, scope, key_id))
        except (InvalidTag, ValueError):
            raise KeyStoreError(f"cannot decrypt {kind} id {key_id} of 0x{owner:08x} in {self.path}: wrong "
                                f"storage key ({self._source}) or altered database") from None
        return Key(kind, owner, scope, key_id, material)

    def _migrate(self) -> None:
        with self._lock:
            legacy = self._db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='keys'").fetchone()
            if not legacy:
                return
            with self._db:
                rows = self._db.execute("SELECT kind, owner, scope, key_id, material FROM keys").fetchall()
                for kind, owner, scope, key_id, material in rows:
                    nonce, sealed = self._seal(kind, owner, scope, key_id, bytes(material))
                    self._db.execute("INSERT OR REPLACE INTO keys_sealed VALUES (?,?,?,?,?,?)",
                                     (kind, owner, scope, key_id, nonce, sealed))
                self._db.execute("DROP TABLE keys")
            self._db.execute("VACUUM")  # no free page keeps the clear material
        log.warning("security: sealed %d key(s) that an earlier version stored in clear in %s", len(rows), self.path)

    def add(self, kind: str, owner: int, scope: int, material: bytes | None = None, size: int = 16) -> Key:
        if kind not in KINDS:
            raise ValueError(f"unknown key kind {kind!r}")
        material = material if material is not None else secrets.token_bytes(size)
        if len(material) not in (16, 32):
            raise ValueError("keys are 16 or 32 bytes")
        with self._lock, self._db:
            row = self._db.execute("SELECT COALESCE(MAX(key_id), 0) FROM keys_sealed WHERE kind=? AND owner=?",
                                   (kind, owner)).fetchone()
            key_id = int(row[0]) + 1
            nonce, sealed = self._seal(kind, owner, scope, key_id, material)
            self._db.execute("INSERT INTO keys_sealed VALUES (?,?,?,?,?,?)", (kind, owner, scope, key_id, nonce, sealed))
        return Key(kind, owner, scope, key_id, material)

    def current(self, kind: str, owner: int, scope: int) -> Key | None:
        with self._lock:
            row = self._db.execute("SELECT key_id, nonce, sealed FROM keys_sealed WHERE kind=? AND owner=? AND scope=?"
                                   " ORDER BY key_id DESC LIMIT 1", (kind, owner, scope)).fetchone()
        return self._open(kind, owner, scope, int(row[0]), row[1], row[2]) if row else None

    def get(self, kind: str, owner: int, key_id: int) -> Key | None:
        with self._lock:
            row = self._db.execute("SELECT scope, nonce, sealed FROM keys_sealed WHERE kind=? AND owner=? AND key_id=?",
                                   (kind, owner, key_id)).fetchone()
        return self._open(kind, owner, int(row[0]), key_id, row[1], row[2]) if row else None

    def traffic_key(self, owner: int, scope: int) -> Key | None:
        """The key that protects STKMs of a stream: the program key if any, else the service key."""
        return self.current("PEK", owner, scope) or self.current("SEK", owner, scope)

    def list(self) -> list[tuple[str, int, int, int, int]]:
        """(kind, owner, scope, key_id, bits) of every key, without the material."""
        with self._lock:
            rows = self._db.execute("SELECT kind, owner, scope, key_id, length(sealed) FROM keys_sealed"
                                    " ORDER BY 1, 2, 3, 4").fetchall()
        return [(k, o, s, i, (n - 16) * 8) for k, o, s, i, n in rows]  # GCM tag: 16 bytes

    def close(self) -> None:
        self._db.close()
