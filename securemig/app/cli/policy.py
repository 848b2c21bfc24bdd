"""``securemig policy show|record|forget``: golden PCR values of peers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from securemig.app.cli.common import EXIT_OK, Subparsers, UsageError, error, int_list
from securemig.trust import attestor
from securemig.trust.policy import PolicyStore
from securemig.trust.tpm.tpm import TPM, TPMError

#: PCRs attested by default: firmware, firmware config, option ROMs, boot loader, secure boot.
DEFAULT_PCRS = ",".join(str(p) for p in attestor.DEFAULT_PCRS)
#: The highest PCR index of a TPM 2.0 PC client (24 PCRs).
MAX_PCR = 23


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig policy`` and its actions."""
    pol = subparsers.add_parser("policy", help="golden PCR values of peers")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    for action, text in (
        ("show", "print recorded golden values"),
        ("record", "record a host's current PCR values from its TPM"),
        ("forget", "remove a host's golden values"),
    ):
        a = pol_sub.add_parser(action, help=text)
        a.add_argument("--policy-dir", type=Path, required=True)
        a.add_argument("--host", required=action != "show", help="the peer's host name")
        if action == "record":
            a.add_argument("--tpm", required=True, help="TCTI of that host's TPM")
            a.add_argument(
                "--pcrs",
                default=DEFAULT_PCRS,
                help="comma-separated PCR indices (default %(default)s)",
            )
    pol.set_defaults(func=cmd_policy)


def cmd_policy(args: argparse.Namespace) -> int:
    """``securemig policy show|record|forget``."""
    action: Callable[[PolicyStore, argparse.Namespace], int] = {
        "show": _show,
        "record": _record,
        "forget": _forget,
    }[args.policy_command]
    try:
        return action(PolicyStore(args.policy_dir), args)
    except ValueError as e:
        return error(str(e))


def _show(store: PolicyStore, args: argparse.Namespace) -> int:
    """Print the golden values of ``--host``, or of every host."""
    for host in [args.host] if args.host else store.hosts():
        golden = store.get(host)
        if golden is None:
            return error(f"no golden values for {host}")
        print(golden.to_json().decode(), end="")
    return EXIT_OK


def _record(store: PolicyStore, args: argparse.Namespace) -> int:
    """Record the current values of ``--pcrs`` in the TPM at ``--tpm`` as
    the golden values of ``--host``."""
    pcrs = int_list(args.pcrs, "--pcrs")
    if max(pcrs) > MAX_PCR:
        raise UsageError(f"--pcrs takes PCR indices from 0 to {MAX_PCR}, not {max(pcrs)}")
    try:
        with TPM(args.tpm) as tpm:
            values = tpm.pcr_read(pcrs)
    except TPMError as e:
        return error(str(e))
    store.record(args.host, values)
    print(f"recorded PCRs {args.pcrs} of {args.host}")
    return EXIT_OK


def _forget(store: PolicyStore, args: argparse.Namespace) -> int:
    """Remove the golden values of ``--host``."""
    if not store.forget(args.host):
        return error(f"no golden values for {args.host}")
    print(f"forgot the golden values of {args.host}")
    return EXIT_OK
