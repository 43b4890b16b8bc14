# Network bring-up for boards (called from boot.py). Credentials live in a file on the
# board's filesystem (wlan.json), never in the firmware image:
#   {"ssid": "home", "password": "...", "hostname": "meter-1", "timeout_s": 15}
# Boards without a `network` module (the unix port, i.e. virtual boards, which use the
# host's network) and boards without wlan.json are left alone.
import time

CONFIG = "wlan.json"


def _load(path):
    from tessera_fw import config

    cfg = config.load(path)
    if cfg is None:
        return None
    if not isinstance(cfg.get("ssid"), str) or not cfg["ssid"]:
        raise ValueError(path + ": needs a non-empty \"ssid\"")
    pw = cfg.get("password", "")
    if not isinstance(pw, str):
        raise ValueError(path + ": \"password\" must be a string")
    return cfg


def wlan_up(path=CONFIG, network=None, sleep_ms=None, log=print):
    """Connect the station interface with the credentials in `path`. Returns the IP
    address, or None when there is nothing to do (no network module, no config). Raises
    OSError when the link does not come up in time (the password never appears in a
    message). `network` and `sleep_ms` are injectable for tests."""
    cfg = _load(path)
    if cfg is None:
        return None
    if network is None:
        try:
            import network
        except ImportError:
            return None
    if sleep_ms is None:
        sleep_ms = time.sleep_ms
    name = cfg.get("hostname")
    if name:
        try:
            network.hostname(name)
        except (AttributeError, ValueError, OSError):
            pass  # older firmware: no network.hostname()
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    if not sta.isconnected():
        sta.connect(cfg["ssid"], cfg.get("password", ""))
        waited = 0
        limit = int(cfg.get("timeout_s", 15)) * 1000
        while not sta.isconnected():
            if waited >= limit:
                sta.active(False)
                raise OSError("WLAN %r: no link after %d s" % (cfg["ssid"], limit // 1000))
            sleep_ms(100)
            waited += 100
    ip = sta.ifconfig()[0]
    log("WLAN %r up: %s" % (cfg["ssid"], ip))
    return ip
