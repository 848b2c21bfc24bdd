"""
The ``securemig`` console script's entry point.

``securemig migrate ... --daemon`` only asks this host's daemon to drive
the migration (:mod:`securemig.app.control_client`); for it this module
imports nothing but the standard library, so that asking costs a bare
interpreter's start-up, not one full of Twisted, cryptography and the TSS
(``doc/performance.rst``).  Whatever it cannot decide from the command line
alone (a configuration file that may name the state directory, an option it
does not know, ``--help``) and every other command go to the full
:func:`securemig.app.cli.main.main`, which parses the same line and also
supports ``--daemon``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from securemig.app import control_client

#: ``securemig.app.config.DEFAULT_PATH`` (not imported: that module is not
#: light; ``tests/app/test_control.py`` checks the two agree).
CONFIG_DEFAULT_PATH = Path("/etc/securemig/securemig.toml")


def main() -> int:
    """Run ``securemig ARGS``: a ``migrate --daemon`` the light way when the
    line alone says which daemon to ask, anything else in full."""
    argv = sys.argv[1:]
    state = daemon_state_dir(argv, os.environ)
    if state is not None:
        return control_client.ask(state, argv)
    # The full command: imported only here, where it is needed.
    from securemig.app.cli.main import main as full

    return full()


def daemon_state_dir(argv: list[str], env: os._Environ[str] | dict[str, str]) -> Path | None:
    """The state directory whose daemon ``argv`` (``migrate ... --daemon``)
    asks, as :func:`~securemig.app.cli.journal.source_state_dir` finds it;
    None when this is another command, or the line alone cannot tell (a
    configuration file may apply, an abbreviated option, help)."""
    i = 0
    while i < len(argv) and argv[i] == "--debug":
        i += 1
    if i >= len(argv) or argv[i] != "migrate":
        return None
    rest = argv[i + 1 :]
    if "--daemon" not in rest or any(w.startswith("--no-d") for w in rest):
        # --no-daemon (or its abbreviation) anywhere: the full command decides.
        return None
    values: dict[str, str] = {}
    j = 0
    while j < len(rest):
        word = rest[j]
        if word in ("-h", "--help") or word.startswith("--config"):
            return None
        name, sep, value = word.partition("=")
        if name in ("--state-dir", "--vm-dir"):
            if not sep:
                if j + 1 >= len(rest):
                    return None
                j += 1
                value = rest[j]
            values[name] = value
        elif name.startswith(("--st", "--vm")):
            # An abbreviation argparse would take for one of them.
            return None
        j += 1
    if "--state-dir" in values:
        return Path(values["--state-dir"])
    if env.get("SECUREMIG_CONFIG") or CONFIG_DEFAULT_PATH.exists():
        # The file may name the state directory or the VM directory.
        return None
    if env.get("SECUREMIG_STATE_DIR"):
        return Path(env["SECUREMIG_STATE_DIR"])
    if "--vm-dir" in values:
        return Path(values["--vm-dir"]) / ".securemig"
    return None


if __name__ == "__main__":
    sys.exit(main())
