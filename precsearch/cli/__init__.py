"""The ``precsearch`` command: parse, read the config file, call the library, render."""

from ._main import main

__all__ = ["main"]
