"""Size guards: no module in ks_lens/ over 600 lines, no function over 80 (issue 21).

Every current offender is named in :data:`EXCEPTIONS` with its size when the guard was added and
why it is allowed for now. The guard fails when a new offender appears, when an offender grows
past its recorded size, and when an entry is stale (the module or function is gone or back
within the limit): the list only shrinks. ``python tests/test_layout.py`` prints the offenders
of the current tree in the form of :data:`EXCEPTIONS`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ks_lens"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

_MOVE = "split in #21 package move"

#: ``"path"`` (a module's lines) or ``"path:Qualified.name"`` (a function's lines, ``def`` to its
#: last line, decorators excluded) -> (size when recorded, why it is allowed for now)
EXCEPTIONS: dict[str, tuple[int, str]] = {}


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """``(qualified name, lines)`` of every function and method, nested ones included
    (``Class.method``, ``outer.inner``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            assert node.end_lineno is not None
            yield name, node.end_lineno - node.lineno + 1
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


def sizes(package: Path = PACKAGE) -> dict[str, int]:
    """Every module's line count (key ``"path"``) and every function's (``"path:name"``), for
    the ``.py`` files under ``package``; paths are relative to the repository root."""
    out: dict[str, int] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        text = path.read_text(encoding="utf-8")
        out[rel] = len(text.splitlines())
        for name, n in _functions(ast.parse(text)):
            out[f"{rel}:{name}"] = max(n, out.get(f"{rel}:{name}", 0))  # redefinitions: the longest
    return out


def offenders(measured: dict[str, int]) -> dict[str, int]:
    """The entries of ``measured`` over their limit."""
    return {
        key: n
        for key, n in measured.items()
        if n > (MAX_FUNCTION_LINES if ":" in key else MAX_MODULE_LINES)
    }


def problems(measured: dict[str, int], exceptions: dict[str, tuple[int, str]]) -> list[str]:
    """What the guard reports: new offenders, offenders grown past their recorded size, and stale
    exceptions (gone, or back within the limit)."""
    found = offenders(measured)
    out = []
    for key, n in sorted(found.items()):
        limit = MAX_FUNCTION_LINES if ":" in key else MAX_MODULE_LINES
        if key not in exceptions:
            out.append(f"{key}: {n} lines, over the limit of {limit}; split it")
        elif n > exceptions[key][0]:
            out.append(
                f"{key}: grew to {n} lines, past its recorded {exceptions[key][0]}; shrink it "
                "(the exception only allows the size it had)"
            )
    for key in sorted(set(exceptions) - set(found)):
        state = "is gone" if key not in measured else f"is {measured[key]} lines, within the limit"
        out.append(f"{key} {state}: remove it from EXCEPTIONS")
    return out


def test_no_module_or_function_grows_past_the_limits():
    assert problems(sizes(), EXCEPTIONS) == []


def test_every_exception_says_why():
    for key, (n, why) in EXCEPTIONS.items():
        assert n > (MAX_FUNCTION_LINES if ":" in key else MAX_MODULE_LINES), key
        assert why.strip(), key


def test_the_guard_catches_growth_new_offenders_and_stale_entries(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (pkg / "big.py").write_text(
        f"class A:\n    def method(self):\n{body.replace('    ', '        ')}\n\n"
        f"def long():\n{body}\n    def inner():\n        pass\n" + "\n" * 420
    )
    (pkg / "small.py").write_text("def f():\n    return 1\n")
    measured = sizes(pkg)
    # hand-counted: method = def line + 85 body lines; long = def + 85 + inner's 2 lines
    assert measured["pkg/big.py:A.method"] == 86
    assert measured["pkg/big.py:long"] == 88 and measured["pkg/big.py:long.inner"] == 2
    assert measured["pkg/big.py"] == 1 + 1 + 85 + 1 + 1 + 85 + 2 + 420
    assert measured["pkg/small.py:f"] == 2
    # 596 lines: within a module's limit
    assert offenders(measured) == {"pkg/big.py:A.method": 86, "pkg/big.py:long": 88}
    allowed = {"pkg/big.py:A.method": (86, "why"), "pkg/big.py:long": (88, "why")}
    assert problems(measured, allowed) == []
    assert problems(measured, {**allowed, "pkg/big.py:long": (87, "why")}) == [
        "pkg/big.py:long: grew to 88 lines, past its recorded 87; shrink it (the exception "
        "only allows the size it had)"
    ]
    assert problems(measured, {"pkg/big.py:long": (88, "why")}) == [
        "pkg/big.py:A.method: 86 lines, over the limit of 80; split it"
    ]
    stale = {**allowed, "pkg/small.py:f": (90, "why"), "pkg/gone.py": (700, "why")}
    assert problems(measured, stale) == [
        "pkg/gone.py is gone: remove it from EXCEPTIONS",
        "pkg/small.py:f is 2 lines, within the limit: remove it from EXCEPTIONS",
    ]


def public_modules(package: Path = PACKAGE) -> list[str]:
    """Dotted names of the package's public modules (no part starting with ``_``; packages by
    their ``__init__``)."""
    out = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(p.startswith("_") for p in parts):
            out.append(".".join(parts))
    return sorted(out)


def _nav_pages(node: object) -> list[str]:
    """Every page path in a mkdocs ``nav`` tree."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    if isinstance(node, list):
        return [p for v in node for p in _nav_pages(v)]
    return []


def test_every_public_module_has_an_api_page_in_the_nav():
    """The API reference (mkdocs.yml, docs/api/) covers exactly the public modules: a module
    added, moved or removed needs its page (``# `name` `` and ``::: name``) and nav entry."""
    import yaml

    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    api = sorted(p.removeprefix("api/").removesuffix(".md") for p in nav if p.startswith("api/"))
    assert api == public_modules()
    assert sorted(p.stem for p in (ROOT / "docs" / "api").glob("*.md")) == api
    for name in api:
        text = (ROOT / "docs" / "api" / f"{name}.md").read_text()
        assert text.startswith(f"# `{name}`\n") and f"\n::: {name}\n" in text, name
    for page in nav:
        assert (ROOT / "docs" / page).is_file(), f"mkdocs.yml lists {page}, which is missing"


if __name__ == "__main__":
    for key, n in sorted(offenders(sizes()).items(), key=lambda kv: (":" in kv[0], kv[0])):
        print(f'    "{key}": ({n}, _MOVE),')
