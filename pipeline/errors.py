"""Errors that the CLI prints as one line (no traceback) and turns into a non-zero exit status."""

from __future__ import annotations

from wsi.errors import WSIError


class FedpathError(WSIError):
    """Bad input or a refused action; the message names the file or object and the reason."""


class PrivacyBudgetExceeded(FedpathError):
    """A job would spend ε past the site's budget."""
