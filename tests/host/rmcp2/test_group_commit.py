"""The SM's group commit (store.deferred / SmServer._flush, docs/rmcp2.md): writes made for
received messages wait in one transaction, and no answer reaches a socket while any of them
is uncommitted; a failing statement undoes only its own group."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from tessera.rmcp2 import codec as C
from tessera.rmcp2 import store as ST

from .test_net import Session, run
from .test_net import pki  # noqa: F401 (fixture)


def committed_ids(path) -> set[bytes]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {bytes(r[0]) for r in con.execute("SELECT ident FROM service_user_ids")}
    finally:
        con.close()


def test_deferred_writes_wait_for_commit_and_a_failing_group_undoes_only_itself(tmp_path):
    store = ST.SmStore(tmp_path / "sm.sqlite", key=bytes(32))
    with store.deferred():
        store.add_service_user_id(b"first")
        with pytest.raises(sqlite3.OperationalError):
            store._exec(("INSERT INTO service_user_ids VALUES (?)", (b"second",)), ("INSERT INTO nowhere VALUES (1)", ()))
        store.add_service_user_id(b"third")
    assert store.pending and committed_ids(store.path) == set()  # nothing durable before commit
    assert store.service_user_ids() == {b"first", b"third"}  # "second" went with its group
    store.commit()
    assert not store.pending and committed_ids(store.path) == {b"first", b"third"}
    store.add_service_user_id(b"fourth")  # outside deferred(): committed at once, as before
    assert committed_ids(store.path) == {b"first", b"third", b"fourth"}
    store.close()


def test_no_answer_leaves_while_its_change_is_uncommitted(pki, tmp_path, monkeypatch):
    writes: list[bool] = []  # store.pending at each socket write of the SM

    async def main():
        async with Session(pki[0], tmp_path, n_dmas=1) as s:
            srv = s.server
            real_write = asyncio.StreamWriter.write

            def write(w, data):
                if w in srv.writers.values():
                    writes.append(srv.store.pending)
                return real_write(w, data)
            monkeypatch.setattr(asyncio.StreamWriter, "write", write)
            before = srv.store.commits
            agents = await asyncio.gather(*(s.rma(f"rma{i}", 100 + i) for i in range(4)))
            assert [a.state for a in agents] == ["ready"] * 4
            assert len(srv.sm.acl) == 4 and srv.store.commits > before
    run(main())
    # 4 x (KTLSANS, SUBSANS, SECLIST) at least, none written over an open transaction
    assert len(writes) >= 12 and not any(writes)
