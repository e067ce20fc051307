"""The one exception type for problems the user can fix.

A :class:`UserError` (or a subclass: :class:`ConfigError`, ``AudioError``, ``ManifestError``,
``CheckpointError``, ...) carries a message written for the person running asrkd: which key,
file or argument is wrong and what to do. The CLI prints it and exits 2. Every other exception
is a bug and keeps its traceback. Both derive from ``ValueError`` so library callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input (config, arguments, files, data); the message says what."""


class ConfigError(UserError):
    """A configuration problem; the message names the key and what to do."""
