"""A committed tiny-model demo report re-renders to its committed markdown (issue 21): any change
to how a report's summaries, curves, tests or tables are derived from its stored per-question
records, or to how they are written, shows up here as a diff.

After an intended change to how reports are rendered, re-render ``report.md`` from the
committed ``report.json`` with ``python tests/test_golden_report.py`` and review its diff. The
JSON is kept in the format it was written in on purpose (``tests/test_names.py`` checks that an
old report still loads); only when the stored records themselves must change, regenerate both
files from a tiny-model demo with ``python tests/test_golden_report.py --regenerate``.
"""

from __future__ import annotations

import difflib
import shutil
import sys
import tempfile
from pathlib import Path

from ks_lens.report import read_report, render_markdown

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-demo"


def test_committed_report_renders_to_the_committed_markdown():
    result, info = read_report(GOLDEN / "report.json")
    want = (GOLDEN / "report.md").read_text()
    got = render_markdown(result, info)
    diff = "".join(
        difflib.unified_diff(want.splitlines(True), got.splitlines(True), "committed", "rendered")
    )
    assert got == want, f"the golden report renders differently:\n{diff[:4000]}"
    assert "K-Steering" in got and "## Verdict" in got  # the real report, not an empty one


def regenerate() -> None:
    """Run the tiny-model fast demo and keep its report.json and report.md as the golden pair."""
    from ks_lens.cli.demo import run_demo
    from ks_lens.pipeline import PipelineConfig

    cfg = PipelineConfig.fast(model="tiny-random-llama", n_gold=24, n_eval=4, n_gen=2)
    with tempfile.TemporaryDirectory() as tmp:
        run_demo(cfg, Path(tmp) / "demo", progress=False)
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "report.md"):
            shutil.copyfile(Path(tmp) / "demo" / name, GOLDEN / name)
    print(f"wrote {GOLDEN}/report.json and report.md", file=sys.stderr)


def rerender() -> None:
    """Re-render the committed report.json into report.md (the JSON is left as it is)."""
    result, info = read_report(GOLDEN / "report.json")
    (GOLDEN / "report.md").write_text(render_markdown(result, info))
    print(f"wrote {GOLDEN}/report.md", file=sys.stderr)


if __name__ == "__main__":
    regenerate() if "--regenerate" in sys.argv[1:] else rerender()
