"""What each command does, as one library call: build, tune, bench, doctor, search.

A command of :mod:`precsearch.cli` parses its options, makes a
:class:`~precsearch.workspace.Workspace` or a search config, calls one function
here and renders what it returns.
"""
