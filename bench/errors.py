"""stabench's errors: one base class, one subclass per concern.

``bench.cli.main`` prints any ``StabenchError`` as one line ``stabench <cmd>: error: <msg>``
and exits with code 2. The subclasses keep the builtin base their callers catch
(``ValueError``, ``RuntimeError``). Modules below the CLI import their errors from here,
never from ``bench.cli``.
"""
from __future__ import annotations


class StabenchError(Exception):
    """Base of every error stabench reports to the user as one line (exit code 2)."""


class UsageError(StabenchError):
    """Bad input from the user on the command line."""


class ConfigError(StabenchError, ValueError):
    """A configuration value that cannot be used; ``str()`` names source, key and what is allowed."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.source = key, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


class DataError(StabenchError, ValueError):
    """Data that cannot be loaded or does not fit the model."""


class StabilizerError(StabenchError, ValueError):
    """A stabilizer spec or hyperparameter that cannot be used."""


class StorageError(StabenchError):
    """A sweep storage (journal file or database) that cannot be opened."""


class PackError(StabenchError, RuntimeError):
    """Configs that cannot be trained as one pack."""


__all__ = ["StabenchError", "UsageError", "ConfigError", "DataError", "StabilizerError",
           "StorageError", "PackError"]
