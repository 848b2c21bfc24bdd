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
from securemig.app.cli import identity, journal, migrate, policy, vm
from securemig.app.cli.common import EXIT_FAILED, _mib, error
from securemig.lab import bench, demo
from securemig.lab.bench import qemu, tpm
from securemig.lab.bench.link import LinkError
from securemig.transport.tls import CIPHERS


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

    identity.add_parser(sub)  # ca, pca, host
    policy.add_parser(sub)
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
        }[args.command]
    )
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("securemig: interrupted", file=sys.stderr)
        return EXIT_FAILED


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
