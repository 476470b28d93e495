"""The package root: one import for the pipeline, the README's notebook section, where the
version comes from, and the modules' one-way import order."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import ks_lens as ks
from ks_lens import compat, utils

ROOT = Path(__file__).resolve().parents[1]
#: the pipeline's stages: a module may import from its own stage or an earlier one, never a later
ORDER = (
    "models",
    "_runtime",
    "generation",
    "datasets",
    "activations",
    "probes",
    "steering",
    "calibration",
    "evaluation",
    "text_evaluator",
    "capability",
    "comparison",
    "pipeline",
    "report",
    "cli",
)


def test_all_names_resolve_and_heavy_modules_stay_lazy():
    for name in ks.__all__:
        assert getattr(ks, name) is not None, name
    assert set(ks.__all__) <= set(dir(ks))
    code = (
        "import sys, ks_lens as ks; "
        "print(sorted(m for m in ('sklearn', 'scipy', 'matplotlib', 'ks_lens.text_evaluator') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_version_comes_from_the_installed_distribution():
    assert ks.__version__ == version("ks-lens") == utils.package_version()
    assert compat.versions()["ks_lens"] == ks.__version__


def test_version_when_not_installed(monkeypatch):
    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(utils, "version", missing)
    monkeypatch.setattr(compat, "version", missing)
    utils.package_version.cache_clear()
    try:
        assert utils.package_version() == utils.UNKNOWN_VERSION == "0+unknown"
        assert compat.versions()["ks_lens"] == "0+unknown"
        assert compat.versions()["transformers"] == "not installed"
    finally:
        utils.package_version.cache_clear()


def _imports(path: Path) -> set[str]:
    """The ks_lens modules ``path`` imports anywhere (``"ks_lens"`` for the package root)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ks_lens"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ks_lens":
                for a in node.names:
                    sub = ROOT / "ks_lens" / a.name
                    is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                    out.add(f"ks_lens.{a.name}" if is_module else "ks_lens")
            elif node.module.split(".")[0] == "ks_lens":
                out.add(node.module)
    return out


def _stage(module: str) -> int | None:
    for i, name in enumerate(ORDER):
        if module == f"ks_lens.{name}" or module.startswith(f"ks_lens.{name}."):
            return i
    return None


def test_one_way_import_order():
    """No module imports a later pipeline stage, and none but the CLI imports the package root
    (the root imports the whole pipeline)."""
    bad = []
    for path in sorted((ROOT / "ks_lens").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "ks_lens":
            continue
        for dep in _imports(path):
            if dep == "ks_lens" and module != "ks_lens.cli":
                bad.append(f"{module} imports the package root")
            here, there = _stage(module), _stage(dep)
            if here is not None and there is not None and there > here:
                bad.append(f"{module} imports {dep}, a later stage")
    assert not bad, bad


def _readme_notebook() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("## In a notebook")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_notebook_needs_one_import():
    """Every name the README's notebook section uses comes from ``import ks_lens as ks``."""
    blocks = _readme_notebook()
    code = "\n".join(blocks)
    imports = [line.strip() for line in code.splitlines() if re.match(r"\s*(import|from) ", line)]
    assert imports == ["import ks_lens as ks"]
    used = set(re.findall(r"\bks\.(\w+)", code))
    assert used >= {"load_model", "collect_activations", "train_probes", "KSteering", "CAA"}
    for name in used:
        assert name in ks.__all__, name
        assert getattr(ks, name) is not None


def test_readme_notebook_runs_on_the_tiny_model(tiny_model, monkeypatch, tmp_path):
    """The notebook flow as written, on the tiny model (smaller sizes, no text evaluator)."""
    main, calibrate = _readme_notebook()[:2]
    main = main[: main.index("judge = ")]  # the text evaluator trains on 1,056 texts: not here
    for old, new in (
        ("ks.load_model()", 'ks.load_model("tiny-random-llama")'),
        (".head(60)", ".head(4)"),
        (
            "ks.collect_activations(model, train)",
            "ks.collect_activations(model, train, progress=False)",
        ),
        (
            "ks.train_probes(acts)",
            "ks.train_probes(acts, config=ks.ProbeConfig(epochs=3), progress=False)",
        ),
        ("probes[18]", "probes[2]"),
        ("fit(acts, 18)", "fit(acts, 2)"),
        ("max_new_tokens=48", "max_new_tokens=4"),
    ):
        assert old in main, old
        main = main.replace(old, new)
    calibrate = calibrate.replace("budget=0.5", "budget=0.01")
    monkeypatch.setattr(ks, "load_model", lambda name: tiny_model)  # the session's tiny model
    env: dict[str, Any] = {}
    exec(compile(main + calibrate, "README.md", "exec"), env)
    assert isinstance(env["answer"], str) and env["alpha"] > 0
