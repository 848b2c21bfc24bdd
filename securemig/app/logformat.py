"""
``--log-format json|text`` of the twistd services.

twistd takes its log observer from its own ``--logger`` option, which it
reads after the plugin's options are parsed and before the service is
made; ``--log-format json`` sets that option to :func:`json_observer`, an
observer writing Twisted's ``eventAsJSON`` one object per line to where
twistd would have written text (``--logfile``, ``-`` or, with ``-n`` and
no ``--logfile``, stdout).  Under systemd that is the journal.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import jsonFileLogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile

#: The values of ``--log-format``, the default first.
LOG_FORMATS = ("text", "json")

#: The option, as both services declare it.
OPTION: list[Any] = [
    "log-format",
    None,
    "text",
    "Log as text (twistd's own) or json: one Twisted eventAsJSON object per line, "
    "to --logfile or stdout (with -n); replaces twistd's --logger.",
]

#: Where :func:`json_observer` writes: twistd's ``--logfile`` and ``-n``.
#: twistd calls the observer factory without arguments, so the options
#: that :func:`choose` saw are kept here for it (one service per process).
_destination: tuple[str | None, bool] = (None, True)


def choose(options: usage.Options) -> None:
    """Check ``--log-format`` and, for ``json``, make twistd (the parent
    options) log through :func:`json_observer`."""
    fmt = options["log-format"]
    if fmt not in LOG_FORMATS:
        raise usage.UsageError(f"--log-format {fmt!r}: one of {', '.join(LOG_FORMATS)}")
    parent: Any = getattr(options, "parent", None)
    if fmt == "text" or parent is None or "logfile" not in parent:
        # Not under twistd (twist has its own --log-format): nothing to set.
        return
    if parent.get("logger"):
        raise usage.UsageError("give either twistd --logger or --log-format json, not both")
    if parent.get("syslog"):
        raise usage.UsageError("--log-format json writes to --logfile or stdout, not syslog")
    global _destination
    _destination = (parent["logfile"], bool(parent.get("nodaemon")))
    if _destination[0] == "-" and not _destination[1]:
        raise usage.UsageError("a daemon cannot log to stdout: add -n or give --logfile FILE")
    parent["logger"] = f"{__name__}.json_observer"


def json_observer() -> Any:
    """Twisted's JSON log observer, one event per line (no record
    separator), on twistd's log file or stdout: an ``ILogObserver``
    (Twisted declares it through zope, which mypy does not see)."""
    path, nodaemon = _destination
    out: IO[Any]
    if path == "-" or (nodaemon and not path):
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(path or "twistd.log")
    return jsonFileLogObserver(out, recordSeparator="")
