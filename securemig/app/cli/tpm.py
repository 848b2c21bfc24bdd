"""``securemig tpm simulate``: a simulated host TPM (swtpm) for a test site,
made and run the way the lab and the demo do it."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from securemig.app.cli.common import EXIT_OK, CommandError, Subparsers, UsageError
from securemig.trust.tpm import swtpm


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig tpm simulate``."""
    tpm = subparsers.add_parser("tpm", help="a simulated host TPM (swtpm) for test sites")
    tpm_sub = tpm.add_subparsers(dest="tpm_command", required=True, metavar="ACTION")
    sim = tpm_sub.add_parser(
        "simulate",
        help="create (once) and run a swtpm host TPM in DIR until interrupted",
        description="Manufactures a TPM 2.0 in DIR/state (first run only) with EK "
        "certificates from a local 'vendor' CA in DIR/vendor-ca, runs it on loopback, "
        "and prints the TCTI to put in `securemig host init --tpm` and the vendor CA "
        "certificates to give `securemig pca init --vendor-ca`.  Ctrl-C (or SIGTERM) "
        "ends it; its state stays in DIR for the next run, and so does its port "
        "(DIR/port), so the TCTI stays the same.  A simulator, for tests and "
        "demonstrations: a production host uses its real TPM (device:/dev/tpmrm0).",
    )
    sim.add_argument(
        "dir",
        type=Path,
        nargs="+",
        help="where the TPM's state and its vendor CA live; several: one TPM each, all "
        "made by the first one's vendor CA (one per host of a test site)",
    )
    sim.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    sim.add_argument(
        "--port",
        type=int,
        help="TCP port of the TPM (its control port is the next one; default: the "
        "port of the previous run, else a free one); one DIR only",
    )
    sim.add_argument(
        "--vendor-ca",
        type=Path,
        metavar="CA_DIR",
        help="the 'vendor' CA directory to manufacture with (default: the first "
        "DIR/vendor-ca; made if absent): give every simulated TPM of a site the same one, "
        "and `pca init` needs only its certificates (start the first TPM before others)",
    )
    sim.add_argument(
        "--ek",
        choices=("rsa", "ecc"),
        default="rsa",
        help="rsa: the RSA-2048 EK certificate swtpm_setup makes; ecc: also an ECC P-256 "
        "EK certificate from a vendor root -> intermediate chain in DIR/vendor-ca "
        "(for host init --ek ecc --ek-chain)",
    )
    sim.set_defaults(func=cmd_tpm_simulate)


def cmd_tpm_simulate(args: argparse.Namespace) -> int:
    """``securemig tpm simulate``: provision (once) and run swtpm host TPMs."""
    if args.port and len(args.dir) > 1:
        raise UsageError("--port is for one DIR (each TPM keeps its own port in DIR/port)")
    ca = args.vendor_ca or args.dir[0] / "vendor-ca"
    running = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for directory in args.dir:
            running.append(_start(directory, ca, args.host, args.port, len(args.dir) > 1))
        vendors = swtpm.ca_certificates(ca)
        if args.ek == "ecc":
            # One vendor intermediate certifies every TPM's ECC EK.
            chains = {swtpm.certify_ecc_ek(process.tcti, ca) for process in running}
            print(f"for `securemig host init`: --ek ecc --ek-chain {' '.join(map(str, chains))}")
            vendors = [ca / "ecc-root" / "ca.pem"]
        vendor = " ".join(f"--vendor-ca {p}" for p in vendors)
        print(
            f"for `securemig pca init`: {vendor}"
            + ("" if args.ek == "ecc" else f" (or: --vendor-ca {ca})")
        )
        pids = ", ".join(str(p.process.pid) for p in running)
        print(f"running as pid {pids}; Ctrl-C ends it", flush=True)
        while not stop.wait(0.5):
            for process in running:
                if process.process.poll() is not None:
                    raise CommandError(
                        f"swtpm (pid {process.process.pid}, {process.tcti}) exited with "
                        f"{process.process.returncode}"
                    )
    finally:
        for process in running:
            process.stop()
    return EXIT_OK


def _start(directory: Path, ca: Path, host: str, port: int | None, several: bool) -> swtpm.Swtpm:
    """Provision (once) and start the TPM in ``directory``; prints its TCTI
    (and, of several, its directory)."""
    state = directory / "state"
    if not (state / swtpm.STATE_FILE).exists():
        swtpm.provision(state, ca)
        print(f"manufactured a TPM 2.0 in {state} (EK certificates from {ca})")
    # The TCTI names the port, and host init keeps the TCTI: keep the port too.
    port_file = directory / "port"
    port = port or (int(port_file.read_text()) if port_file.exists() else None)
    try:
        process = swtpm.start(state, host=host, port=port)
    except RuntimeError as e:
        raise CommandError(
            f"{e}; are ports {port} and {port + 1} taken (by another simulator of "
            f"{directory}, or anything else)? give another --port"
            if port
            else str(e)
        ) from None
    port_file.write_text(f"{process.port}\n")
    print(f"TCTI: {process.tcti}" + (f"  ({directory})" if several else ""), flush=True)
    return process
