"""A circuitsvis token view of one steered answer from a saved demo report (offline HTML).

Reads the report's text-level answers for one cell (question + target labels) at the calibrated
alpha (factor 1), and colours every answer token by a probe's per-label probabilities, read on
question + answer re-encoded without any instruction by the unsteered model. Use a probe that
steering never optimised against (the demo's ``probes/response-evaluator``) to see where the tone
shows up in the text.

    python analysis/token_view.py --report runs/demo/report.json \
        --probe runs/demo/probes/response-evaluator [--targets cautious] [--question 0] \
        [--methods unsteered,caa_mean,ksteer] [--out docs/figures/token_view.html]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ks_lens.analysis.viz import save_token_view, token_view_html
from ks_lens.comparison import ComparisonResult, method_label
from ks_lens.errors import ConfigError, KsLensError
from ks_lens.models import load_model
from ks_lens.probes import Probe


def main() -> None:
    try:
        run()
    except KsLensError as e:  # bad input: one line, exit 2 (bugs keep their traceback)
        print(f"token_view: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--report", required=True, help="a demo report.json")
    p.add_argument("--probe", required=True, help="probe directory used for the colouring")
    p.add_argument(
        "--targets", default=None, help="comma-separated targets of the cell (default: first cell)"
    )
    p.add_argument("--question", type=int, default=0, help="index among the matching cells")
    p.add_argument(
        "--methods",
        default="unsteered,caa_mean,ksteer",
        help="comma-separated methods to show (each view inlines the circuitsvis script, ~1.3 MB)",
    )
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="runs/token_view.html")
    args = p.parse_args()
    result = ComparisonResult.from_json(json.loads(Path(args.report).read_text()))
    te = result.text
    if te is None:
        raise ConfigError(f"{args.report} has no text-level answers")
    want = None if args.targets is None else tuple(args.targets.split(","))
    cells = [c for c in te.cells if want is None or tuple(c.targets) == want]
    if not 0 <= args.question < len(cells):
        raise ConfigError(f"{len(cells)} cells match targets={want}; --question {args.question}")
    cell = cells[args.question]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    answers = {
        method_label(a.method)
        + ("" if a.method == "unsteered" else f" (alpha {a.alpha:.3g})"): a.text
        for a in te.answers
        if a.question == cell.question
        and a.method in methods
        and (a.method == "unsteered" or (a.targets == cell.targets and a.factor == 1.0))
    }
    model = load_model(args.model)
    probe = Probe.load(args.probe, model=model)
    question = te.questions[cell.question]
    page = token_view_html(
        model,
        question,
        answers,
        probe,
        title=f"Steered toward {'+'.join(cell.targets)} (calibrated alpha), {Path(args.report).name}",
    )
    path = save_token_view(Path(args.out), page)
    print(f"wrote {path} ({len(answers)} answers)")


if __name__ == "__main__":
    main()
