"""The ``precsearch`` command: argv → settings → the library functions.

The only module that reads argv, prints tables and talks to a person; everything
below it logs.  Bad input ends with one line on stderr and exit code 2; a failed
build with exit code 3; a ``--check`` that traces a divergence from ONNX Runtime to
anything but a rounding near-tie (a compiler problem) with exit code 4.
"""

from __future__ import annotations

import errno
import logging
import re
import signal
import sys
import time

from precsearch.cli.commands import COMMANDS, EXIT_BAD_INPUT, EXIT_BUILD_FAILED
from precsearch.cli.options import apply_config, build_parser, check_required
from precsearch.errors import CompileError, PrecsearchError, first_line


_DISK_ERRORS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EACCES: "Permission denied", errno.EROFS: "Read-only file system"}


# The same conditions as text, from tools that report them in a message (the linker, SQLite).
_DISK_MESSAGES = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def _unwritable(exc: BaseException) -> str | None:
    """One line for a write that failed on a full, read-only or forbidden disk, naming the path; else None."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRORS:
            return f"{_DISK_ERRORS[seen.errno]}: {seen.filename}" if seen.filename else _DISK_ERRORS[seen.errno]
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    message = next((m for m in _DISK_MESSAGES if m in text), None)
    if message is None:
        return None
    path = re.search(r"(?:-o|writing|open) '?(/[^\s':]+)", text)
    return f"{message}: {path.group(1)}" if path else f"{message} ({first_line(exc)})"


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `precsearch layers m | head` must end quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    try:
        apply_config(parser, sys.argv[1:] if argv is None else list(argv))
        args = parser.parse_args(argv)
        check_required(args)
    except (PrecsearchError, ValueError) as exc:
        print(f"precsearch: error: {first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        code = COMMANDS[args.command](args)
    except Exception as exc:  # noqa: BLE001 — sorted below; anything else re-raises
        full = _unwritable(exc)
        if full is not None:
            # A full or read-only disk is bad input: caches and the study were written atomically and resume.
            print(f"precsearch: error: {full}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(exc, CompileError):
            print(f"precsearch: build failed: {first_line(exc)}", file=sys.stderr)
            return EXIT_BUILD_FAILED
        if isinstance(exc, (PrecsearchError, ValueError)):
            print(f"precsearch: error: {first_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(exc, OSError):
            print(f"precsearch: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except KeyboardInterrupt:
        print("precsearch: interrupted", file=sys.stderr)
        return 130
    logging.getLogger(__name__).info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
