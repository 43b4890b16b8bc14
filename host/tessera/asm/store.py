"""Responder state: the link-encryption key store and the SQLite security event log."""
from __future__ import annotations

import base64
import datetime as dt
import logging
import secrets
import sqlite3
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tessera import keyfile
from tessera.asm.codec import LEKey, SPBStatus

log = logging.getLogger("tessera.asm.store")

MIN_KEY_CAPACITY = 16  # "A link-encryption responder holds at least 16 keys" (clause 8)


@dataclass
class _Held:
    key: LEKey
    expires_at: float  # responder clock, seconds


STORE_KEY_ENV = "TESSERA_ASM_STORE_KEY"  # 64 hex digits: the AES-256-GCM storage key
_AAD = b"tessera-asm-lekey-v1"


class KeyStoreError(ValueError):
    """The persistent key store cannot be opened safely (never carries key material)."""


class StorageKey:
    """The 32-byte key sealing persisted LE keys; its bytes never appear in repr or str."""

    __slots__ = ("_aead", "source")

    def __init__(self, key: bytes, source: str) -> None:
        if len(key) != 32:
            raise KeyStoreError(f"the storage key from {source} is not 32 bytes")
        self._aead = AESGCM(key)
        self.source = source

    def __repr__(self) -> str:
        return f"StorageKey(source={self.source!r})"

    @staticmethod
    def _aad(key_id: int, expires_at: float) -> bytes:
        # binds each sealed key to its ID and expiry: rows cannot be swapped or prolonged
        return _AAD + struct.pack(">Id", key_id, expires_at)

    def seal(self, k: LEKey, expires_at: float) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(12)
        plain = struct.pack(">16sIQ", k.key, k.expire, k.attribute)
        return nonce, self._aead.encrypt(nonce, plain, self._aad(k.key_id, expires_at))

    def open(self, key_id: int, expires_at: float, nonce: bytes, sealed: bytes) -> LEKey:
        plain = self._aead.decrypt(nonce, sealed, self._aad(key_id, expires_at))
        key, expire, attribute = struct.unpack(">16sIQ", plain)
        return LEKey(key_id, key, expire, attribute)


def storage_key_path(db: Path) -> Path:
    return keyfile.key_file_path(db)


def load_storage_key(db: Path, env: Mapping[str, str] | None = None) -> StorageKey:
    """TESSERA_ASM_STORE_KEY if set, else `<db>.key` (created 0600 with a random key if absent)."""
    raw, source = keyfile.load_storage_key(db, env, STORE_KEY_ENV, "LE key", KeyStoreError)
    return StorageKey(raw, source)


