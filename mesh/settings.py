"""Reading settings from the environment.

Each service has one frozen settings dataclass built by ``from_env(environ)``; these helpers do
the parsing so every service reports bad values the same way. Nothing reads the environment at
import time.
"""

from __future__ import annotations

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

    def __init__(self, environ: Mapping[str, str], prefix: str) -> None:
        self._environ = environ
        self._prefix = prefix

    def _raw(self, name: str) -> str | None:
        return self._environ.get(self._prefix + name)

    def str(self, name: str, default: str) -> str:
        value = self._raw(name)
        return default if value is None or value == "" else value

    def secret(self, name: str, default: str = "") -> Secret:
        return Secret(self.str(name, default))

    def int(self, name: str, default: int, *, minimum: int | None = None) -> int:
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

    def float(self, name: str, default: float) -> float:
        value = self._raw(name)
        if value is None or value == "":
            return default
        try:
            return float(value)
        except ValueError:
            raise SettingsError(f"{self._prefix}{name}={value!r} is not a number") from None

    def bool(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None or value == "":
            return default
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{self._prefix}{name}={value!r} is not a boolean")

    def path(self, name: str, default: Path) -> Path:
        value = self._raw(name)
        return default if value is None or value == "" else Path(value)

    def list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._raw(name)
        if value is None or value.strip() == "":
            return default
        return tuple(part.strip() for part in value.split(",") if part.strip())


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """Where the mesh keeps its data (PostgreSQL, the embedded log, models, server downloads)."""
    return Path(environ.get("MESH_STATE_DIR", ".state")).absolute()
