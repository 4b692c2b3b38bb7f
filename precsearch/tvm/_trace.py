"""Seeing the graph after every pass, and knowing which pass failed.

A ``PassInstrument`` sees every pass run under its ``PassContext``, nested ones
included, which is what TVM's own ``DumpIR`` does; ours also numbers files in run
order, prints shapes and dtypes (``script()`` shows them on every binding) and
remembers the pass in flight so a failure can name it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import tvm
from tvm import relax
from tvm.ir.instrument import pass_instrument

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@pass_instrument
class PassTracer:
    """Track the pass in flight; with ``dump_dir``, write the IR after every pass.

    Parameters
    ----------
    dump_dir : path or None
        Where ``NNN_<pass>.py`` files go; created if missing.  None dumps nothing.
    """

    def __init__(self, dump_dir: str | Path | None = None):
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.count = 0
        self.stack: list[str] = []
        self.last_failed: str | None = None
        self.files: list[Path] = []
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)

    @property
    def current(self) -> str | None:
        """The innermost pass running now (None between passes)."""
        return self.stack[-1] if self.stack else None

    def run_before_pass(self, mod, info):
        self.stack.append(info.name)

    def run_after_pass(self, mod, info):
        if self.stack:
            self.stack.pop()
        # Modules without a Relax function are the kernels FoldConstant compiles to
        # evaluate constants, and the final TIR lowering: hundreds of passes over
        # loop nests that say nothing about the graph.
        if any(isinstance(func, relax.Function) for func in mod.functions.values()):
            self.dump(mod, info.name)

    def dump(self, mod: tvm.IRModule, name: str) -> None:
        """Write ``mod`` as the next numbered file (a no-op without ``dump_dir``)."""
        if self.dump_dir is None:
            return
        self.count += 1
        path = self.dump_dir / f"{self.count:03d}_{_UNSAFE.sub('_', name)[:80]}.py"
        path.write_text(f"# IR after pass {name!r} (pass #{self.count})\n" + _script(mod))
        self.files.append(path)


_OP_REPR = re.compile(r"In ir\.Op\(.*?name=\"([^\"]+)\".*?support_level=\d+\),?\s*")


def tvm_error_line(exc: BaseException, limit: int = 400) -> str:
    """The one informative line of a TVM error (they come with tracebacks and op reprs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("File ", "Traceback", "#", "[bt]"))]
    text = useful[-1] if useful else type(exc).__name__
    return _OP_REPR.sub(lambda m: f"{m.group(1)}: ", text)[:limit]


def _script(mod: tvm.IRModule) -> str:
    # Only the Relax function carries the graph a person wants to read; prim funcs
    # are printed too (they are the kernels) but after it.
    try:
        return mod.script(show_meta=False)
    except Exception as exc:  # printing must never break a build
        logger.warning("could not print IR: %s", exc)
        return f"# could not print IR: {exc}\n"
