"""
The ``securemig`` command.

Exit status: 0 when the work asked for is done; 1 when it failed and
nothing was lost (for ``migrate``: the VM is still at the source, unlocked);
2 for usage errors; 3 when ``migrate`` committed but the destination did
not confirm the resume (see ``securemig status`` on the destination).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from securemig import __version__
from securemig.app.cli import journal, migrate, vm
from securemig.app.cli.common import EXIT_FAILED, EXIT_OK, _mib, error
from securemig.lab import bench, demo
from securemig.lab.bench import qemu, tpm
from securemig.lab.bench.link import LinkError
from securemig.transport.tls import CIPHERS
from securemig.trust.identity import init_host, issue_tls
from securemig.trust.pca.client import EnrollmentRefused
from securemig.trust.pca.core import PrivacyCA
from securemig.trust.pki import Authority
from securemig.trust.policy import PolicyStore
from securemig.trust.tpm.tpm import TPM, TPMError

#: PCRs attested by default: firmware, firmware config, option ROMs, boot loader, secure boot.
DEFAULT_PCRS = "0,1,2,3,4,7"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(
        prog="securemig",
        description="Move a suspended VM and its virtual TPM to another host. "
        "The destination runs `twistd securemig`; this command drives the source, "
        "creates test VMs, shows the journal and runs the demo and the benchmark.",
    )
    p.add_argument("--version", action="version", version=f"securemig {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    vm.add_parser(sub)
    migrate.add_parser(sub)
    journal.add_parser(sub)  # status, recover
    demo = sub.add_parser(
        "demo",
        help="run a whole migration on loopback and explain it",
        description="In a temporary directory on loopback: start a "
        "destination, create a VM, migrate it, print the phases.",
    )
    demo.add_argument("--size-mib", type=_mib, default=256, help="RAM image size (default 256)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.add_argument(
        "--backend",
        choices=("image", "qemu"),
        default="image",
        help="image: a suspended VM of files (default); qemu: a running QEMU guest",
    )

    ca = sub.add_parser("ca", help="a site CA for host TLS certificates")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    ca_init = ca_sub.add_parser("init", help="create a site CA in DIR (ca.key, ca.pem)")
    ca_init.add_argument("dir", type=Path)
    ca_init.add_argument("--name", default="securemig site CA", help="the CA's common name")
    ca_issue = ca_sub.add_parser("issue", help="issue a TLS key and certificate for a host")
    ca_issue.add_argument("dir", type=Path, help="the site CA's directory")
    ca_issue.add_argument("--name", required=True, help="the host name (subjectAltName)")
    ca_issue.add_argument(
        "--out", type=Path, required=True, help="directory for tls.key and tls.pem"
    )

    pca = sub.add_parser("pca", help="set up a privacy CA (run it with twistd securemig-pca)")
    pca_sub = pca.add_subparsers(dest="pca_command", required=True, metavar="ACTION")
    pca_init = pca_sub.add_parser("init", help="create a privacy CA in DIR")
    pca_init.add_argument("dir", type=Path)
    pca_init.add_argument(
        "--vendor-ca",
        type=Path,
        action="append",
        required=True,
        help="a trusted TPM-vendor CA certificate (PEM); repeatable",
    )

    host = sub.add_parser("host", help="set up this host's identity")
    host_sub = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    host_init = host_sub.add_parser(
        "init",
        help="TLS identity, attestation key and its certificate, in DIR",
        description="Create this host's TLS key and certificate from the site CA, an "
        "attestation key in its TPM, and enroll it with the privacy CA.",
    )
    host_init.add_argument("--dir", type=Path, required=True)
    host_init.add_argument("--name", required=True, help="this host's DNS name")
    host_init.add_argument(
        "--tpm", required=True, help="TCTI: device:/dev/tpmrm0, or swtpm:host=127.0.0.1,port=N"
    )
    host_init.add_argument(
        "--site-ca", type=Path, required=True, help="the site CA directory (securemig ca init)"
    )
    host_init.add_argument("--pca", required=True, help="the privacy CA's https:// URL")
    host_init.add_argument(
        "--pca-ca", type=Path, required=True, help="the privacy CA's certificate (its ca.pem)"
    )

    pol = sub.add_parser("policy", help="golden PCR values of peers")
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

    bench = sub.add_parser(
        "bench",
        help="measure secure and insecure migration against a plain copy",
        description="Secure and insecure migrations between two enrolled swtpm hosts "
        "against a plain socket copy into an fsynced file, same data, same run: wall time "
        "per phase, CPU and peak RSS of each side, bytes on the wire; a report of the "
        "ratios and targets.  See doc/performance.rst.",
    )
    bench.add_argument(
        "--sizes", default="128,256,512,1024", help="comma-separated MiB (default %(default)s)"
    )
    bench.add_argument("--repeat", type=int, default=3, help="runs per size (default 3)")
    bench.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    bench.add_argument(
        "--json",
        type=Path,
        help="write the records here as JSON (e.g. out.json), and out-records.csv, "
        "out-report.md and out-*.png plots beside it",
    )
    bench.add_argument(
        "--link-mbit",
        type=int,
        help="root only: run the destination side in a network namespace behind a veth "
        "link limited to N Mbit/s (tc tbf), instead of loopback",
    )
    bench.add_argument(
        "--variants",
        default="full",
        help="full (RAM and disk travel) and/or shared-storage (RAM only); default %(default)s",
    )
    bench.add_argument(
        "--disk-mib",
        type=int,
        default=0,
        help="disk image of each VM (travels in the full variant; on shared storage in "
        "the other); default: none in the full variant, 64 MiB on shared storage",
    )
    bench.add_argument(
        "--out", type=Path, help="write records.json, records.csv, report.md and PNG plots here"
    )
    bench.add_argument(
        "--ciphers",
        default="",
        help="secure runs per TLS 1.3 cipher, from aes128,aes256,chacha20 "
        "(default: one secure run with OpenSSL's choice)",
    )
    bench.add_argument(
        "--protocols",
        default="insecure,secure",
        help="measured besides the plain copy: insecure, secure (data channel), secure-tls "
        "(images inside TLS, as before the data channel); default %(default)s",
    )
    bench.add_argument(
        "--qemu",
        action="store_true",
        help="instead: time suspend and resume of real QEMU guests of --sizes MiB",
    )
    bench.add_argument(
        "--tpm",
        action="store_true",
        help="instead: time TPM operations on a fresh swtpm (--repeat each)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``securemig`` console script."""
    args = build_parser().parse_args(argv)
    handler = (
        getattr(args, "func", None)
        or {
            "demo": cmd_demo,
            "bench": cmd_bench,
            "ca": cmd_ca,
            "pca": cmd_pca,
            "host": cmd_host,
            "policy": cmd_policy,
        }[args.command]
    )
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("securemig: interrupted", file=sys.stderr)
        return EXIT_FAILED


