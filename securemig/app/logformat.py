"""
``--log-format text|json|journal`` of the twistd services.

twistd takes its log observer from its own ``--logger`` option, which it
reads after the plugin's options are parsed and before the service is
made; :func:`choose` sets that option to :func:`observer`, which writes
where twistd would have written (``--logfile``, ``-`` or, with ``-n`` and
no ``--logfile``, stdout; under systemd that is the journal):

``text``
    One line per event, as twistd's own (``TIME [LOGGER#LEVEL] MESSAGE``,
    a traceback under it), with addresses as ``HOST:PORT`` (never a Python
    repr) and the migration an event belongs to named on its line.
``json``
    One flat JSON object per line: ``time`` (ISO 8601, UTC), ``level``
    (debug, info, warning, error, critical), ``logger`` (the namespace),
    ``message`` (rendered), and where known ``migration_id``, ``vm``,
    ``peer``, ``role``, ``outcome``, ``code``, ``traceback``.
``journal``
    ``text`` with each line prefixed by its syslog priority (``<4>`` for a
    warning), which journald reads (``SyslogLevelPrefix=``, its default)
    so that ``journalctl -p warning`` finds warnings.  ``text`` and
    ``json`` get the prefix too when their stream is the journal
    (``$JOURNAL_STREAM`` names it); journald strips it.

An event's migration fields come from the event (``vm=``, ``peer=``,
``mid=``, ...) and, for events of a migration's connection, from its
``log_context()`` (Twisted's ``Logger`` on an instance makes the instance
the event's ``log_source``), or for lines logged by code it called (the
attestor, the host's arrival), from :data:`securemig.logcontext.CURRENT`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.internet.interfaces import IAddress
from twisted.logger import LogLevel, eventAsText, formatEvent
from twisted.python import usage
from twisted.python.logfile import LogFile

from securemig import logcontext

#: The values of ``--log-format``, the default first.
LOG_FORMATS = ("text", "json", "journal")

#: The option, as both services declare it.
OPTION: list[Any] = [
    "log-format",
    None,
    "text",
    "text: one line per event; json: one flat JSON object per line (time, level, logger, "
    "message, migration_id, vm, peer, outcome, code); journal: text with <N> syslog "
    "priority prefixes for journald.  To --logfile or stdout (with -n); replaces "
    "twistd's --logger.",
]

#: Syslog priorities of Twisted's levels (journald's ``<N>`` prefixes).
PRIORITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}
#: Level names as log collectors spell them.
LEVEL_NAME = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}
#: Event keys copied into a JSON line, by the name they take there.
FIELDS = {
    "migration_id": ("migration_id", "mid"),
    "journal_id": ("journal_id",),
    "vm": ("vm",),
    "peer": ("peer",),
    "role": ("role",),
    "outcome": ("outcome",),
    "code": ("code",),
}
#: Twisted's factory start/stop events: noise, and a repr of the factory.
NOISE = ("Starting factory {factory!r}", "Stopping factory {factory!r}")

#: Where :func:`observer` writes, and how: twistd's ``--logfile``, ``-n``
#: and the format.  twistd calls the observer factory without arguments,
#: so :func:`choose` keeps them here (one service per process).
_destination: tuple[str | None, bool, str] = (None, True, "text")


def choose(options: usage.Options) -> None:
    """Check ``--log-format`` and make twistd (the parent options) log
    through :func:`observer`.  ``text`` leaves twistd's own ``--logger`` or
    ``--syslog`` alone when one is given."""
    fmt = options["log-format"]
    if fmt not in LOG_FORMATS:
        raise usage.UsageError(f"--log-format {fmt!r}: one of {', '.join(LOG_FORMATS)}")
    parent: Any = getattr(options, "parent", None)
    if parent is None or "logfile" not in parent:
        # Not under twistd (twist has its own --log-format): nothing to set.
        return
    if parent.get("logger") or parent.get("syslog"):
        if fmt == "text":
            return
        if parent.get("logger"):
            raise usage.UsageError(f"give either twistd --logger or --log-format {fmt}, not both")
        raise usage.UsageError(f"--log-format {fmt} writes to --logfile or stdout, not syslog")
    global _destination
    _destination = (parent["logfile"], bool(parent.get("nodaemon")), fmt)
    if _destination[0] == "-" and not _destination[1]:
        raise usage.UsageError("a daemon cannot log to stdout: add -n or give --logfile FILE")
    parent["logger"] = f"{__name__}.observer"


def observer() -> Any:
    """The observer of the chosen format on twistd's log file or stdout:
    an ``ILogObserver`` (a callable taking an event)."""
    path, nodaemon, fmt = _destination
    out: IO[Any]
    if path == "-" or (nodaemon and not path):
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(path or "twistd.log")
    return LineObserver(out, fmt, prefixed=fmt == "journal" or to_journal(out))


#: The observer factory's earlier name (``--logger securemig.app.logformat.json_observer``).
def json_observer() -> Any:
    """A JSON observer on twistd's log file or stdout."""
    global _destination
    _destination = (_destination[0], _destination[1], "json")
    return observer()


