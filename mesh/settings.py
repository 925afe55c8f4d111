"""Reading settings from the environment.

Each service has one frozen settings dataclass built by ``from_env(environ)``; these helpers do
the parsing so every service reports bad values the same way. Nothing reads the environment at
import time.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """A setting is present but malformed; the message names the variable."""


@dataclass(frozen=True)
class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    _value: str

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


class Env:
    """Typed access to variables sharing a prefix, e.g. ``Env(os.environ, "MESH_GATEWAY_")``."""

    def __init__(self, environ: Mapping[str, str], prefix: builtins.str) -> None:
        self._environ = environ
        self._prefix = prefix

    def _raw(self, name: builtins.str) -> builtins.str | None:
        return self._environ.get(self._prefix + name)

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self._raw(name)
        return default if value is None or value == "" else value

    def secret(self, name: builtins.str, default: builtins.str = "") -> Secret:
        return Secret(self.str(name, default))

    def int(
        self, name: builtins.str, default: builtins.int, *, minimum: builtins.int | None = None
    ) -> builtins.int:
        value = self._raw(name)
        if value is None or value == "":
            return default
        try:
            parsed = int(value)
        except ValueError:
            raise SettingsError(f"{self._prefix}{name}={value!r} is not an integer") from None
        if minimum is not None and parsed < minimum:
            raise SettingsError(f"{self._prefix}{name}={parsed} must be >= {minimum}")
        return parsed

    def float(self, name: builtins.str, default: builtins.float) -> builtins.float:
        value = self._raw(name)
        if value is None or value == "":
            return default
        try:
            return float(value)
        except ValueError:
            raise SettingsError(f"{self._prefix}{name}={value!r} is not a number") from None

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._raw(name)
        if value is None or value == "":
            return default
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{self._prefix}{name}={value!r} is not a boolean")

    def path(self, name: builtins.str, default: Path) -> Path:
        value = self._raw(name)
        return default if value is None or value == "" else Path(value)

    def list(
        self, name: builtins.str, default: tuple[builtins.str, ...] = ()
    ) -> tuple[builtins.str, ...]:
        value = self._raw(name)
        if value is None or value.strip() == "":
            return default
        return tuple(part.strip() for part in value.split(",") if part.strip())


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """Where the mesh keeps its data (PostgreSQL, the embedded log, models, server downloads)."""
    return Path(environ.get("MESH_STATE_DIR", ".state")).absolute()
