# WLAN bring-up (tessera_fw/net.py) against a stand-in `network` module: the radio itself
# is not on a virtual board, but the config handling, the wait and the timeout are.
import os

from mpytest import raises

from tessera_fw import net

CFG = "_wlan_test.json"


class FakeWLAN:
    def __init__(self, up_after):
        self.up_after = up_after  # isconnected() calls before the link is up
        self.calls = 0
        self.joined = None
        self.on = False

    def active(self, on=None):
        if on is not None:
            self.on = on
        return self.on

    def isconnected(self):
        self.calls += 1
        return self.joined is not None and self.calls > self.up_after

    def connect(self, ssid, pw):
        self.joined = (ssid, pw)

    def ifconfig(self):
        return ("192.168.4.7", "255.255.255.0", "192.168.4.1", "192.168.4.1")


class FakeNetwork:
    STA_IF = 0

    def __init__(self, up_after):
        self.sta = FakeWLAN(up_after)
        self.name = None

    def WLAN(self, which):
        return self.sta

    def hostname(self, name):
        self.name = name


def _write(text):
    with open(CFG, "w") as f:
        f.write(text)


def _cleanup():
    try:
        os.remove(CFG)
    except OSError:
        pass


def test_no_config_is_left_alone():
    _cleanup()
    assert net.wlan_up(CFG, network=FakeNetwork(0)) is None


def test_connects_and_waits_for_the_link():
    _write('{"ssid": "home", "password": "s3cret", "hostname": "meter-1"}')
    fake = FakeNetwork(3)
    slept = []
    lines = []
    try:
        ip = net.wlan_up(CFG, network=fake, sleep_ms=slept.append, log=lines.append)
    finally:
        _cleanup()
    assert ip == "192.168.4.7"
    assert fake.sta.joined == ("home", "s3cret") and fake.sta.on and fake.name == "meter-1"
    assert len(slept) >= 2
    assert "s3cret" not in lines[0] and "192.168.4.7" in lines[0]


def test_timeout_raises_without_the_password():
    _write('{"ssid": "home", "password": "s3cret", "timeout_s": 1}')
    fake = FakeNetwork(10 ** 6)
    try:
        e = raises(OSError, net.wlan_up, CFG, network=fake, sleep_ms=lambda ms: None, log=lambda s: None)
    finally:
        _cleanup()
    assert "no link" in str(e) and "s3cret" not in str(e)
    assert not fake.sta.on  # radio switched off again


def test_bad_config_is_a_clear_error():
    for text in ("not json", '{"password": "x"}', '{"ssid": ""}', '{"ssid": "a", "password": 5}', "[1]"):
        _write(text)
        try:
            e = raises(ValueError, net.wlan_up, CFG, network=FakeNetwork(0))
        finally:
            _cleanup()
        assert CFG in str(e), text


def test_unix_port_without_network_module_boots_as_before():
    # the firmware tests run on the unix port, which has no `network` module (virtual
    # boards use the host's network): wlan_up() must then do nothing, config or not
    raises(ImportError, __import__, "network")
    _write('{"ssid": "home"}')
    try:
        assert net.wlan_up(CFG) is None
    finally:
        _cleanup()
