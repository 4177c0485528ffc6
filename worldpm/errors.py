"""The errors a user sees as one line, and the exit statuses the CLI gives them.

* ConfigError: a bad pipeline.yaml, --set override or command-line usage; the message names the key or option.
  Exit status 2.
* StageError: a stage failed on its input (or its program failed); the message names the file (and line) where
  there is one. Exit status 1.
"""
from __future__ import annotations

EXIT_STAGE = 1
EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A bad pipeline.yaml, --set override or option; the message names the key."""


class StageError(RuntimeError):
    """A stage failed on its input; the message is one line naming the file (and line) where there is one."""
