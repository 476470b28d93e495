"""Reports of a comparison: ``report.json``, ``report.md`` and PNG figures.

Everything here renders from the typed records of :mod:`ks_lens.comparison`
(:class:`~ks_lens.comparison.ComparisonResult` and its rows); the JSON is their ``to_json()``.
A verdict says "beats" only when the paired 95 % interval of the difference excludes zero.
Figures use matplotlib's non-interactive Agg backend, so they render on headless machines.

What lives where (every public name is re-exported here, ``from ks_lens.report import X``):

* :mod:`ks_lens.report.tables`: formatting helpers and the markdown tables (summary, equal-KL,
  trade-off curve, per-combination, style meters), the verdict sentences
  (:func:`verdict`, :func:`compare_word`) and example answers.
* :mod:`ks_lens.report.markdown`: ``report.md`` (:func:`render_markdown`, section by section),
  the plain-text headline (:func:`render_summary`), the spread over seeds
  (:func:`seeds_summary`, :func:`seeds_table`) and :func:`versions_line`.
* :mod:`ks_lens.report.plots`: the PNG figures (:func:`plot_report`, :func:`plot_tradeoff`,
  :func:`plot_combinations`).
* :mod:`ks_lens.report.files`: writing them to disk (:func:`write_report`) and re-rendering a
  stored ``report.json`` (:func:`rerender`).
"""

from ks_lens.report.files import read_report, rerender, write_report
from ks_lens.report.markdown import INSTRUCTED_DEFINITIONS as INSTRUCTED_DEFINITIONS
from ks_lens.report.markdown import LENS_TEXT as LENS_TEXT
from ks_lens.report.markdown import (
    capability_section,
    render_markdown,
    render_summary,
    seeds_summary,
    seeds_table,
    versions_line,
)
from ks_lens.report.markdown import reference_lines as reference_lines
from ks_lens.report.plots import plot_combinations, plot_report
from ks_lens.report.plots import plot_tradeoff as plot_tradeoff
from ks_lens.report.tables import (
    combination_rows,
    combination_table,
    compare_word,
    curve_table,
    equal_kl_table,
    markdown_table,
    summary_table,
    verdict,
)
from ks_lens.report.tables import examples as examples
from ks_lens.report.tables import instructed_notes as instructed_notes
from ks_lens.report.tables import share_cell as share_cell
from ks_lens.report.tables import style_table as style_table

__all__ = [
    "capability_section",
    "combination_rows",
    "combination_table",
    "compare_word",
    "curve_table",
    "equal_kl_table",
    "markdown_table",
    "plot_combinations",
    "plot_report",
    "read_report",
    "render_markdown",
    "render_summary",
    "rerender",
    "seeds_summary",
    "seeds_table",
    "summary_table",
    "verdict",
    "versions_line",
    "write_report",
]
