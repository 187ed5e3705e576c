"""Errors that carry the name of the field or file:line they are about.

The CLI turns any :class:`AgentsimError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class AgentsimError(Exception):
    """Bad input: names where (``field`` or ``file:line``) and what is wrong."""

    def __init__(self, where: str, message: str) -> None:
        # args keep both parts so the error survives copying/pickling (SimPy re-raises copies)
        super().__init__(where, message)
        self.where = where
        self.message = message

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(AgentsimError):
    """A config field, CLI option or profile field is unknown, malformed or impossible."""


class TraceError(AgentsimError):
    """A trace file or line is malformed."""
