"""Writing a comparison report to disk: ``report.json``, ``report.md`` and the figures.

:func:`write_report` writes all three from a :class:`~ks_lens.comparison.ComparisonResult` and
the run's info; :func:`rerender` rewrites them from a stored ``report.json`` with this
version's code (no model needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ks_lens.comparison import ComparisonResult
from ks_lens.compat import versions
from ks_lens.errors import KsLensError, StoreError
from ks_lens.io import atomic_write_bytes, atomic_write_json
from ks_lens.report.markdown import render_markdown
from ks_lens.report.plots import plot_report
from ks_lens.report.tables import combination_rows
from ks_lens.utils import git_commit


def write_report(
    result: ComparisonResult, info: Mapping[str, Any], out_dir: str | Path
) -> dict[str, Path]:
    """Write ``report.json`` (``info`` + the result's JSON), ``report.md`` and the figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**info, **result.to_json()}
    doc["timings"] = {**info.get("timings", {}), **result.timings}  # setup stages + comparison
    crows = combination_rows(result)
    if crows:
        doc["combinations"] = [r.to_json() for r in crows]
    atomic_write_json(out / "report.json", doc)
    atomic_write_bytes(out / "report.md", render_markdown(result, info).encode())
    figs = plot_report(result, out)
    return {"json": out / "report.json", "markdown": out / "report.md", **{p.stem: p for p in figs}}


_RESULT_KEYS = frozenset(
    {
        "labels",
        "methods",
        "method_labels",
        "comparison_config",
        "plan",
        "alpha",
        "calibration",
        "n_calib_questions",
        "n_test_questions",
        "n_text_questions",
        "summaries",
        "curves",
        "equal_kl",
        "activation_eval",
        "text_eval",
        "timings",
        "combinations",
        "capability",
        "capability_eval",
    }
)


def read_report(path: str | Path) -> tuple[ComparisonResult, dict[str, Any]]:
    """A stored ``report.json``: the comparison (summaries, curves and equal-KL rows recomputed
    from its per-question records by this version's code) and the run's info (model, command,
    commit, versions, setup timings...), as :func:`write_report` took them."""
    from ks_lens.io import read_json

    path = Path(path)
    doc = read_json(path, what="comparison report")
    try:
        result = ComparisonResult.from_json(doc)
    except KsLensError as e:
        raise StoreError(
            f"{path} cannot be re-rendered: {e}. Re-run the demo to regenerate it."
        ) from e
    info = {k: v for k, v in doc.items() if k not in _RESULT_KEYS}
    info["timings"] = {k: v for k, v in doc.get("timings", {}).items() if k not in result.timings}
    return result, info


def rerender(directory: str | Path, *, command: str | None = None) -> dict[str, Path]:
    """Re-render ``directory/report.{json,md}`` and the figures from its ``report.json``, with
    summaries, curves and equal-KL rows recomputed from the stored per-question records by this
    version's code (no model needed). The original run's info is kept; ``rerendered_by``
    records the command and commit of the re-rendering."""
    directory = Path(directory)
    result, info = read_report(directory / "report.json")
    info["rerendered_by"] = {
        "command": command or "ks-lens report",
        "commit": git_commit(),
        "versions": versions(),
    }
    return write_report(result, info, directory)
