"""One settings model for every service: declared once, read from and written back to the
environment.

A settings class is a frozen, keyword-only dataclass deriving from ``Settings`` whose fields are
declared with ``setting(...)``: the variable's name (relative to the class's ``env_prefix``
unless it starts with ``MESH_``), the default, and the bounds. From that one declaration:

- ``from_env(environ)`` parses every variable by the field's type; an unset or empty variable
  means the default (``blank=True`` fields are the exception: empty is a value, "off");
- ``__post_init__`` checks the bounds and then the class's ``check()`` hook, so a settings
  object built in code is validated exactly like one read from the environment, and every
  error names the variable;
- ``to_env()`` writes an object back as variables, and ``env_for(**fields)`` writes chosen
  fields, so the launcher and the benchmarks never spell or concatenate a variable name.

``from_env(o.to_env()) == o`` for every settings object ``o``. Shared fields (listen address,
metrics, drain, PostgreSQL, the addresses of memory and persister) are defined once here.
Nothing reads the environment at import time.
"""

from __future__ import annotations

import builtins
import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    _value: str

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


_META = "mesh.settings"
_MISSING: Any = dataclasses.MISSING
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Var:
    """How one field maps to the environment (the metadata ``setting()`` attaches)."""

    name: str
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    blank: bool = False
    derive: Callable[[Mapping[str, str]], Any] | None = None
    hint: str = ""
    # A field spanning several variables (or of a type this module does not know) reads and
    # writes itself; bounds then belong to its own type.
    read: Callable[[Mapping[str, str]], Any] | None = None
    write: Callable[[Any], dict[str, str]] | None = None


def setting(
    name: str,
    default: Any = _MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] = (),
    blank: bool = False,
    derive: Callable[[Mapping[str, str]], Any] | None = None,
    hint: str = "",
    read: Callable[[Mapping[str, str]], Any] | None = None,
    write: Callable[[Any], dict[str, str]] | None = None,
) -> Any:
    """Declare a settings field read from variable ``name``.

    Args:
        name: the variable, after the class's ``env_prefix`` unless it starts with ``MESH_``.
        default, default_factory: the value when the variable is unset or empty. No default
            makes the variable required.
        minimum, maximum, above: inclusive bounds, and an exclusive lower bound, of numbers.
        choices: the allowed values of a string (read case-insensitively).
        blank: an empty variable is the value ``""`` (used as "off"), not the default.
        derive: the default computed from the environment (paths under ``MESH_STATE_DIR``);
            it also gives the default of objects built in code, from an empty environment.
        hint: appended to the error of a missing required variable.
        read, write: custom conversion of a field spanning several variables.
    """
    var = Var(name, minimum, maximum, above, choices, blank, derive, hint, read, write)
    metadata = {_META: var}
    if derive is not None:
        return field(default_factory=lambda: derive({}), metadata=metadata)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class _Spec:
    """One field of a settings class, resolved: its variable and its (unwrapped) type."""

    field: dataclasses.Field[Any]
    var: Var | None  # None for a nested settings group
    kind: type
    optional: bool


_SPECS: dict[type, tuple[_Spec, ...]] = {}


def _resolve(annotation: Any) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported settings type {annotation!r}")
        return args[0], True
    return annotation, False


