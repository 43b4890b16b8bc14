"""`tessera demo`: end-to-end scenarios on embedded defaults (SQLite, loopback, virtual boards).

Scenarios are discovered: a module `tessera.<name>.demo` (and any `tessera.<name>.demo_<what>`
beside it) with TITLE, ORDER and
run(ctx: DemoContext) is one scenario. They run in ORDER; the board scenario (ORDER 0)
starts and deploys the virtual boards that later scenarios use through ctx.boards.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import pkgutil
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tessera
from tessera.paths import var_dir

log = logging.getLogger("tessera.demo")


@dataclass
class DemoContext:
    workdir: Path
    boards: dict = field(default_factory=dict)  # board name -> tessera.boards.ops.Target
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    facts: dict[str, list[str]] = field(default_factory=dict)  # scenario title -> one-line results
    current: str = ""

    def step(self, msg: str) -> None:
        log.info("  - %s", msg)

    def fact(self, msg: str) -> None:
        self.facts.setdefault(self.current, []).append(msg)
        log.info("  * %s", msg)


def scenarios() -> list:
    mods = []
    for m in pkgutil.iter_modules(tessera.__path__):
        if m.ispkg and importlib.util.find_spec(f"tessera.{m.name}.demo"):
            mods.append(importlib.import_module(f"tessera.{m.name}.demo"))
            pkg = importlib.import_module(f"tessera.{m.name}")
            # a protocol with more than one scenario adds modules demo_<what>.py beside demo.py
            mods += [importlib.import_module(f"tessera.{m.name}.{sub.name}") for sub in pkgutil.iter_modules(pkg.__path__)
                     if sub.name.startswith("demo_")]
    return sorted(mods, key=lambda mod: (mod.ORDER, mod.__name__))


def run_demo(only: list[str] | None = None, keep: bool = False) -> int:
    work = var_dir() / "demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = DemoContext(workdir=work)
    results: list[tuple[str, bool, float, str]] = []
    mods = scenarios()
    if only:
        mods = [m for m in mods if m.__name__.split(".")[1] in only or m.ORDER == 0]
    try:
        for mod in mods:
            log.info("== %s", mod.TITLE)
            ctx.current = mod.TITLE
            t0 = time.monotonic()
            try:
                mod.run(ctx)
                results.append((mod.TITLE, True, time.monotonic() - t0, ""))
            except Exception as exc:  # a failed scenario is reported, the rest still run
                log.exception("scenario failed: %s", mod.TITLE)
                results.append((mod.TITLE, False, time.monotonic() - t0, f"{type(exc).__name__}: {exc}"))
                if mod.ORDER == 0:
                    break  # later scenarios need the boards
    finally:
        if not keep:
            for fn in reversed(ctx.cleanups):
                try:
                    fn()
                except Exception:  # cleanup must not hide the summary
                    log.warning("cleanup failed", exc_info=True)
    sys.stderr.flush()
    print("\nTessera demo summary")
    for title, ok, secs, why in results:
        print(f"  [{'PASS' if ok else 'FAIL'}] {title} ({secs:.1f}s){'  ' + why if why else ''}")
        for f in ctx.facts.get(title, []):
            print(f"         {f}")
    failed = sum(1 for r in results if not r[1])
    print(f"{len(results) - failed} of {len(results)} scenarios passed", flush=True)
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on virtual boards and loopback",
                       description="Boots virtual boards of every profile, deploys the firmware, "
                       "runs every protocol scenario and prints a summary.")
    p.add_argument("--only", nargs="+", metavar="PROTOCOL", help="run only these scenarios (e.g. scpm asm)")
    p.add_argument("--keep", action="store_true", help="leave virtual boards running afterwards")
    p.set_defaults(func=lambda a: run_demo(a.only, a.keep))
