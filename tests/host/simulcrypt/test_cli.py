"""The `tessera simulcrypt` command group: key store and clean errors."""
import pytest

from tessera.cli import main


def test_keys_and_errors(tmp_path, capsys):
    db = str(tmp_path / "k.sqlite")
    assert main(["simulcrypt", "--db", db, "keys", "add", "--kind", "SEK", "--owner", "0x00010001", "--scope", "0x101"]) == 0
    assert main(["simulcrypt", "--db", db, "keys", "list"]) == 0
    out = capsys.readouterr().out
    assert "SEK owner 0x00010001 scope 0x0101 id 1 (128 bits)" in out
    # refused with a clean error (exit 2), no traceback
    assert main(["simulcrypt", "--db", db, "keys", "add", "--kind", "SEK", "--owner", "0x00030001"]) == 2
    assert main(["simulcrypt", "--db", db, "keys", "add", "--kind", "LTK", "--owner", "0x00020001"]) == 2
    assert main(["simulcrypt", "--db", db, "ltkm-generator", "--mux", "127.0.0.1:1", "--client-id", "0x00020001",
                 "--key-owner", "1", "--key-scope", "1"]) == 2
    assert main(["simulcrypt", "--db", db, "scs", "--service", "x", "--generator", "nonsense"]) == 2
    assert main(["simulcrypt", "--db", db, "scs", "--service", "x", "--generator", "127.0.0.1:1:0x00010001:1"]) == 2
    with pytest.raises(SystemExit):
        main(["simulcrypt", "keys", "add", "--kind", "XXX", "--owner", "1"])


def generator_caps(*opts):
    from tessera.cli import build_parser
    from tessera.simulcrypt.cli import _caps

    return _caps(build_parser().parse_args(["simulcrypt", "stkm-generator", "--super-cas-id", "0x00010001", *opts]))


def test_generator_optional_delays():
    caps = generator_caps("--delay-start", "-100", "--ac-delay-start", "-300", "--transition-delay-stop", "250")
    params = dict(caps.params())
    from tessera.simulcrypt.tables import EP

    assert params[EP.AC_DELAY_START] == -300 and params[EP.TRANSITION_DELAY_STOP] == 250
    assert params[EP.TRANSITION_DELAY_START] == -100 and params[EP.AC_DELAY_STOP] == 0  # default: the delay_* value
    with pytest.raises(SystemExit):
        generator_caps("--ac-delay-stop", "40000")  # does not fit the signed 16-bit parameter


def test_mux_channels_per_client_validated():
    assert main(["simulcrypt", "mux", "--channels-per-client", "0"]) == 2


def test_generator_lead_cw_and_cw_per_msg(tmp_path):
    caps = generator_caps()
    assert (caps.lead_cw, caps.cw_per_msg) == (1, 2)  # the defaults
    caps = generator_caps("--lead-cw", "2", "--cw-per-msg", "3")
    assert (caps.lead_cw, caps.cw_per_msg) == (2, 3)
    assert generator_caps("--lead-cw", "0", "--cw-per-msg", "1").cw_per_msg == 1
    db = str(tmp_path / "k.sqlite")
    gen = ["simulcrypt", "--db", db, "stkm-generator", "--super-cas-id", "0x00010001"]
    # refused cleanly (exit 2) before any server starts
    assert main(gen + ["--cw-per-msg", "0"]) == 2
    assert main(gen + ["--lead-cw", "3", "--cw-per-msg", "2"]) == 2
    for bad in (["--cw-per-msg", "256"], ["--lead-cw", "-1"], ["--lead-cw", "x"]):
        with pytest.raises(SystemExit):
            main(gen + bad)


def test_no_secret_on_the_command_line():
    """Issue 11 #13: no `tessera simulcrypt` option takes key material. Keys are generated
    into the store (`keys add` prints no material); the one private key an option names,
    --tls-key, is a file path."""
    import argparse
    import re

    from tessera.cli import build_parser

    def walk(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from walk(sub)
            else:
                yield from a.option_strings

    sc = build_parser()._subparsers._group_actions[0].choices["simulcrypt"]
    options = set(walk(sc))
    suspicious = {o for o in options if re.search(r"secret|pass|material|psk|setup|^--key$|-key$", o)}
    assert suspicious == {"--tls-key"}
    assert "--tls-key" in options and "--key-owner" in options  # ids, not keys


def test_server_access_options_validated(tmp_path):
    from tessera.simulcrypt.cli import _allow, _udp_sources

    assert _allow(["10.0.0.5=0x00010001,0x00010002", "10.0.0.6"]) == {"10.0.0.5": {0x00010001, 0x00010002},
                                                                       "10.0.0.6": None}
    assert _allow(["10.0.0.5=1", "10.0.0.5"]) == {"10.0.0.5": None}
    assert _udp_sources(["0x00010007=127.0.0.3,::1"]) == {0x00010007: {"127.0.0.3", "::1"}}
    db = str(tmp_path / "k.sqlite")
    assert main(["simulcrypt", "mux", "--allow", "not-an-address"]) == 2
    assert main(["simulcrypt", "mux", "--udp-source", "0x00010007=nowhere"]) == 2
    assert main(["simulcrypt", "mux", "--max-per-peer", "0"]) == 2
    assert main(["simulcrypt", "--db", db, "stkm-generator", "--super-cas-id", "0x00010001",
                 "--tls-cert", "x.pem"]) == 2  # TLS needs all three files
    assert main(["simulcrypt", "--db", db, "stkm-generator", "--super-cas-id", "0x00010001",
                 "--tls-cert", "x.pem", "--tls-key", "x.key", "--tls-ca", "ca.pem"]) == 2  # unreadable: clean error
