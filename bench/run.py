"""Run the benchmarks and rewrite their sections of docs/benchmarks.md.

Each bench/bench_<name>.py prints one Markdown section on stdout (progress goes to
stderr). Its output replaces the block between `<!-- bench:<name> -->` and
`<!-- /bench:<name> -->` in docs/benchmarks.md, so benches can be rerun one at a time:
    python bench/run.py            # all
    python bench/run.py crypto     # just bench_crypto.py
"""
from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Written by `make bench` (bench/run.py); each section is the stdout of one bench/bench_*.py,
regenerated with its date. Ratios are measured side by side in the same run, so they carry
across machines better than the absolute figures, which come from the machine named in each
section. Firmware figures come from the MicroPython unix port under the board heap limit.
"""


def run_one(path: Path) -> str:
    print(f"running {path.name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        raise SystemExit(f"{path.name} failed with exit status {proc.returncode}")
    stamp = datetime.date.today().isoformat()
    return f"{proc.stdout.rstrip()}\n\n_Measured {stamp} on {platform.machine()} {platform.python_implementation()} {platform.python_version()}, `python bench/run.py {path.stem[6:]}`._\n"


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem[6:] for p in HERE.glob("bench_*.py"))
    text = DOC.read_text() if DOC.exists() else HEADER
    for name in names:
        path = HERE / f"bench_{name}.py"
        if not path.exists():
            raise SystemExit(f"no such benchmark: {path}")
        body = run_one(path)
        block = f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->"
        pat = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
        text = pat.sub(lambda _m: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"updated {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
