# JSON configuration files on the board's filesystem (scpm.json, wlan.json).


def load(path):
    """The JSON object in `path`, or None when there is no such file. A file that is there
    but not a JSON object raises ValueError naming the file (never its contents)."""
    import json

    try:
        f = open(path)
    except OSError:
        return None
    try:
        cfg = json.load(f)
    except ValueError:
        raise ValueError(path + ": not valid JSON")
    finally:
        f.close()
    if not isinstance(cfg, dict):
        raise ValueError(path + ": must be a JSON object")
    return cfg
