"""Pipeline errors: all are ``fedcore.errors.FedpathError``, printed by the CLI as one line."""

from __future__ import annotations

from fedcore.errors import FedpathError

__all__ = ["FedpathError", "PrivacyBudgetExceeded"]


class PrivacyBudgetExceeded(FedpathError):
    """A job would spend ε past the site's budget."""
