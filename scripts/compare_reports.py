#!/usr/bin/env python3
"""Compare two demo ``report.json`` files: the same structure, strings and verdicts, and every
number equal within float rounding. Timings, versions, commit, command, store paths, the device,
the model's file info and the demo's output settings are ignored.

    python3 scripts/compare_reports.py OLD/report.json NEW/report.json [--rtol 1e-4]

Prints every non-numeric difference and the largest relative difference between two numbers;
exits 1 if there is a non-numeric difference or a number differs by more than ``--rtol``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

IGNORED = {"timings", "versions", "commit", "command", "stores", "device", "model_info", "demo_config"}


def compare(a: Any, b: Any) -> tuple[list[str], tuple[float, str]]:
    """The non-numeric differences of ``a`` and ``b`` and their largest relative numeric one."""
    diffs: list[str] = []
    worst = (0.0, "")

    def walk(x: Any, y: Any, path: str) -> None:
        nonlocal worst
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if path == "" and k in IGNORED:
                    continue
                if k not in x or k not in y:
                    diffs.append(f"{path}/{k}: only in one file")
                else:
                    walk(x[k], y[k], f"{path}/{k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                diffs.append(f"{path}: {len(x)} vs {len(y)} items")
                return
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif _number(x) and _number(y):
            if x != y:
                rel = abs(x - y) / max(abs(x), abs(y))
                if rel > worst[0]:
                    worst = (rel, f"{path}: {x!r} vs {y!r}")
        elif x != y:
            diffs.append(f"{path}: {str(x)[:80]!r} vs {str(y)[:80]!r}")

    walk(a, b, "")
    return diffs, worst


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args()
    with open(args.old) as f, open(args.new) as g:
        diffs, (rel, where) = compare(json.load(f), json.load(g))
    print(f"non-numeric differences: {len(diffs)}")
    for d in diffs[:50]:
        print("  " + d)
    print(f"largest relative numeric difference: {rel:.3g}" + (f" ({where})" if where else ""))
    return 1 if diffs or rel > args.rtol else 0


if __name__ == "__main__":
    sys.exit(main())
