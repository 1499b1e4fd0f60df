"""Output files that never replace an input and never exist half-written. Torch-free, so the I/O modules
(and anything reading or writing images) import without the deep-learning stack."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from common import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; rename over `path` only if the block succeeds, so a crash never leaves
    a half-written output (or a half-written checkpoint in place of a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get a plain open()'s mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def refuse_overwrite_input(out_path: str | Path, *input_paths: str | Path) -> None:
    """UserError when `out_path` is an input file, or a DICOM-like file inside an input folder."""
    out = Path(out_path).resolve()
    for inp in input_paths:
        inp = Path(inp).resolve()
        if out == inp or (inp.is_dir() and inp in out.parents and out.suffix.lower() in (".dcm", ".ima", "")):
            raise UserError(f"output {out_path} would overwrite the input {inp}; choose another output path")
