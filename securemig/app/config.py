"""
The configuration file, ``/etc/securemig/securemig.toml``: defaults for the
options of ``securemig`` and ``twistd securemig``; options given on the
command line override it.

Its path is ``--config PATH``, else ``$SECUREMIG_CONFIG``, else
:data:`DEFAULT_PATH` (which may be absent; a path given explicitly must
exist).  Every key is declared once, in :data:`KEYS`, with its type and the
options it stands for; a key the table does not know, or a value of the
wrong type, is one error naming the file, the key and what was expected
(:class:`ConfigError`: exit status 2 for ``securemig``, a usage error for
twistd).  ``securemig config show`` prints the effective values and where
each came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securemig.hypervisor import backends
from securemig.protocol import wire

#: Where the configuration file is looked for by default.
DEFAULT_PATH = Path("/etc/securemig/securemig.toml")

#: Names the configuration file when no ``--config`` is given.
CONFIG_ENV = "SECUREMIG_CONFIG"

#: Bytes of a configuration file read at most (it is a few lines).
MAX_SIZE = 1 << 20


def positive(value: float) -> str | None:
    """A validator: a number above zero."""
    return None if value > 0 else "must be positive"


def https_url(value: str) -> str | None:
    """A validator: the privacy CA's URL (``--crl``)."""
    return None if value.startswith("https://") else "must be the privacy CA's https:// URL"


def chunk_kib(value: int) -> str | None:
    """A validator: a DATA frame size in KiB the wire takes."""
    low, high = wire.MIN_CHUNK_SIZE // 1024, wire.MAX_CHUNK_SIZE // 1024
    return None if low <= value <= high else f"must be between {low} and {high}"


def channels(value: int) -> str | None:
    """A validator: multifd channels of a live migration (``--parallel``;
    each backend bounds it further: QEMU 8, libvirt 16)."""
    return None if 0 <= value <= 16 else "must be between 0 (one stream) and 16"


#: A validator: a problem with a value (``must be positive``), or None.
Validator = Callable[[Any], str | None]

#: Validators of options that have no key in the file (the same for every
#: command that takes the option).
OPTION_CHECKS: dict[str, Validator] = {"crl": https_url, "crl-max-age": positive}


def refusal(option: str, value: Any, check: Validator | None) -> str | None:
    """The sentence refusing ``value`` of ``--option`` (the same from
    ``securemig`` and ``twistd securemig``), or None when ``check`` takes it
    (or there is no value)."""
    if check is None or value is None:
        return None
    problem = check(value)
    return None if problem is None else f"--{option} {problem}"


def refusal_of(section: str, name: str, value: Any) -> str | None:
    """:func:`refusal` with the validator of key ``[section] name`` (its
    option is spelled as the key), or of :data:`OPTION_CHECKS`."""
    key = KEYS.get(section, {}).get(name)
    return refusal(name, value, key.check if key is not None else OPTION_CHECKS.get(name))


@dataclass(frozen=True)
class Key:
    """One key of the file: its type (``path``, ``str``, ``int``, ``float``,
    ``bool``, ``list``: of strings), what it is, and the options it is the
    default of: ``securemig`` commands by their name (``migrate``, ``vm
    create``, ``policy *`` for every policy action) with the argparse
    destination, and ``service`` with the ``twistd securemig`` option.
    ``choices``, if given, returns the values the key takes (asked when a
    file is checked, so a registry filled later is seen); ``check``, if
    given, is the validator of the options it stands for (:func:`refusal`),
    applied to their effective value: a flag may override a bad value in the
    file."""

    type: str
    help: str
    commands: Mapping[str, str] = field(default_factory=dict)
    choices: Callable[[], Iterable[str]] | None = None
    check: Validator | None = None


