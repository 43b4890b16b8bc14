"""Board profiles: boards/<name>/board.json, machine-readable budgets for each target."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tessera.errors import TesseraError
from tessera.paths import boards_dir


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    mpy_arch: str
    heap_bytes: int
    flash_budget_bytes: int
    has_md5: bool = True
    transport: dict[str, Any] = field(default_factory=dict)
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
            raw=d,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise TesseraError(f"{path}: invalid board profile ({exc})") from None


def load_all() -> list[BoardProfile]:
    return [load(n) for n in board_names()]
