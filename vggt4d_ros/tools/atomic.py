"""Write a whole output folder or nothing: the tools build their results in a hidden temporary
folder beside the target and move it into place only when complete, so an error (or Ctrl-C)
never leaves partial garbage where a user or a later step looks for results."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; on success it replaces ``out`` (any
    previous folder there is removed first), on any exception it is deleted and ``out`` is
    left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