#: Every key, by section and name.
KEYS: dict[str, dict[str, Key]] = {
    "paths": {
        "identity": Key(
            "path",
            "this host's identity directory (securemig host init)",
            {
                "vm create": "identity",
                "vm start": "identity",
                "migrate": "identity",
                "recover": "identity",
                "host init": "dir",
                "host renew": "identity",
                "policy *": "identity",
                "service": "identity",
            },
        ),
        "state-dir": Key(
            "path",
            "this host's state directory: its journal, arrived VMs, staging",
            {
                "vm start": "state_dir",
                "vm status": "state_dir",
                "migrate": "state_dir",
                "status": "state_dir",
                "jobs": "state_dir",
                "abort": "state_dir",
                "recover": "state_dir",
                "journal export": "state_dir",
                "service": "state-dir",
            },
        ),
        "vm-dir": Key(
            "path",
            "the directory of this host's VM bundles",
            {
                "vm create": "dir",
                "vm start": "dir",
                "vm status": "dir",
                "vm list": "dir",
                "migrate": "vm_dir",
            },
        ),
        "policy-dir": Key(
            "path",
            "golden values of peers (default: IDENTITY/policy)",
            {"migrate": "policy_dir", "policy *": "policy_dir", "service": "policy-dir"},
        ),
    },
    "migrate": {
        "destination": Key("str", "HOST:PORT of the destination (--to)", {"migrate": "to"}),
        "destination-name": Key(
            "str", "the name the destination must prove", {"migrate": "destination_name"}
        ),
        "bandwidth": Key("float", "MiB/s of images at most", {"migrate": "bandwidth"}),
        "chunk-kib": Key(
            "int", "DATA frame size in KiB", {"migrate": "chunk_kib"}, check=chunk_kib
        ),
        "tofu": Key("bool", "trust a destination's values on first use", {"migrate": "tofu"}),
        "idle-timeout": Key(
            "float", "seconds without progress", {"migrate": "idle_timeout"}, check=positive
        ),
        "deadline": Key(
            "float", "seconds for a whole migration", {"migrate": "deadline"}, check=positive
        ),
        "parallel": Key(
            "int",
            "multifd channels of a live migration (0: one stream)",
            {"migrate": "parallel"},
            check=channels,
        ),
        "daemon": Key(
            "bool", "have this host's twistd securemig drive the migration", {"migrate": "daemon"}
        ),
    },
    "service": {
        "listen": Key("str", "endpoint of the secure variant", {"service": "listen"}),
        "insecure-listen": Key(
            "str", "endpoint of the INSECURE variant", {"service": "insecure-listen"}
        ),
        "data-ports": Key("str", "LOW-HIGH ports of data channels", {"service": "data-ports"}),
        "tls-data": Key("bool", "images inside TLS, no data channel", {"service": "tls-data"}),
        "tls-cipher": Key("str", "the one TLS 1.3 cipher suite", {"service": "tls-cipher"}),
        "backend": Key(
            "str",
            "hypervisor backend: a registered kind (image, qemu, ...)",
            {"service": "backend"},
            choices=backends.kinds,
        ),
        "allow-source": Key("list", "source host names accepted", {"service": "allow-source"}),
        "tofu": Key("bool", "trust a source's values on first use", {"service": "tofu"}),
        "idle-timeout": Key(
            "float", "seconds without progress", {"service": "idle-timeout"}, check=positive
        ),
        "deadline": Key(
            "float", "seconds for a whole migration", {"service": "deadline"}, check=positive
        ),
        "resolve-interval": Key(
            "float",
            "seconds between recovery rounds",
            {"service": "resolve-interval"},
            check=positive,
        ),
        "handshake-timeout": Key(
            "float", "seconds for a TLS handshake", {"service": "handshake-timeout"}, check=positive
        ),
        "max-startups": Key(
            "str", "START:RATE:FULL before the handshake", {"service": "max-startups"}
        ),
        "per-source-max-startups": Key(
            "int", "pending connections per address", {"service": "per-source-max-startups"}
        ),
        "log-format": Key("str", "text, json or journal", {"service": "log-format"}),
        "metrics": Key("str", "endpoint of the Prometheus metrics", {"service": "metrics"}),
    },
}


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the file
    and what is wrong with it."""


@dataclass
class Config:
    """The values a configuration file gives, by ``(section, key)``, and
    where they came from (``path``: None when there is no file)."""

    path: Path | None
    values: dict[tuple[str, str], Any]

    def defaults_for(self, command: str) -> dict[str, Any]:
        """The option defaults this file gives ``command`` (``migrate``,
        ``vm create``, ``service``...), by argparse destination or twistd
        option name."""
        found: dict[str, Any] = {}
        for (section, name), value in self.values.items():
            for pattern, dest in KEYS[section][name].commands.items():
                if pattern == command or (
                    pattern.endswith(" *") and command.startswith(pattern[:-1])
                ):
                    found[dest] = value
        return found

    def origin(self, section: str, name: str) -> str:
        """Where a key's value comes from: the file, or the default."""
        if (section, name) in self.values and self.path is not None:
            return f"file {self.path}"
        return "default"


def path_from(given: str | Path | None) -> tuple[Path, bool]:
    """The configuration file's path and whether it was asked for (then it
    must exist): ``given`` (``--config``), ``$SECUREMIG_CONFIG``, else
    :data:`DEFAULT_PATH`."""
    if given:
        return Path(given), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    return DEFAULT_PATH, False


def load(given: str | Path | None = None) -> Config:
    """The configuration of :func:`path_from`, checked against :data:`KEYS`;
    an empty one when the default file does not exist."""
    path, explicit = path_from(given)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SIZE + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"no configuration file {path}") from None
        return Config(None, {})
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file {path}: {e.strerror}") from None
    if len(raw) > MAX_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_SIZE} bytes; not a configuration file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path} is not TOML: {e}") from None
    return Config(path, check(path, data))


def check(path: Path, data: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """The values of a parsed file, or :class:`ConfigError` for the first
    section or key :data:`KEYS` does not know or value of the wrong type."""
    values: dict[tuple[str, str], Any] = {}
    for section, table in data.items():
        if section in KEYS and not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a section, [{section}], not a value")
        if section not in KEYS:
            raise ConfigError(
                f"{path}: unknown section [{section}]; sections are "
                + ", ".join(f"[{s}]" for s in KEYS)
            )
        for name, value in table.items():
            key = KEYS[section].get(name)
            if key is None:
                raise ConfigError(
                    f"{path}: unknown key {name!r} in [{section}]; known: "
                    + ", ".join(KEYS[section])
                )
            values[(section, name)] = _typed(path, f"[{section}] {name}", key.type, value)
            if key.choices is not None and value not in (known := tuple(key.choices())):
                raise ConfigError(
                    f"{path}: [{section}] {name} must be one of {', '.join(known)}, not {value!r}"
                )
    return values


_TYPE_NAMES = {
    "path": "a path (a string)",
    "str": "a string",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "list": "a list of strings",
}


def _typed(path: Path, where: str, kind: str, value: Any) -> Any:
    ok = {
        "path": isinstance(value, str) and value != "",
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise ConfigError(f"{path}: {where} must be {_TYPE_NAMES[kind]}, not {value!r}")
    if kind == "path":
        return Path(value)
    if kind == "float":
        return float(value)
    return value
