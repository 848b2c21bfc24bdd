"""``securemig policy show|record|export|import|forget``: attestation policies.

A policy names the PCR selection a verifier asks its peer to quote and the
values it accepts (``securemig.trust.policy``).  ``record`` reads a TPM:
the host's own (``--identity``, run on that host) or one reachable by TCTI.
It writes a peer's own policy (``--host``) or a class policy for hosts
matching ``--hosts`` patterns or ``--labels`` (``--class NAME``);
``export`` prints or writes one as a file that ``import`` installs in the
other hosts' policy directories.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from securemig import files
from securemig.app.cli.common import EXIT_OK, Subparsers, UsageError, error
from securemig.trust.identity import Identity
from securemig.trust.policy import (
    DEFAULT_BANKS,
    Policy,
    PolicyStore,
    format_selection,
    parse_selection,
)
from securemig.trust.tpm.tpm import TPM, TPMError

#: PCRs attested by default: firmware, firmware config, option ROMs, boot loader, secure boot.
DEFAULT_PCRS = format_selection(DEFAULT_BANKS)


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig policy`` and its actions."""
    pol = subparsers.add_parser("policy", help="attestation policies: what peers must show")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    for action, text in (
        ("show", "print the policies and what is kept of each peer"),
        ("record", "record a host's current PCR values from its TPM as a policy"),
        ("export", "write a peer's or a class's policy as a file for other hosts"),
        ("import", "install an exported policy file"),
        ("forget", "remove a peer's values, or a class policy"),
    ):
        a = pol_sub.add_parser(action, help=text)
        a.add_argument(
            "--policy-dir", type=Path, help="the policy directory (default: IDENTITY/policy)"
        )
        a.add_argument(
            "--identity", type=Path, help="this host's identity directory (securemig host init)"
        )
        if action != "import":
            a.add_argument("--host", help="a peer's host name (its own policy)")
            a.add_argument("--class", dest="class_name", help="a class policy's name")
        if action == "record":
            a.add_argument(
                "--tpm",
                help="read the values from the TPM at this TCTI (default: this host's own "
                "TPM, from --identity).  They are read as they are now, not attested by a "
                "quote: run this on the known-good host itself (or on a TPM you trust); "
                "the policy is stored in --policy-dir of --identity either way",
            )
            a.add_argument(
                "--pcrs",
                default=DEFAULT_PCRS,
                help="the PCR selection, e.g. sha256:0-5,7+sha1:0 (default %(default)s)",
            )
        if action in ("record", "export"):
            a.add_argument(
                "--hosts", nargs="+", default=[], help="host name patterns a class applies to"
            )
            a.add_argument("--labels", nargs="+", default=[], help="labels a class applies to")
        if action == "export":
            a.add_argument("--out", type=Path, help="the file to write (default: stdout)")
        if action == "import":
            a.add_argument("file", type=Path, help="a file written by policy export")
            a.add_argument("--host", help="install it as this peer's own policy instead")
    pol.set_defaults(func=cmd_policy)


def cmd_policy(args: argparse.Namespace) -> int:
    """``securemig policy ACTION``."""
    action: Callable[[PolicyStore, argparse.Namespace], int] = {
        "show": _show,
        "record": _record,
        "export": _export,
        "import": _import,
        "forget": _forget,
    }[args.policy_command]
    if args.policy_dir is None and args.identity is None:
        raise UsageError("give --policy-dir, or --identity for this host's policy directory")
    try:
        return action(PolicyStore(args.policy_dir or args.identity / "policy"), args)
    except (ValueError, KeyError) as e:
        return error(str(e).strip("'\""))


def _target(args: argparse.Namespace) -> None:
    if bool(args.host) == bool(args.class_name):
        raise UsageError("give either --host (a peer's own policy) or --class NAME")
    record = args.policy_command == "record"
    if record and args.class_name and not (args.hosts or args.labels):
        raise UsageError("a class policy needs --hosts patterns or --labels")


