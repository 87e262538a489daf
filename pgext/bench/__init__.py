"""``python -m pgext.bench``: pgext's ops against their eager references.

Modules: ``cli`` (options, the worker processes, one per page-fault mode),
``ops`` (what each --op times), ``measure`` (the timing, in the worker),
``report`` (tables and plot), ``targets`` (the performance targets).
"""
from .cli import main, parser

__all__ = ["main", "parser"]
