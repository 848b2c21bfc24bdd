"""``securemig vm adopt``: bring an existing libvirt domain under securemig's
care (:mod:`securemig.hypervisor.libvirt`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from securemig.app.cli.common import (
    EXIT_OK,
    check_identity,
    describe,
    error,
    run_interruptible,
)
from securemig.hypervisor.libvirt_info import DEFAULT_URI
from securemig.protocol.errors import MigrationError
from securemig.trust.attestor import open_attestor
from securemig.trust.tpm.tpm import TPMError


def add_adopt_parser(vm_sub: Any) -> None:
    """Register ``securemig vm adopt``."""
    adopt = vm_sub.add_parser(
        "adopt",
        help="bring a libvirt domain with an encrypted vTPM under securemig's care",
        description="Seal the value of DOMAIN's vTPM secret to this host's TPM (DIR/DOMAIN/), "
        "then undefine the libvirt secret: from then on only `securemig vm start` (and an "
        "attested migration) give it to libvirt, ephemeral and private, for as long as swtpm "
        "needs to start. A domain without an emulator vTPM encrypted by a secret is refused.",
    )
    adopt.add_argument("name", metavar="DOMAIN", help="the libvirt domain's name")
    adopt.add_argument("--dir", required=True, type=Path, help="directory holding VM bundles")
    adopt.add_argument(
        "--identity",
        required=True,
        type=Path,
        help="this host's identity directory: its TPM seals the secret",
    )
    adopt.add_argument(
        "--connect", metavar="URI", default=DEFAULT_URI, help=f"libvirt URI (default {DEFAULT_URI})"
    )
    adopt.set_defaults(func=cmd_vm_adopt)


def cmd_vm_adopt(args: argparse.Namespace) -> int:
    """``securemig vm adopt``: seal a domain's vTPM secret, undefine libvirt's."""
    check_identity(args.identity)

    def seal(value: bytes) -> bytes:
        with open_attestor(args.identity, None, False) as attestor:
            return attestor.seal(value)

    async def adopt(reactor: Any) -> Any:
        # Here, not at the top: every other command starts without the
        # libvirt backend's module (hypervisor/libvirt_info.py).
        from securemig.hypervisor.libvirt import LibvirtBackend

        backend = LibvirtBackend(reactor)
        try:
            return await backend.adopt(args.dir, args.name, args.connect, seal)
        finally:
            backend.close()

    try:
        bundle = run_interruptible(adopt)
    except TPMError as e:
        return error(f"{e}; the host TPM that {args.identity / 'host.json'} names must be running")
    except (MigrationError, OSError, ValueError) as e:
        return error(describe(e))
    print(f"adopted domain {bundle.name} at {bundle.path}: its vTPM secret is sealed to this host")
    return EXIT_OK
