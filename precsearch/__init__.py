"""precsearch: find which conv layers of a CNN can run int8 on a CPU."""

__version__ = "0.1.0"