def _show(store: PolicyStore, args: argparse.Namespace) -> int:
    """Print ``--host``'s file, ``--class``'s policy, or everything."""
    if args.class_name:
        policy = store.classes().get(args.class_name)
        if policy is None:
            return error(f"no class policy {args.class_name}")
        print(json.dumps(policy.to_dict(), indent=2))
        return EXIT_OK
    for name, policy in [] if args.host else sorted(store.classes().items()):
        print(json.dumps({"class": name, **policy.to_dict()}, indent=2))
    for host in [args.host] if args.host else store.hosts():
        golden = store.get(host)
        if golden is None:
            return error(f"no golden values for {host}")
        print(golden.to_json().decode(), end="")
    return EXIT_OK


def _record(store: PolicyStore, args: argparse.Namespace) -> int:
    """Record the current values of ``--pcrs`` in a TPM as ``--host``'s
    own policy or as the class policy ``--class``."""
    _target(args)
    try:
        banks = parse_selection(args.pcrs)
    except ValueError as e:
        raise UsageError(f"--pcrs takes a selection like sha256:0-5,7+sha1:0 ({e})") from None
    tcti = args.tpm
    recorded_from = args.host or ""
    if tcti is None:
        if args.identity is None:
            raise UsageError("give --tpm, or --identity to read this host's own TPM")
        identity = Identity.load(args.identity)
        tcti, recorded_from = identity.tpm, identity.name
    try:
        with TPM(tcti) as tpm:
            values = tpm.pcr_values(banks)
    except TPMError as e:
        return error(str(e))
    if args.class_name:
        policy = Policy.recorded_now(
            values,
            recorded_from=recorded_from,
            name=args.class_name,
            hosts=tuple(args.hosts),
            labels=tuple(args.labels),
        )
        path = store.add_class(policy)
        print(f"recorded PCRs {format_selection(banks)} as class policy {args.class_name} ({path})")
    else:
        store.record(args.host, Policy.recorded_now(values, recorded_from=recorded_from))
        print(f"recorded PCRs {format_selection(banks)} of {args.host}")
    return EXIT_OK


def _export(store: PolicyStore, args: argparse.Namespace) -> int:
    """Write a peer's own policy (as a class policy when ``--class`` and
    ``--hosts``/``--labels`` are given with ``--host``) or a class policy."""
    if not args.host and not args.class_name:
        raise UsageError("give --host or --class NAME")
    if args.host:
        golden = store.get(args.host)
        if golden is None or golden.policy is None:
            return error(f"no policy of its own for {args.host}")
        policy = golden.policy
        if args.class_name:
            policy = replace(policy, name=args.class_name)
    else:
        found = store.classes().get(args.class_name)
        if found is None:
            return error(f"no class policy {args.class_name}")
        policy = found
    if args.hosts or args.labels:
        policy = replace(policy, hosts=tuple(args.hosts), labels=tuple(args.labels))
    text = json.dumps(policy.to_dict(), indent=2) + "\n"
    if args.out is None:
        print(text, end="")
    else:
        files.write_durably(args.out, text.encode())
        print(f"wrote {args.out}")
    return EXIT_OK


def _import(store: PolicyStore, args: argparse.Namespace) -> int:
    """Install an exported policy: as a class policy (it names its hosts or
    labels), or as ``--host``'s own."""
    try:
        raw = args.file.read_bytes()
    except OSError as e:
        return error(f"cannot read {args.file}: {e.strerror}")
    try:
        policy = Policy.from_dict(json.loads(raw))
    except json.JSONDecodeError as e:
        return error(f"{args.file} is not a policy file: {e.msg}")
    if args.host:
        store.record(args.host, replace(policy, name="", hosts=(), labels=()))
        print(f"installed {args.file} as the policy of {args.host}")
        return EXIT_OK
    path = store.add_class(policy)
    print(f"installed class policy {policy.name} ({path})")
    return EXIT_OK


def _forget(store: PolicyStore, args: argparse.Namespace) -> int:
    """Remove ``--host``'s values, or the class policy ``--class``."""
    _target(args)
    if args.class_name:
        if not store.forget_class(args.class_name):
            return error(f"no class policy {args.class_name}")
        print(f"forgot class policy {args.class_name}")
        return EXIT_OK
    if not store.forget(args.host):
        return error(f"no golden values for {args.host}")
    print(f"forgot the golden values of {args.host}")
    return EXIT_OK
