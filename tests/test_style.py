"""House style that a reviewer should not have to check by eye."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 120  # pyproject's [tool.ruff] line-length


def test_python_lines_fit_on_a_screen() -> None:
    files = [path for folder in ("ptq", "bench", "tests") for path in (ROOT / folder).rglob("*.py")]
    long = [f"{path.relative_to(ROOT)}:{number}" for path in files
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > MAX_LINE]
    assert files and not long, f"lines over {MAX_LINE} characters: {long}"