def _parse(var: Var, kind: type, optional: bool, raw: str) -> Any:
    name = var.name
    if kind is str:
        return raw.strip().lower() if var.choices else raw.strip() if var.blank else raw
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingsError(f"{name}={raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
    if kind in (int, float):
        try:
            number = int(raw) if kind is int else float(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise SettingsError(f"{name}={raw!r} is not {what}") from None
        # Optional numbers: a negative value means "none" (a random seed, the driver's default).
        return None if optional and number < 0 else number
    if kind is Path:
        return Path(raw).expanduser().absolute()
    if kind is Secret:
        return Secret(raw)
    raise TypeError(f"{name}: unsupported settings type {kind!r}")


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Secret):
        return value.reveal()
    return str(value)


def _check(var: Var, value: Any) -> None:
    name = var.name
    if var.choices and value not in var.choices:
        raise SettingsError(f"{name}={value!r} must be one of {', '.join(var.choices)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if var.minimum is not None and value < var.minimum:
        raise SettingsError(f"{name}={value} must be >= {var.minimum:g}")
    if var.maximum is not None and value > var.maximum:
        raise SettingsError(f"{name}={value} must be <= {var.maximum:g}")
    if var.above is not None and value <= var.above:
        raise SettingsError(f"{name}={value} must be > {var.above:g}")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every settings class; see the module docstring."""

    env_prefix: ClassVar[str] = "MESH_"

    def __post_init__(self) -> None:
        for spec in self._specs():
            value = getattr(self, spec.field.name)
            if spec.var is not None and spec.var.read is None and value is not None:
                _check(spec.var, value)
        self.check()

    def check(self) -> None:
        """Rules spanning several fields; raise ``SettingsError`` naming the variables."""

    @classmethod
    def _specs(cls) -> tuple[_Spec, ...]:
        specs = _SPECS.get(cls)
        if specs is None:
            hints = typing.get_type_hints(cls)
            found = []
            for f in dataclasses.fields(cls):
                kind, optional = _resolve(hints[f.name])
                var: Var | None = f.metadata.get(_META)
                if var is None:
                    if not (isinstance(kind, type) and issubclass(kind, Settings)):
                        raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
                elif not var.name.startswith("MESH_"):
                    var = dataclasses.replace(var, name=cls.env_prefix + var.name)
                found.append(_Spec(f, var, kind, optional))
            specs = _SPECS[cls] = tuple(found)
        return specs

    @classmethod
    def _spec(cls, name: str) -> _Spec:
        for spec in cls._specs():
            if spec.field.name == name:
                return spec
        raise AttributeError(f"{cls.__name__} has no setting {name!r}")

    @classmethod
    def var(cls, name: str) -> str:
        """The variable of field ``name``: ``AgentSettings.var("port") == "MESH_AGENT_PORT"``."""
        var = cls._spec(name).var
        if var is None:
            raise AttributeError(f"{cls.__name__}.{name} is a group of settings, not one")
        return var.name

    @classmethod
    def variables(cls) -> Iterator[str]:
        """Every variable this class reads, nested groups included."""
        for spec in cls._specs():
            if spec.var is None:
                yield from spec.kind.variables()  # type: ignore[attr-defined]
            elif spec.var.write is not None:
                yield from spec.var.write(cls.default(spec.field.name))
            else:
                yield spec.var.name

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (as built in code, from an empty environment)."""
        f = cls._spec(name).field
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        if f.default is dataclasses.MISSING:
            raise AttributeError(f"{cls.var(name)} has no default: it is required")
        return f.default

    @classmethod
    def _read(cls, spec: _Spec, environ: Mapping[str, str]) -> Any:
        """The value of one field from ``environ``; ``_MISSING`` means the dataclass default."""
        if spec.var is None:
            return spec.kind.from_env(environ)  # type: ignore[attr-defined]
        var = spec.var
        if var.read is not None:
            return var.read(environ)
        raw = environ.get(var.name)
        if raw is None or (raw == "" and not var.blank):
            if var.derive is not None:
                return var.derive(environ)
            f = spec.field
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SettingsError(f"{var.name} is required{var.hint}")
            return _MISSING
        return _parse(var, spec.kind, spec.optional, raw)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read every field from ``environ`` (default ``os.environ``) and validate the result."""
        env = os.environ if environ is None else environ
        values = {}
        for spec in cls._specs():
            value = cls._read(spec, env)
            if value is not _MISSING:
                values[spec.field.name] = value
        return cls(**values)

    @classmethod
    def value_from_env(cls, name: str, environ: Mapping[str, str]) -> Any:
        """One field from ``environ`` (its default when unset), checked against its bounds."""
        spec = cls._spec(name)
        value = cls._read(spec, environ)
        if value is _MISSING:
            return cls.default(name)
        if spec.var is not None and value is not None:
            _check(spec.var, value)
        return value

    @classmethod
    def env_for(cls, **values: Any) -> dict[str, str]:
        """Variables that set the given fields, e.g. ``env_for(port=0)``; nothing else."""
        env: dict[str, str] = {}
        for name, value in values.items():
            spec = cls._spec(name)
            if spec.var is None:
                env.update(value.to_env())
            elif spec.var.write is not None:
                env.update(spec.var.write(value))
            else:
                if value is not None:
                    _check(spec.var, value)
                env[spec.var.name] = _format(value)
        return env

    def to_env(self) -> dict[str, str]:
        """Every field as variables: ``type(self).from_env(self.to_env()) == self``."""
        fields = {spec.field.name: getattr(self, spec.field.name) for spec in self._specs()}
        return type(self).env_for(**fields)


# -- shared fields, defined once --------------------------------------------------------------


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """Where the mesh keeps its data (``MESH_STATE_DIR``, default ``.state``), absolute."""
    return Path(environ.get("MESH_STATE_DIR") or ".state").expanduser().absolute()


def embedded_pg_dir(state_dir: Path) -> Path:
    """Data directory of the embedded PostgreSQL, whoever starts it (launcher or service)."""
    return state_dir / "postgres"


DEFAULT_MEMORY_ADDR = "127.0.0.1:50053"
DEFAULT_PERSISTER_ADDR = "127.0.0.1:50054"


def memory_addr_setting() -> Any:
    """``MESH_MEMORY_ADDR``: unset is the default address; empty turns recall and indexing off."""
    return setting("MESH_MEMORY_ADDR", DEFAULT_MEMORY_ADDR, blank=True)


def persister_addr_setting() -> Any:
    """``MESH_PERSISTER_ADDR``: unset is the default address; empty means no persister."""
    return setting("MESH_PERSISTER_ADDR", DEFAULT_PERSISTER_ADDR, blank=True)


def port_setting(default: int) -> Any:
    """``<prefix>PORT``: the gRPC port, 0 picks a free one."""
    return setting("PORT", default, minimum=0, maximum=65535)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class TlsSettings(Settings):
    """A service's mesh identity: the files of its certificate and of the CA it trusts.

    All three set turns mutual TLS on, for the service's own port and for its calls to the other
    services; none set leaves them plaintext, which is allowed on a loopback address only.

    Attributes:
        ca: PEM bundle of the CA certificates peers must chain to (``MESH_TLS_CA``).
        cert: this service's certificate, PEM (``MESH_TLS_CERT``).
        key: its private key, PEM (``MESH_TLS_KEY``).
        reload_s: how often, at most, the files are checked for a rotation
            (``MESH_TLS_RELOAD_S``).
    """

    ca: Path | None = setting("MESH_TLS_CA", None)
    cert: Path | None = setting("MESH_TLS_CERT", None)
    key: Path | None = setting("MESH_TLS_KEY", None)
    reload_s: float = setting("MESH_TLS_RELOAD_S", 1.0, minimum=0)

    @property
    def enabled(self) -> bool:
        return self.ca is not None

    def check(self) -> None:
        given = [p is not None for p in (self.ca, self.cert, self.key)]
        if any(given) and not all(given):
            raise SettingsError(
                "MESH_TLS_CA, MESH_TLS_CERT and MESH_TLS_KEY go together: set all three for "
                "mutual TLS (`mesh certs init` then `mesh certs issue <service>` writes them), "
                "or none"
            )


@dataclass(frozen=True, kw_only=True)
class ServiceSettings(Settings):
    """What every service has: listen host, metrics, drain time and log level.

    Attributes:
        host: gRPC (and metrics) listen host (``<prefix>HOST``).
        metrics_port: Prometheus port, 0 picks one, -1 turns the endpoint off
            (``<prefix>METRICS_PORT``).
        grace_s: drain time on SIGTERM (``<prefix>GRACE_S``).
        log_level: logging level (``<prefix>LOG_LEVEL``).
    """

    host: str = setting("HOST", "127.0.0.1")
    metrics_port: int = setting("METRICS_PORT", 0, minimum=-1, maximum=65535)
    grace_s: float = setting("GRACE_S", 10.0, minimum=0)
    log_level: str = setting("LOG_LEVEL", "INFO")
    tls: TlsSettings = field(default_factory=TlsSettings)

    def listens_with_tls(self) -> bool:
        """Whether the service's gRPC port serves TLS (the gateway's public port has its own)."""
        return self.tls.enabled

    def plaintext_fix(self) -> str:
        """How to give the port TLS, for the error of a plaintext non-loopback address."""
        return (
            "set MESH_TLS_CA, MESH_TLS_CERT and MESH_TLS_KEY (`mesh certs init` and "
            "`mesh certs issue <service>` write them)"
        )

    def check(self) -> None:
        if not is_loopback(self.host) and not self.listens_with_tls():
            raise SettingsError(
                f"{type(self).var('host')}={self.host!r} is not a loopback address and TLS is "
                f"off: anyone who can reach it could call the service. To fix: "
                f"{self.plaintext_fix()}; or listen on 127.0.0.1"
            )


@dataclass(frozen=True, kw_only=True)
class PostgresSettings(Settings):
    """How a service reaches PostgreSQL (the persister and the memory service share these).

    Attributes:
        pg_dsn: PostgreSQL DSN (``MESH_PG_DSN``); empty starts the embedded server in
            ``embedded_pg_dir``.
        state_dir: the mesh's local state (``MESH_STATE_DIR``, default ``.state``).
    """

    pg_dsn: Secret = setting("MESH_PG_DSN", Secret(""))
    state_dir: Path = setting("MESH_STATE_DIR", derive=default_state_dir)

    @property
    def embedded_pg_dir(self) -> Path:
        """``$MESH_STATE_DIR/postgres``, shared by every service of the machine."""
        return embedded_pg_dir(self.state_dir)


class Env:
    """Typed access to variables sharing a prefix, for configs outside the settings model
    (e.g. ``Env(os.environ, "MESH_ENVOY_")``)."""

    def __init__(self, environ: Mapping[str, str], prefix: builtins.str) -> None:
        self._environ = environ
        self._prefix = prefix

    def _raw(self, name: builtins.str) -> builtins.str | None:
        return self._environ.get(self._prefix + name)

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self._raw(name)
        return default if value is None or value == "" else value

    def int(
        self, name: builtins.str, default: builtins.int, *, minimum: builtins.int | None = None
    ) -> builtins.int:
        value = self._raw(name)
        if value is None or value == "":
            return default
        parsed: builtins.int = _parse(Var(self._prefix + name), int, False, value)
        _check(Var(self._prefix + name, minimum=minimum), parsed)
        return parsed

    def float(self, name: builtins.str, default: builtins.float) -> builtins.float:
        value = self._raw(name)
        if value is None or value == "":
            return default
        parsed: builtins.float = _parse(Var(self._prefix + name), float, False, value)
        return parsed

    def list(
        self, name: builtins.str, default: tuple[builtins.str, ...] = ()
    ) -> tuple[builtins.str, ...]:
        value = self._raw(name)
        if value is None or value.strip() == "":
            return default
        return tuple(part.strip() for part in value.split(",") if part.strip())


__all__ = [
    "DEFAULT_MEMORY_ADDR",
    "DEFAULT_PERSISTER_ADDR",
    "Env",
    "PostgresSettings",
    "Secret",
    "ServiceSettings",
    "Settings",
    "SettingsError",
    "TlsSettings",
    "Var",
    "default_state_dir",
    "embedded_pg_dir",
    "is_loopback",
    "memory_addr_setting",
    "persister_addr_setting",
    "port_setting",
    "setting",
]
