"""The house shows itself: the layouts in docs/design.md and the README match the tree."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "prefixflow"


def _layout_block(doc: Path) -> str:
    """The fenced block under the '## Layout' heading."""
    text = doc.read_text()
    after = text[text.index("## Layout") :]
    start = after.index("```") + 3
    return after[start : after.index("```", start)]


def _packages() -> set[str]:
    """Every folder of the package that holds Python files or the C++ kernels."""
    return {
        str(p.relative_to(PKG))
        for p in PKG.rglob("*")
        if p.is_dir() and p.name != "__pycache__" and (any(p.glob("*.py")) or any(p.glob("*.cpp")))
    }


def test_every_package_and_module_is_in_the_design_layout():
    block = _layout_block(REPO / "docs" / "design.md")
    names = {p.split("/")[-1] + "/" for p in _packages()}
    names |= {p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}", block))
    assert missing == [], f"add these to docs/design.md's layout: {missing}"


def test_every_file_the_design_layout_names_exists():
    """A .py file named in the layout exists somewhere in the package (names drift when
    files move)."""
    block = _layout_block(REPO / "docs" / "design.md")
    files = {p.name for p in PKG.rglob("*.py")} | {p.name for p in PKG.rglob("*.cpp")}
    named = set(re.findall(r"([A-Za-z_]\w*\.(?:py|cpp))", block))
    assert named - files == set(), "the layout names files that are gone"


def test_readme_layout_names_every_top_level_package():
    block = _layout_block(REPO / "README.md")
    top = sorted({p.split("/")[0] for p in _packages()})
    missing = [p for p in top if f"{p}/" not in block]
    assert missing == [], f"add these to the README's layout: {missing}"
    files = {p.name for p in PKG.glob("*.py")}
    named = set(re.findall(r"\b([a-z_]+\.py)\b", block))
    assert named - files - {"main.py"} == set(), "the README's layout names files that are gone"
