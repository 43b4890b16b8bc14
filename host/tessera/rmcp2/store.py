"""The session manager's SQLite store (docs/rmcp2.md): the session and its policy, members,
service user identifiers, the ACL and the current Ks generation.

Key material (Ks, the previous Ks during a grace, each member's K_TLS) is stored as
AES-256-GCM ciphertext under the SM storage key, with the row's identity as associated data
so a blob cannot be moved to another row (as the SCPM KSN store does). The storage key lives
in a 0600 file next to the database (`<db>.key`) or comes from TESSERA_SM_KEY (64 hex
digits); the database file is created 0600 too.

The engine (sm.py) calls the journal methods below *before* it returns the messages that
acknowledge a change (SUBSANS, KEYDELIVER, HRSANS ...), with synchronous=FULL: each in
its own committed transaction, or under `deferred()` in the server's group commit, which
commits before it sends the answers (server.py `_flush`); so a restart after a clean stop
or kill -9 brings back everything an MA was told. Outgoing Seq values are reserved in
blocks (`tx_reserved`) and every accepted message's replay window is written, so a
restarted SM neither repeats a Seq nor accepts a replay under a key that is still in force.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

from tessera import keyfile
from tessera.errors import TesseraError
from tessera.paths import var_dir
from tessera.rmcp2 import codec as C
from tessera.rmcp2 import protect as P

log = logging.getLogger("tessera.rmcp2.store")

ENV_KEY = "TESSERA_SM_KEY"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS service_user_ids (ident BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS ks (
    slot TEXT PRIMARY KEY, gen INTEGER NOT NULL, mode INTEGER NOT NULL, since REAL NOT NULL,
    until REAL NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    maid BLOB PRIMARY KEY, nt INTEGER NOT NULL, cert_sha256 BLOB NOT NULL, hashed_maid BLOB NOT NULL,
    hashed_ktls BLOB NOT NULL, ktls BLOB NOT NULL, secagreq BLOB, policy TEXT NOT NULL,
    policy_deadline REAL NOT NULL, suite_enc INTEGER NOT NULL, suite_auth INTEGER NOT NULL,
    tx_reserved INTEGER NOT NULL, ks_pending INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    maid BLOB NOT NULL, ref INTEGER NOT NULL, gen INTEGER NOT NULL, high INTEGER NOT NULL,
    bits INTEGER NOT NULL, PRIMARY KEY (maid, ref, gen));
CREATE TABLE IF NOT EXISTS acl (hashed_maid BLOB PRIMARY KEY, hashed_ktls BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, arg TEXT NOT NULL, state TEXT NOT NULL,
    result TEXT, created REAL NOT NULL);
"""
MAX_REQUESTS = 16  # operator requests waiting for the serving SM (a bound, not a queue to fill)


class StoreError(TesseraError):
    pass


def default_db() -> Path:
    return var_dir() / "rmcp2-sm.sqlite"


def storage_key(db_path: Path) -> bytes:
    """TESSERA_SM_KEY, else `<db>.key` (created 0600, atomically, with fsync; a corrupt or
    foreign-readable one refused with a one-line error): tessera.keyfile, as every store."""
    return keyfile.load_storage_key(db_path, None, ENV_KEY, "SM", StoreError)[0]


