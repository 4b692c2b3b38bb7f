"""Writing files so that a killed run never leaves half of one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A reader (another worker, the next run) sees the old file or the new one,
    never a partial one; the folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        scratch.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(scratch, path)
    except OSError as exc:  # name the file the caller wrote, not the scratch file
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        scratch.unlink(missing_ok=True)
    return path


def cache_file(cache_dir: str | Path | None, name: str) -> Path | None:
    """``<cache_dir>/<name>``, or None when the caller caches nothing (no ``cache_dir``)."""
    return Path(cache_dir) / name if cache_dir is not None else None
