"""The KSN's device and key registry: SQLite, with key material encrypted at rest.

Every key (a device's setup and master keys, a pending master key, the home's user,
service-provider and maker keys) is stored as AES-256-GCM ciphertext under the KSN storage
key, with the row's identity as associated data so a blob cannot be moved to another row.
The storage key lives in a separate 0600 file next to the database (`<db>.key`) or comes
from TESSERA_KSN_KEY (64 hex digits). Key bytes never appear in logs, exceptions or reprs.

Write ordering matters for recovery (profile 6.3, 6.4; docs/scpm.md): the engine stores a
pending master key before it sends MKU_COMMIT, so after a crash at any point the KSN holds
every key the device may be using.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


from tessera import keyfile
from tessera.errors import TesseraError
from tessera.paths import var_dir

log = logging.getLogger("tessera.scpm.store")

ENV_KEY = "TESSERA_KSN_KEY"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    addr INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', host TEXT NOT NULL DEFAULT '127.0.0.1',
    port INTEGER NOT NULL DEFAULT 24767, state TEXT NOT NULL DEFAULT 'new',
    master_gen INTEGER NOT NULL DEFAULT 0, held TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, updated REAL NOT NULL, last_error TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS device_keys (
    addr INTEGER NOT NULL, kind INTEGER NOT NULL, idx INTEGER NOT NULL, gen INTEGER NOT NULL,
    status TEXT NOT NULL, txid INTEGER NOT NULL DEFAULT 0, blob BLOB NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (addr, kind, idx, gen));
CREATE TABLE IF NOT EXISTS home_keys (
    kind INTEGER NOT NULL, idx INTEGER NOT NULL, gen INTEGER NOT NULL, blob BLOB NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (kind, idx, gen));
CREATE TABLE IF NOT EXISTS windows (
    addr INTEGER NOT NULL, kind INTEGER NOT NULL, idx INTEGER NOT NULL, gen INTEGER NOT NULL,
    dir TEXT NOT NULL, high INTEGER NOT NULL, bits INTEGER NOT NULL, reserved INTEGER NOT NULL,
    PRIMARY KEY (addr, kind, idx, gen, dir));
"""


def default_db() -> Path:
    return var_dir() / "scpm-ksn.sqlite"


class StoreError(TesseraError):
    pass


@dataclass
class DeviceRecord:
    addr: int
    name: str
    host: str
    port: int
    state: str  # new | enrolling | enrolled | failed
    master_gen: int
    held: dict = field(default_factory=dict)  # "kind/idx" -> gen the device acknowledged
    updated: float = 0.0
    last_error: str = ""


@dataclass
class KeyRecord:
    """A device key row. `secret` is the decrypted blob; kept out of repr."""

    addr: int
    kind: int
    idx: int
    gen: int
    status: str  # setup | current | pending
    txid: int
    secret: bytes = field(repr=False)


def _load_storage_key(db_path: Path) -> bytes:
    """TESSERA_KSN_KEY, else `<db>.key` (created 0600, atomically): tessera.keyfile."""
    return keyfile.load_storage_key(db_path, None, ENV_KEY, "KSN", StoreError)[0]