def cmd_ca(args: argparse.Namespace) -> int:
    """``securemig ca init|issue``."""

    if args.ca_command == "init":
        if (args.dir / "ca.key").exists():
            return error(f"{args.dir} already holds a CA")
        Authority.create(args.name).save(args.dir)
        print(f"created site CA {args.name!r} in {args.dir}")
        return EXIT_OK
    try:
        authority = Authority.load(args.dir)
    except (OSError, ValueError) as e:
        return error(f"cannot load the CA in {args.dir}: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    issue_tls(authority, args.name, args.out)
    print(f"issued {args.out / 'tls.pem'} for {args.name}")
    return EXIT_OK


def cmd_pca(args: argparse.Namespace) -> int:
    """``securemig pca init``."""

    if (args.dir / "ca.key").exists():
        return error(f"{args.dir} already holds a privacy CA")
    missing = [str(p) for p in args.vendor_ca if not p.is_file()]
    if missing:
        return error(f"no such vendor CA certificate: {', '.join(missing)}")
    PrivacyCA.init(args.dir, args.vendor_ca)
    print(f"created privacy CA in {args.dir} trusting {len(args.vendor_ca)} vendor CA(s)")
    return EXIT_OK


def cmd_host(args: argparse.Namespace) -> int:
    """``securemig host init``."""

    try:
        identity = init_host(args.dir, args.name, args.tpm, args.site_ca, args.pca, args.pca_ca)
    except EnrollmentRefused as e:
        return error(f"the privacy CA refused the enrollment: {e}")
    except (TPMError, OSError, ValueError) as e:
        return error(str(e))
    print(
        f"host {identity.name} initialised in {identity.directory}: TLS certificate, "
        "attestation key, AK certificate"
    )
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    """``securemig policy show|record|forget``."""

    try:
        store = PolicyStore(args.policy_dir)
        if args.policy_command == "record":
            pcrs = [int(p) for p in args.pcrs.split(",")]
            try:
                with TPM(args.tpm) as tpm:
                    values = tpm.pcr_read(pcrs)
            except TPMError as e:
                return error(str(e))
            store.record(args.host, values)
            print(f"recorded PCRs {args.pcrs} of {args.host}")
        elif args.policy_command == "forget":
            if not store.forget(args.host):
                return error(f"no golden values for {args.host}")
            print(f"forgot the golden values of {args.host}")
        else:
            for host in [args.host] if args.host else store.hosts():
                golden = store.get(host)
                if golden is None:
                    return error(f"no golden values for {host}")
                print(golden.to_json().decode(), end="")
    except ValueError as e:
        return error(str(e))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``securemig demo``: see :mod:`securemig.lab.demo`."""

    return demo.run(size_mib=args.size_mib, as_json=args.json, keep=args.keep, backend=args.backend)


def cmd_bench(args: argparse.Namespace) -> int:
    """``securemig bench``: see :mod:`securemig.lab.bench`."""

    if args.tpm:
        return tpm.run(repeat=args.repeat)
    if args.qemu:
        return qemu.run([int(x) for x in args.sizes.split(",") if x.strip()], args.repeat)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]

    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    ciphers: tuple[str | None, ...] = tuple(
        c.strip() for c in args.ciphers.split(",") if c.strip()
    ) or (None,)
    if set(ciphers) - set(CIPHERS) - {None}:
        return error(f"--ciphers takes {', '.join(CIPHERS)}")
    unknown = set(protocols) - set(bench.PROTOCOLS)
    if unknown:
        return error(
            f"unknown protocol(s) {', '.join(sorted(unknown))}: use {', '.join(bench.PROTOCOLS)}"
        )
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or set(variants) - set(bench.VARIANTS):
        return error(f"--variants takes {', '.join(bench.VARIANTS)}")
    if not sizes or min(sizes) <= 0 or args.repeat <= 0:
        return error("--sizes and --repeat must be positive")

    try:
        return bench.run(
            sizes=sizes,
            repeat=args.repeat,
            work_dir=args.dir,
            json_path=args.json,
            protocols=protocols,
            out=args.out,
            ciphers=ciphers,
            variants=variants,
            disk_mib=args.disk_mib,
            link_mbit=args.link_mbit,
        )
    except LinkError as e:
        return error(str(e))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