def to_journal(out: IO[Any]) -> bool:
    """Whether ``out`` is the journal's stream: systemd sets
    ``$JOURNAL_STREAM`` to its ``DEVICE:INODE`` for a service's stdout."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(out.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class LineObserver:
    """Writes each event as one line (text, json or journal) to ``out``."""

    def __init__(self, out: IO[Any], fmt: str, prefixed: bool = False) -> None:
        self.out = out
        self.fmt = fmt
        self.prefixed = prefixed

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_format") in NOISE:
            return
        text = self.render(event)
        if text is None:
            return
        self.out.write(text)
        self.out.flush()

    def render(self, event: dict[str, Any]) -> str | None:
        """The line(s) for ``event``, with their newline."""
        event = readable(event)
        level = level_of(event)
        prefix = f"<{PRIORITY[level]}>" if self.prefixed else ""
        if self.fmt == "json":
            return prefix + json.dumps(flat(event), separators=(",", ":"), default=str) + "\n"
        said = eventAsText(event, includeTraceback=True, formatTime=_text_time)
        if not said:
            return None
        mid = migration_fields(event).get("migration_id")
        lines = said.split("\n")
        if mid and mid not in said:
            lines[0] += f" (migration {mid})"
        # Every line of a traceback keeps the event's priority.
        return "".join(f"{prefix}{line}\n" for line in lines)


def _text_time(when: float | None) -> str:
    if when is None:
        return "-"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def level_of(event: dict[str, Any]) -> LogLevel:
    """The event's level (a legacy error event is an error)."""
    level = event.get("log_level")
    if level in PRIORITY:
        return cast(LogLevel, level)
    return LogLevel.error if event.get("isError") else LogLevel.info


def address(value: Any) -> Any:
    """An address as ``HOST:PORT`` (or its name), other values as they are."""
    if IAddress.providedBy(value):
        host, port = getattr(value, "host", None), getattr(value, "port", None)
        if host is not None and port is not None:
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        name = getattr(value, "name", None)
        return str(name.decode(errors="replace") if isinstance(name, bytes) else name)
    return value


def readable(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its address values as ``HOST:PORT`` strings."""
    if not any(IAddress.providedBy(v) for v in event.values()):
        return event
    return {k: address(v) for k, v in event.items()}


def migration_fields(event: dict[str, Any]) -> dict[str, str]:
    """The migration an event belongs to: its source's ``log_context()``
    (a migration's connection), and the event's own fields for the rest."""
    found: dict[str, str] = {}
    source = event.get("log_source")
    context = getattr(source, "log_context", None)
    if not callable(context):
        # Logged by code a migration's connection called (the attestor, the
        # host's arrival or departure): the migration it works for.
        context = logcontext.CURRENT.get()
    if callable(context):
        # A context is a convenience: never lose the event over it.
        with contextlib.suppress(Exception):
            found.update({k: str(v) for k, v in context().items() if v is not None})
    for name, keys in FIELDS.items():
        # The connection's context is the fuller one (a peer's name and address).
        if name in found:
            continue
        for key in keys:
            value = event.get(key)
            if value is not None and value != "":
                found[name] = str(address(value))
                break
    return found


def flat(event: dict[str, Any]) -> dict[str, Any]:
    """One JSON object for ``event``: no nesting, no Twisted internals."""
    when = event.get("log_time")
    line: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
            if when is not None
            else None
        ),
        "level": LEVEL_NAME[level_of(event)],
        "logger": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    line.update(migration_fields(event))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            line["traceback"] = failure.getTraceback()
        except Exception:
            line["traceback"] = repr(failure)
    return line