class KeyStore:
    """LE keys by ID, in memory; with `persist` also in an SQLite file, sealed with AES-256-GCM.

    The storage key comes from TESSERA_ASM_STORE_KEY or a 0600 file `<persist>.key` (see
    `load_storage_key`). Only key IDs and expiry times are stored in clear. Keys already
    expired are deleted when the store is opened.
    """

    def __init__(self, capacity: int = MIN_KEY_CAPACITY, clock: Callable[[], float] = time.time,
                 persist: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        if capacity < MIN_KEY_CAPACITY:
            raise ValueError(f"capacity must be at least {MIN_KEY_CAPACITY}")
        self.capacity = capacity
        self.clock = clock
        self._keys: dict[int, _Held] = {}
        self._db: sqlite3.Connection | None = None
        self._sk: StorageKey | None = None
        if persist is not None:
            self._open(Path(persist), env)

    def __repr__(self) -> str:
        return f"KeyStore(capacity={self.capacity}, held={len(self._keys)}, persistent={self._db is not None})"

    def _open(self, persist: Path, env: Mapping[str, str] | None) -> None:
        self._sk = load_storage_key(persist, env)
        keyfile.private_file(persist)
        db = sqlite3.connect(str(persist), check_same_thread=False)
        db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left in free pages
        legacy = db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='lekeys'").fetchone()
        if legacy:  # the unencrypted table of earlier versions: wipe it, the SM reloads keys
            n = db.execute("SELECT COUNT(*) FROM lekeys").fetchone()[0]
            db.execute("DROP TABLE lekeys")
            db.commit()
            db.execute("VACUUM")
            log.warning("security: discarded %d LE key(s) stored unencrypted by an earlier version in %s; "
                        "the Security Manager must load them again", n, persist)
        db.execute("CREATE TABLE IF NOT EXISTS lekeys_sealed (key_id INTEGER PRIMARY KEY, "
                   "expires_at REAL NOT NULL, nonce BLOB NOT NULL, sealed BLOB NOT NULL)")
        gone = db.execute("DELETE FROM lekeys_sealed WHERE expires_at <= ?", (self.clock(),)).rowcount
        db.commit()
        bad: list[int] = []
        for kid, at, nonce, sealed in db.execute("SELECT key_id, expires_at, nonce, sealed FROM lekeys_sealed"):
            try:
                self._keys[kid] = _Held(self._sk.open(kid, at, nonce, sealed), at)
            except (InvalidTag, struct.error, ValueError):
                bad.append(kid)
        if bad:
            db.close()
            self._keys.clear()
            raise KeyStoreError(f"cannot decrypt stored LE key(s) {','.join(map(str, bad[:8]))} in {persist}: "
                                f"wrong storage key ({self._sk.source}) or altered database")
        self._db = db
        if gone or self._keys:
            log.info("LE key store %s: %d key(s) restored, %d expired key(s) purged", persist, len(self._keys), gone)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _expire(self) -> None:
        now = self.clock()
        gone = [k for k, h in self._keys.items() if h.expires_at <= now]
        for k in gone:
            del self._keys[k]
        if gone and self._db:
            self._db.executemany("DELETE FROM lekeys_sealed WHERE key_id=?", [(k,) for k in gone])
            self._db.commit()

    def load(self, keys: Iterable[LEKey]) -> bool:
        """All or nothing; False (overflow) if the store would exceed its capacity."""
        self._expire()
        keys = list(keys)
        new = {k.key_id for k in keys} - set(self._keys)
        if len(self._keys) + len(new) > self.capacity:
            return False
        now = self.clock()
        for k in keys:
            self._keys[k.key_id] = _Held(k, now + k.expire)
        if self._db and self._sk:
            rows = []
            for k in keys:
                nonce, sealed = self._sk.seal(k, now + k.expire)
                rows.append((k.key_id, now + k.expire, nonce, sealed))
            self._db.executemany("INSERT OR REPLACE INTO lekeys_sealed VALUES (?,?,?,?)", rows)
            self._db.commit()
        return True

    def has(self, key_id: int) -> bool:
        self._expire()
        return key_id in self._keys

    def ids(self) -> list[int]:
        self._expire()
        return sorted(self._keys)

    def get(self, key_id: int) -> LEKey | None:
        self._expire()
        h = self._keys.get(key_id)
        return h.key if h else None

    def purge(self, key_id: int) -> bool:
        self._expire()
        found = self._keys.pop(key_id, None) is not None
        if self._db:
            self._db.execute("DELETE FROM lekeys_sealed WHERE key_id=?", (key_id,))
            self._db.commit()
        return found

    def purge_all(self) -> int:
        n = len(self._keys)
        self._keys.clear()
        if self._db:
            self._db.execute("DELETE FROM lekeys_sealed")
            self._db.commit()
        return n

    def __len__(self) -> int:
        self._expire()
        return len(self._keys)


# --------------------------------------------------------------------------- log records
# SMPTE 430-4 / 430-5 *style* records. The namespaces and the event type / subtype names
# follow our reading of those standards (not in this repository); see docs/asm.md.
NS_LOG = "http://www.smpte-ra.org/schemas/430-4/2008/LogRecord/"
SECURITY_CLASS = "http://www.smpte-ra.org/430.5/2007/SecurityLog/"


def log_record_xml(*, event_uuid: str, seq: int, ts: int, device: str, event_type: str, subtype: str,
                   params: dict[str, str], exceptions: dict[str, str]) -> bytes:
    ET.register_namespace("", NS_LOG)
    q = lambda tag: f"{{{NS_LOG}}}{tag}"  # noqa: E731
    root = ET.Element(q("LogRecord"))
    hdr = ET.SubElement(root, q("LogRecordHeader"))
    ET.SubElement(hdr, q("EventID")).text = f"urn:uuid:{event_uuid}"
    ET.SubElement(hdr, q("TimeStamp")).text = dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    ET.SubElement(hdr, q("EventSequence")).text = str(seq)
    ET.SubElement(hdr, q("DeviceSourceID")).text = device
    ET.SubElement(hdr, q("EventClass")).text = SECURITY_CLASS
    ET.SubElement(hdr, q("EventType"), scope=f"{SECURITY_CLASS}#EventTypes").text = event_type
    body = ET.SubElement(root, q("LogRecordBody"))
    ET.SubElement(body, q("EventID")).text = f"urn:uuid:{event_uuid}"
    ET.SubElement(body, q("EventSubType"), scope=f"{SECURITY_CLASS}#EventSubTypes-{event_type}").text = subtype
    for tag, items in (("Parameters", params), ("Exceptions", exceptions)):
        if items:  # both lists hold Name/Value Parameter elements
            group = ET.SubElement(body, q(tag))
            for k, v in items.items():
                p = ET.SubElement(group, q("Parameter"))
                ET.SubElement(p, q("Name")).text = k
                ET.SubElement(p, q("Value")).text = v
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8", short_empty_elements=True)


class SecurityLog:
    """Responder's own security events in SQLite; Event IDs are the UInt32 row IDs."""

    def __init__(self, path: Path | str, device: str = "urn:x-tessera:asm-responder",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.device = device
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0)
        self._db.executescript(
            "PRAGMA journal_mode=WAL;"
            "CREATE TABLE IF NOT EXISTS events (event_id INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL, "
            "event_type TEXT, subtype TEXT, peer_thumbprint TEXT, xml BLOB NOT NULL);"
            "CREATE INDEX IF NOT EXISTS events_ts ON events(ts);"
            "CREATE TABLE IF NOT EXISTS spb_state (id INTEGER PRIMARY KEY CHECK (id = 1), status INTEGER NOT NULL);")
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def record(self, event_type: str, subtype: str, *, thumbprint: str | None = None,
               params: dict[str, str] | None = None, exceptions: dict[str, str] | None = None) -> int:
        ts = int(self.clock())
        params = dict(params or {})
        if thumbprint:
            params["InitiatorCertThumbprint"] = thumbprint
        with self._lock:
            cur = self._db.execute("INSERT INTO events (ts, event_type, subtype, peer_thumbprint, xml) VALUES (?,?,?,?,?)",
                                   (ts, event_type, subtype, thumbprint, b""))
            eid = int(cur.lastrowid or 0)
            xml = log_record_xml(event_uuid=str(uuid.uuid4()), seq=eid, ts=ts, device=self.device,
                                 event_type=event_type, subtype=subtype, params=params, exceptions=exceptions or {})
            self._db.execute("UPDATE events SET xml=? WHERE event_id=?", (xml, eid))
            self._db.commit()
        log.debug("security event %d %s/%s", eid, event_type, subtype)
        return eid

    def window(self, start: int, stop: int) -> list[int]:
        """Clause 7.3: IDs of events stamped within [start, stop], both ends included."""
        with self._lock:
            rows = self._db.execute("SELECT event_id FROM events WHERE ts BETWEEN ? AND ? ORDER BY event_id",
                                    (start, stop)).fetchall()
        return [r[0] for r in rows]

    def get(self, event_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT xml FROM events WHERE event_id=?", (event_id,)).fetchone()
        return bytes(row[0]) if row else None

    def events(self) -> list[tuple[int, int, str, str, str | None]]:
        with self._lock:
            return self._db.execute("SELECT event_id, ts, event_type, subtype, peer_thumbprint FROM events "
                                    "ORDER BY event_id").fetchall()

    # SPB status shared with `tessera asm status` in another process (clause 7.5)
    def get_status(self) -> SPBStatus:
        with self._lock:
            row = self._db.execute("SELECT status FROM spb_state WHERE id=1").fetchone()
        return SPBStatus(row[0]) if row else SPBStatus.NOT_PLAYING

    def set_status(self, status: SPBStatus) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO spb_state VALUES (1, ?)", (int(status),))
            self._db.commit()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
