"""docs/RELIABILITY.md stays honest: every table row names at least one test, and every test it
names exists (file and function; parametrised ids are checked on the function name)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = re.compile(r"`?(test_[a-z0-9_]+\.py)?::(test_[a-z0-9_]+)(\[[^\]]*\])?`?")
FILE_REF = re.compile(r"(test_[a-z0-9_]+\.py)::")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
            and n.name.startswith("test_")}


def test_every_row_names_an_existing_test():
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")
            and not ln.startswith("|---") and "expected behaviour" not in ln]
    table_rows = [r for r in rows if r.count("|") >= 4]
    assert len(table_rows) >= 25
    missing, unnamed = [], []
    for row in table_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0] in ("figure",) or re.match(r"^(frames|dropped|lost|still|windows|peak|RSS|"
                                               r"max|latency)", cells[0]):
            continue                                  # the soak figures table
        last = cells[-1]
        if "::" not in last:
            unnamed.append(cells[0])
            continue
        current = None
        for m in re.finditer(r"(test_[a-z0-9_]+\.py)?::(test_[a-z0-9_]+)", last):
            current = m.group(1) or current
            assert current, f"test reference without a file in row '{cells[0]}'"
            path = ROOT / "test" / current
            if not path.is_file() or m.group(2) not in _test_functions(path):
                missing.append(f"{current}::{m.group(2)}")
    assert not unnamed, f"rows without a test: {unnamed}"
    assert not missing, f"tests named in RELIABILITY.md that do not exist: {missing}"