class SmStore:
    """One session per database. Thread-safe (one connection, one lock). Doubles as the
    engine's journal (`sm.journal = store`)."""

    def __init__(self, path: Path | str | None = None, key: bytes | None = None, durable: bool = True) -> None:
        self.path = Path(path) if path else default_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keyfile.private_file(self.path)
        self._sealer = keyfile.Sealer(key if key is not None else storage_key(self.path), StoreError,
                                      "wrong SM storage key?")
        self._lock = threading.RLock()
        self._defer = False
        self._closed = False
        self.commits = 0  # durable transactions since opening (the group commit's effect, bench_rmcp2)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        self._db.executescript(SCHEMA)
        check = self._meta("keycheck")
        if check is None:
            self._set_meta("keycheck", self._sealer.seal("keycheck", b"tessera-rmcp2-sm").hex())
        else:
            self._sealer.open("keycheck", bytes.fromhex(check))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self.commit()
                self._db.close()
                self._closed = True

    @contextlib.contextmanager
    def deferred(self):
        """Group commit: writes made inside stay in one open transaction until `commit()`.
        The server wraps each received message's engine call in this and commits once per
        event-loop turn, before it sends any answer from that turn (server.py `_flush`), so
        nothing is acknowledged before it is on disk. Holds the lock: another thread's
        write waits, then commits (its own and whatever was pending) at once."""
        with self._lock:
            self._defer = True
            try:
                yield
            finally:
                self._defer = False

    @property
    def pending(self) -> bool:
        """Deferred writes not committed yet."""
        return self._db.in_transaction

    def commit(self) -> None:
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
                self.commits += 1

    def _exec(self, *stmts: tuple[str, tuple]) -> None:
        """Statements in one transaction: committed at once, or under `deferred()` at the
        next `commit()`. Either way a failing statement undoes only its own group."""
        with self._lock:
            batch = self._db.in_transaction
            self._db.execute("SAVEPOINT w" if batch else "BEGIN IMMEDIATE")
            try:
                for sql, args in stmts:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK TO w" if batch else "ROLLBACK")
                if batch:
                    self._db.execute("RELEASE w")
                raise
            if batch:
                self._db.execute("RELEASE w")
            if not self._defer:
                self._db.execute("COMMIT")
                self.commits += 1

    def _meta(self, k: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT v FROM meta WHERE k=?", (k,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, k: str, v: str) -> None:
        self._exec(("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v)))

    # ------------------------------------------------------------ session definition
    def session(self) -> dict | None:
        """The session's settings as created (`create_session`), or None."""
        v = self._meta("session")
        return json.loads(v) if v else None

    def create_session(self, settings: dict) -> None:
        if self.session() is not None:
            raise StoreError(f"{self.path} already holds session {self.session()['session_id']:#018x}")
        self._set_meta("session", json.dumps(settings, sort_keys=True))

    # ------------------------------------------------------------ service user identifiers (CP)
    def service_user_ids(self) -> set[bytes]:
        with self._lock:
            return {bytes(r[0]) for r in self._db.execute("SELECT ident FROM service_user_ids")}

    def add_service_user_id(self, ident: bytes) -> None:
        if not 1 <= len(ident) <= 253:
            raise StoreError("a service user identifier is 1..253 bytes (profile A.6)")
        self._exec(("INSERT OR IGNORE INTO service_user_ids VALUES (?)", (bytes(ident),)))

    def remove_service_user_id(self, ident: bytes) -> bool:
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM service_user_ids WHERE ident=?", (bytes(ident),)).fetchone()[0]
            self._exec(("DELETE FROM service_user_ids WHERE ident=?", (bytes(ident),)))
        return bool(n)

    # ------------------------------------------------------------ operator requests (opreq.py)
    # A command in another process (`tessera sm rekey`, `tessera sm truncate`) cannot reach the
    # serving SM's engine; it writes a request row, the SM acts on it at its next tick and
    # writes the result back (no key material in either). docs/rmcp2.md "Operator requests".
    def add_request(self, op: str, arg: dict, now: float) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the bound and the new id hold across processes
            try:
                n = self._db.execute("SELECT COUNT(*) FROM requests WHERE state='pending'").fetchone()[0]
                if n >= MAX_REQUESTS:
                    raise StoreError(f"{n} operator requests are already waiting for the SM (is it serving?)")
                self._db.execute("DELETE FROM requests WHERE state!='pending' AND created<?", (now - 3600,))
                rid = self._db.execute("INSERT INTO requests (op, arg, state, created) VALUES (?, ?, 'pending', ?)",
                                       (op, json.dumps(arg, sort_keys=True), now)).lastrowid
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return rid

    def pending_requests(self) -> list[tuple[int, str, dict]]:
        """Pending requests in order; a row whose argument is not a JSON object is answered
        "failed" here (whoever wrote it, the serving SM does not stop over it)."""
        with self._lock:
            rows = self._db.execute("SELECT id, op, arg FROM requests WHERE state='pending' ORDER BY id").fetchall()
        out = []
        for i, op, arg in rows:
            try:
                a = json.loads(arg)
            except (ValueError, TypeError):
                a = None
            if isinstance(a, dict) and isinstance(op, str):
                out.append((i, op, a))
            else:
                self.finish_request(i, False, {"error": "malformed request"})
        return out

    def finish_request(self, rid: int, ok: bool, result: dict) -> None:
        self._exec(("UPDATE requests SET state=?, result=? WHERE id=? AND state='pending'",
                    ("done" if ok else "failed", json.dumps(result, sort_keys=True), rid)))

    def request(self, rid: int) -> tuple[str, dict | None] | None:
        """(state, result) of a request: "pending", "done" or "failed"; None if withdrawn."""
        with self._lock:
            row = self._db.execute("SELECT state, result FROM requests WHERE id=?", (rid,)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]) if row[1] else None)

    def withdraw_request(self, rid: int, answered: bool = False) -> bool:
        """Delete a request still pending (answered=False: False when the SM took it up
        meanwhile) or one answered and read (answered=True)."""
        with self._lock:
            cur = self._db.execute(f"DELETE FROM requests WHERE id=? AND state{'!=' if answered else '='}'pending'",
                                   (rid,))
        return cur.rowcount > 0

    def overview(self) -> dict:
        """What `status` shows, without key material: members, ACL, the Ks generation."""
        with self._lock:
            ks = self._db.execute("SELECT gen, mode, since FROM ks WHERE slot='current'").fetchone()
            members = self._db.execute("SELECT maid, nt, policy, hashed_maid FROM members ORDER BY maid").fetchall()
            acl = self._db.execute("SELECT hashed_maid, hashed_ktls FROM acl ORDER BY hashed_maid").fetchall()
        return {"ks": ks, "state": json.loads(self._meta("state") or "null"),
                "members": [(bytes(m), nt, pol, bytes(hm)) for m, nt, pol, hm in members],
                "acl": [(bytes(a), bytes(b)) for a, b in acl]}

    # ------------------------------------------------------------ journal (called by sm.py)
    def put_session(self, sm) -> None:
        pol = sm.policy
        v = None if pol is None else [int(pol.gp_attribute), int(pol.gk_mecha), int(pol.gk_name),
                                       int(pol.con_en_dec), int(pol.gk_en_dec), int(pol.auth)]
        self._set_meta("state", json.dumps({"policy": v, "open": sm.open_to_rmas, "created": sm.created}))

    def put_ks(self, sm) -> None:
        stmts = [("INSERT OR REPLACE INTO ks VALUES ('current', ?, ?, ?, 0, ?)",
                  (sm.ks.gen, int(sm.ks_mode), sm.ks_since, self._sealer.seal(f"ks:{sm.ks.gen}", sm._ks_raw)))]
        if sm.ks_prev is None:
            stmts.append(("DELETE FROM ks WHERE slot='prev'", ()))
        else:
            stmts.append(("INSERT OR REPLACE INTO ks VALUES ('prev', ?, 0, 0, ?, ?)",
                          (sm.ks_prev.gen, sm.ks_prev_until, self._sealer.seal(f"ks:{sm.ks_prev.gen}", sm.ks_prev._raw))))
        keep = (sm.ks.gen, sm.ks_prev.gen if sm.ks_prev else sm.ks.gen)
        stmts.append(("DELETE FROM windows WHERE ref=? AND gen NOT IN (?, ?)", (int(P.KeyRef.KS), *keep)))
        self._exec(*stmts)

    def put_member(self, m) -> None:
        maid = bytes(m.maid)
        stmts = [("INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (maid, int(m.nt), m.cert_sha256, m.hashed_maid, m.hashed_ktls,
                   self._sealer.seal(f"ktls:{maid.hex()}", m.ktls._raw), m.secagreq.encode() if m.secagreq else None,
                   m.policy, m.policy_deadline, int(m.suite.enc), int(m.suite.auth), m.tx_reserved,
                   int(m.ks_pending)))]
        if m.nt == C.NodeType.RMA and m.policy == "ok":
            stmts.append(("INSERT OR REPLACE INTO acl VALUES (?, ?)", (m.hashed_maid, m.hashed_ktls)))
        else:
            stmts.append(("DELETE FROM acl WHERE hashed_maid=?", (m.hashed_maid,)))
        self._exec(*stmts)

    def drop_member(self, maid: bytes) -> None:
        maid = bytes(maid)
        with self._lock:
            row = self._db.execute("SELECT hashed_maid FROM members WHERE maid=?", (maid,)).fetchone()
        self._exec(("DELETE FROM members WHERE maid=?", (maid,)), ("DELETE FROM windows WHERE maid=?", (maid,)),
                   ("DELETE FROM acl WHERE hashed_maid=?", (row[0] if row else b"",)))

    def put_window(self, m, ref: int, gen: int) -> None:
        w = m.windows.get((ref, gen))
        if w is not None:
            self._exec(("INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?)",
                        (bytes(m.maid), int(ref), int(gen), w.high, w.seen)))

    # ------------------------------------------------------------ restore
    def restore(self, sm) -> None:
        """Put the stored state into a freshly made engine (before any connection)."""
        from tessera.rmcp2 import sm as S  # the engine module imports nothing from here
        with self._lock:
            ks_rows = {r[0]: r[1:] for r in self._db.execute("SELECT slot, gen, mode, since, until, blob FROM ks")}
            members = self._db.execute("SELECT * FROM members").fetchall()
            windows = self._db.execute("SELECT maid, ref, gen, high, bits FROM windows").fetchall()
            acl = self._db.execute("SELECT hashed_maid, hashed_ktls FROM acl").fetchall()
        sm.service_user_ids = self.service_user_ids()
        st = json.loads(self._meta("state") or "null")
        if st:
            sm.created, sm.open_to_rmas = st["created"], st["open"]
            if st["policy"]:
                p = st["policy"]
                sm.policy = S.Policy(C.GpAttribute(p[0]), C.GkMecha(p[1]), C.GkName(p[2]), C.EnDecId(p[3]),
                                     C.EnDecId(p[4]), C.AuthId(p[5]))
        if "current" in ks_rows:
            gen, mode, since, _, blob = ks_rows["current"]
            sm._ks_raw = self._sealer.open(f"ks:{gen}", blob)
            sm.ks, sm.ks_mode, sm.ks_since = P.ProtKey(P.KeyRef.KS, sm._ks_raw, gen), C.KeyMode(mode), since
        if "prev" in ks_rows:
            gen, _, _, until, blob = ks_rows["prev"]
            sm.ks_prev, sm.ks_prev_until = P.ProtKey(P.KeyRef.KS, self._sealer.open(f"ks:{gen}", blob), gen), until
        sm.members.clear()
        for (maid, nt, cert, hm, hk, kt, sag, pol, dl, enc, auth, txr, pend) in members:
            maid = bytes(maid)
            m = S.Member(maid, C.NodeType(nt), P.ProtKey(P.KeyRef.KTLS, self._sealer.open(f"ktls:{maid.hex()}", kt)),
                         bytes(cert), bytes(hm), bytes(hk), secagreq=C.decode(bytes(sag)) if sag else None,
                         policy=pol, policy_deadline=dl, suite=P.Suite(C.EnDecId(enc), C.AuthId(auth)),
                         tx_seq=txr, tx_reserved=txr, ks_pending=bool(pend))
            m.windows[(P.KeyRef.KTLS, 0)] = P.ReplayWindow()
            if m.nt != C.NodeType.RMA:
                for k in (sm.ks, sm.ks_prev):
                    if k is not None:
                        m.windows[(P.KeyRef.KS, k.gen)] = P.ReplayWindow()
            sm.members[maid] = m
        for maid, ref, gen, high, bits in windows:
            m = sm.members.get(bytes(maid))
            if m is not None and (ref, gen) in m.windows:
                m.windows[(ref, gen)].high, m.windows[(ref, gen)].seen = high, bits
        sm.acl = {bytes(a): bytes(b) for a, b in acl}
        sm.journal = self
        log.info("rmcp2 store: restored %d members, %d ACL entries, Ks generation %d from %s",
                 len(sm.members), len(sm.acl), sm.ks.gen, self.path)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                    for t in ("members", "acl", "service_user_ids", "windows")}


def open_engine(store: SmStore, config=None, now: float = 0.0, rand=os.urandom):
    """The session manager of `store`: restored if the store holds a session, else created
    from `config` (an sm.SmConfig) with its bootstrap Ks journalled before anything is sent."""
    from tessera.rmcp2 import sm as S
    settings = store.session()
    if settings is None:
        if config is None:
            raise StoreError(f"{store.path} holds no session; create one first (tessera sm serve --session-id ...)")
        d = {k: getattr(config, k) for k in S.SmConfig.__dataclass_fields__}
        d["maid"], d["modules"] = config.maid.hex(), sorted(int(x) for x in config.modules)
        store.create_session(d)
        eng = S.SessionManager(config, rand=rand, now=now)
        eng.journal = store
        store.put_ks(eng)
        store.put_session(eng)
        return eng
    d = dict(settings)
    d["maid"], d["modules"] = bytes.fromhex(d["maid"]), frozenset(d["modules"])
    eng = S.SessionManager(S.SmConfig(**d), rand=rand, now=now)
    store.restore(eng)
    return eng
