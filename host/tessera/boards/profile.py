"""Board profiles: boards/<name>/board.json, machine-readable budgets for each target."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tessera.errors import TesseraError
from tessera.paths import boards_dir


@dataclass(frozen=True)
class BoardSpeed:
    """How fast the real board is: its clock and the board's seconds for the calibration
    operation (boards/<name>/board.json "speed"; figures and sources in docs/boards.md)."""

    clock_hz: int
    pow_g_s: float  # pow(2, x, p): 2048-bit p, 256-bit x
    pow_y_s: float  # pow(y, x, p)
    source: str

    @property
    def dh_s(self) -> float:
        """Both exponentiations: what one DH agreement (an MKU_START) costs the board."""
        return self.pow_g_s + self.pow_y_s


def _speed(d: dict[str, Any] | None) -> BoardSpeed | None:
    if d is None:
        return None
    clock = int(d["clock_hz"])
    cal = d["calibration"]

    def secs(op: str) -> float:
        if f"{op}_s" in cal:
            return float(cal[f"{op}_s"])
        return int(cal[f"{op}_cycles"]) / clock

    sp = BoardSpeed(clock, secs("pow_g"), secs("pow_y"), str(cal["source"]))
    if clock <= 0 or sp.pow_g_s <= 0 or sp.pow_y_s <= 0:
        raise ValueError("speed figures must be positive")
    return sp


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    mpy_arch: str
    heap_bytes: int
    flash_budget_bytes: int
    has_md5: bool = True
    transport: dict[str, Any] = field(default_factory=dict)
    speed: BoardSpeed | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def heapsize_arg(self) -> str:
        """The value for `micropython -X heapsize=` that imposes this board's heap."""
        return str(self.heap_bytes)


def board_names() -> list[str]:
    return sorted(p.parent.name for p in boards_dir().glob("*/board.json"))


def load(name: str) -> BoardProfile:
    path = boards_dir() / name / "board.json"
    if not path.is_file():
        raise TesseraError(f"unknown board {name!r}; known boards: {', '.join(board_names())}")
    try:
        d = json.loads(path.read_text())
        return BoardProfile(
            name=d["name"],
            description=d["description"],
            mpy_arch=d["mpy_arch"],
            heap_bytes=int(d["heap_bytes"]),
            flash_budget_bytes=int(d["flash_budget_bytes"]),
            has_md5=bool(d.get("has_md5", True)),
            transport=dict(d.get("transport", {})),
            speed=_speed(d.get("speed")),
            raw=d,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise TesseraError(f"{path}: invalid board profile ({exc})") from None


def load_all() -> list[BoardProfile]:
    return [load(n) for n in board_names()]
