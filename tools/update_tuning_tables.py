"""Rebuild the dispatcher's shipped tables (vnm_compile/kernels/tables/<gpu>.json) from the committed
benchmark results (benchmarks/results/<gpu>/linear.json), keeping only the fields the dispatcher reads.

    python tools/update_tuning_tables.py            # every GPU with a linear.json
    python tools/update_tuning_tables.py --check    # exit 1 when a shipped table is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vnm_compile.kernels.tables import project, shipped_table  # noqa: E402


def render(linear_json: Path) -> str:
    table = json.loads(linear_json.read_text())
    return json.dumps(project(table, linear_json.relative_to(ROOT).as_posix()), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the shipped tables are current")
    args = parser.parse_args(argv)
    stale = []
    for linear_json in sorted((ROOT / "benchmarks" / "results").glob("*/linear.json")):
        target = shipped_table(linear_json.parent.name)
        text = render(linear_json)
        if target.is_file() and target.read_text() == text:
            continue
        if args.check:
            stale.append(target)
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
    for path in stale:
        print(f"out of date: {path.relative_to(ROOT)} (run python tools/update_tuning_tables.py)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
