"""Gap 1: 430-2 roles. The responder accepts only initiators whose leaf role is allowed
(SM by default); the initiator accepts only responders with an expected SPB role."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
from hypothesis import given, settings, strategies as st

from tessera.asm.initiator import Initiator, LinkFailure
from tessera.asm.net import INITIATOR_ROLES, RESPONDER_ROLES, PeerRejected, RoleRefused
from tessera.asm.tls import TLSProfileError
from tessera.cli import main
from tessera.pki import certs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class _CN:
    """Just enough of a certificate for certs.leaf_roles."""

    def __init__(self, cn: str) -> None:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.mark.parametrize("cn, roles", [
    ("SM.initiator", {"SM"}), ("LD.ldb-1.example", {"LD"}), ("SM LS.mb1", {"SM", "LS"}),
    ("noroles", set()), ("SM.", set()), (".x", set()),
])
def test_leaf_roles(cn, roles):
    assert certs.leaf_roles(_CN(cn)) == roles


@settings(deadline=None, max_examples=200)
@given(st.lists(st.sampled_from(["SM", "LD", "LE", "PR", "MB", "CS", "LS"]), min_size=1, max_size=3),
       st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,20}", fullmatch=True))
def test_leaf_roles_property(roles, name):
    assert certs.leaf_roles(_CN(" ".join(roles) + "." + name)) == set(roles)


def test_defaults():
    assert INITIATOR_ROLES == {"SM"}
    assert "SM" not in RESPONDER_ROLES and "LD" in RESPONDER_ROLES


def _events(r, kind="LinkException"):
    time.sleep(0.2)
    return [(e, r.responder.log.get(e[0]).decode()) for e in r.responder.log.events() if e[3] == kind]


def test_responder_refuses_initiator_without_sm_role(pki, responder, caplog):
    """LD.responder is a valid 430-2 leaf under the trusted root, but not a Security Manager."""
    async def attempt(name):
        async with Initiator("127.0.0.1", responder.port, creds=pki.creds(name), connect_timeout=3) as ini:
            return await ini.get_time()

    with caplog.at_level(logging.WARNING, logger="tessera.asm.responder"):
        with pytest.raises((TLSProfileError, ConnectionError, LinkFailure)):
            run(attempt("responder"))
        time.sleep(0.2)
    refused = [x for e, x in _events(responder) if "<Name>RoleRefused</Name>" in x]
    assert refused  # one per attempt: the initiator's link-failure restart tries once more
    thumb = certs.thumbprint(pki.chain.leaves["responder"].cert)
    assert "LD.responder" in refused[0] and "accepted for the initiator: SM" in refused[0]
    assert thumb in refused[0]  # who was refused is in the security record
    assert any("initiator refused" in r.getMessage() and "LD.responder" in r.getMessage() for r in caplog.records)
    assert not any(e[3] == "LinkOpened" and e[4] == thumb for e in responder.responder.log.events())
    assert run(attempt("initiator")).response == 0  # an SM still gets in


def test_initiator_roles_configurable(pki, start_responder):
    r = start_responder(initiator_roles=frozenset({"SM", "LD"}))

    async def go():
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("responder")) as ini:
            return await ini.get_time()

    assert run(go()).response == 0
    assert not [x for _, x in _events(r) if "RoleRefused" in x]


def test_initiator_refuses_responder_with_sm_role(pki, start_responder, caplog):
    r = start_responder(name="other")  # SM.other: valid chain, but not an SPB role

    async def go(roles=None):
        async with Initiator("127.0.0.1", r.port, creds=pki.creds("initiator"), responder_roles=roles) as ini:
            return await ini.get_time()

    with caplog.at_level(logging.WARNING, logger="tessera.asm.security"):
        with pytest.raises(RoleRefused, match=r"'SM.other' has role\(s\) SM; accepted for the responder: LD,LE,PR"):
            run(go())
    assert any("security event" in rec.getMessage() and "SM.other" in rec.getMessage() for rec in caplog.records)
    assert isinstance(RoleRefused("x", frozenset(), frozenset({"LD"}), "responder", "t"), PeerRejected)
    assert run(go(frozenset({"SM"}))).response == 0  # configurable
    # the CLI reports the refusal cleanly (exit 2), and accepts --responder-role
    common = ["--pki", str(pki.dir), "--port", str(r.port)]
    assert main(["asm", "get-time", *common]) == 2
    assert main(["asm", "get-time", "--responder-role", "SM", *common]) == 0
