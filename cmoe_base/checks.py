"""Config errors a user can act on: each names the field, its value and what is allowed.

    ConfigError: model.chunk.target_ratio = 0.5: must be >= 1 (1 = no compression)
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is missing, unknown, mistyped or out of range. The message names the field."""


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `name` unless `ok`."""
    if not ok:
        raise ConfigError(f"{name} = {value!r}: {allowed}")