class Store:
    """Thread-safe (one connection, one lock); the engine and server share it."""

    def __init__(self, path: Path | str | None = None, storage_key: bytes | None = None, durable: bool = True) -> None:
        self.path = Path(path) if path else default_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keyfile.private_file(self.path)  # sealed keys and registry metadata: nobody else's business
        self._sealer = keyfile.Sealer(storage_key if storage_key is not None else _load_storage_key(self.path),
                                      StoreError, "wrong KSN storage key?")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed pending key survives a power cut, not only a killed process.
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        self._db.executescript(SCHEMA)
        self._depth = 0
        self._check_key()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ encryption at rest
    def _check_key(self) -> None:
        row = self._db.execute("SELECT v FROM meta WHERE k='keycheck'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('keycheck', ?)", (self._sealer.seal("keycheck", b"tessera-ksn").hex(),))
        else:
            self._sealer.open("keycheck", bytes.fromhex(row[0]))

    # ------------------------------------------------------------ transactions
    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self._db
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    # ------------------------------------------------------------ devices
    def upsert_device(self, addr: int, host: str | None = None, port: int | None = None, name: str | None = None) -> DeviceRecord:
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO devices (addr, created, updated) VALUES (?, ?, ?)", (addr, now, now))
            for col, val in (("host", host), ("port", port), ("name", name)):
                if val is not None:
                    db.execute(f"UPDATE devices SET {col}=?, updated=? WHERE addr=?", (val, now, addr))
        dev = self.device(addr)
        assert dev is not None
        return dev

    def device(self, addr: int) -> DeviceRecord | None:
        with self._lock:
            row = self._db.execute("SELECT addr, name, host, port, state, master_gen, held, updated, last_error "
                                   "FROM devices WHERE addr=?", (addr,)).fetchone()
        return self._dev(row) if row else None

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._db.execute("SELECT addr, name, host, port, state, master_gen, held, updated, last_error "
                                    "FROM devices ORDER BY addr").fetchall()
        return [self._dev(r) for r in rows]

    @staticmethod
    def _dev(r) -> DeviceRecord:
        return DeviceRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8])

    def set_device(self, addr: int, **cols) -> None:
        if "held" in cols:
            cols["held"] = json.dumps(cols["held"], sort_keys=True)
        sets = ", ".join(f"{c}=?" for c in cols)
        with self.tx() as db:
            db.execute(f"UPDATE devices SET {sets}, updated=? WHERE addr=?", (*cols.values(), time.time(), addr))

    def delete_device(self, addr: int) -> None:
        with self.tx() as db:
            for t in ("devices", "device_keys", "windows"):
                db.execute(f"DELETE FROM {t} WHERE addr=?", (addr,))

    # ------------------------------------------------------------ device keys
    def put_device_key(self, addr: int, kind: int, idx: int, gen: int, status: str, secret: bytes, txid: int = 0) -> None:
        blob = self._sealer.seal(f"dev|{addr}|{kind}|{idx}|{gen}", secret)
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO device_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (addr, kind, idx, gen, status, txid, blob, time.time()))

    def device_keys(self, addr: int) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute("SELECT addr, kind, idx, gen, status, txid, blob FROM device_keys WHERE addr=? "
                                    "ORDER BY kind, idx, gen", (addr,)).fetchall()
        return [KeyRecord(*r[:6], secret=self._sealer.open(f"dev|{r[0]}|{r[1]}|{r[2]}|{r[3]}", r[6])) for r in rows]

    def set_key_status(self, addr: int, kind: int, idx: int, gen: int, status: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE device_keys SET status=? WHERE addr=? AND kind=? AND idx=? AND gen=?",
                       (status, addr, kind, idx, gen))

    def delete_device_key(self, addr: int, kind: int, idx: int, gen: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM device_keys WHERE addr=? AND kind=? AND idx=? AND gen=?", (addr, kind, idx, gen))
            db.execute("DELETE FROM windows WHERE addr=? AND kind=? AND idx=? AND gen=?", (addr, kind, idx, gen))

    def forget_device_keys(self, addr: int) -> None:
        """Re-enrolment after a factory reset: no key and no SNF state survives."""
        with self.tx() as db:
            db.execute("DELETE FROM device_keys WHERE addr=?", (addr,))
            db.execute("DELETE FROM windows WHERE addr=?", (addr,))

    # ------------------------------------------------------------ home keys (user, SP, maker)
    def put_home_key(self, kind: int, idx: int, gen: int, secret: bytes) -> None:
        blob = self._sealer.seal(f"home|{kind}|{idx}|{gen}", secret)
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO home_keys VALUES (?, ?, ?, ?, ?)", (kind, idx, gen, blob, time.time()))

    def home_keys(self) -> dict[tuple[int, int, int], bytes]:
        with self._lock:
            rows = self._db.execute("SELECT kind, idx, gen, blob FROM home_keys").fetchall()
        return {(k, i, g): self._sealer.open(f"home|{k}|{i}|{g}", b) for k, i, g, b in rows}

    def home_key_gens(self) -> dict[tuple[int, int], int]:
        """(kind, idx) -> newest generation (by creation order, since gens wrap)."""
        with self._lock:
            rows = self._db.execute("SELECT kind, idx, gen FROM home_keys ORDER BY created, rowid").fetchall()
        return {(k, i): g for k, i, g in rows}

    # ------------------------------------------------------------ SNF state
    def put_window(self, addr: int, kind: int, idx: int, gen: int, direction: str, high: int, bits: int, reserved: int) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (addr, kind, idx, gen, direction, high, bits, reserved))

    def windows(self, addr: int) -> list[tuple]:
        with self._lock:
            return self._db.execute("SELECT kind, idx, gen, dir, high, bits, reserved FROM windows WHERE addr=?",
                                    (addr,)).fetchall()

    # ------------------------------------------------------------ meta
    def meta(self, k: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return row[0] if row else default

    def set_meta(self, k: str, v: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))

    def __repr__(self) -> str:
        return f"<Store {self.path}>"
