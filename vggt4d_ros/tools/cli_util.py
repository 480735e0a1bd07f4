"""One-line error reporting shared by the command-line tools (users get a line, not a trace)."""
from __future__ import annotations

import sys


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    text = str(exc)
    return text.splitlines()[0] if text else ""


def exc_summary(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def report_failure(prog: str, exc: BaseException) -> int:
    """An unexpected failure of ``prog``: ``PROG: failed: Type: message`` on stderr; exit 1."""
    print(f"{prog}: failed: {exc_summary(exc)}", file=sys.stderr)
    return 1
