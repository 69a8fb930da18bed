"""The root of fedpath's errors. The CLI prints any of them as one line, '<file>: <problem>', and exits 2."""

from __future__ import annotations


class FedpathError(Exception):
    """Bad input or a refused action; the message names the file or object and the reason."""
