"""Helpers: every printable form a key could take in a log line, a message or a file."""
from __future__ import annotations

import base64


def forms(secret: bytes) -> list[str]:
    """hex (both cases, with and without separators), bytes-repr escapes, base64."""
    h = secret.hex()
    return [h, h.upper(), secret.hex(" "), secret.hex(":"), repr(secret)[2:-1],
            base64.b64encode(secret).decode().rstrip("=")]


def find_leaks(secrets: dict[str, bytes], text: str, raw: bytes = b"") -> list[str]:
    """Names of the secrets that appear in `text` (any form) or in `raw` (as bytes)."""
    found = []
    for name, s in secrets.items():
        if any(f in text for f in forms(s)) or (raw and s in raw):
            found.append(name)
    return found
