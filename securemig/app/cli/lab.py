"""``securemig demo`` and ``securemig bench``: the lab, on this machine.

Two registrars rather than one ``add_parser``: ``securemig --help`` lists
``demo`` after ``recover`` and ``bench`` last, and keeps that order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from securemig.app.cli.common import Subparsers, _mib, error, int_list, usage_error
from securemig.hypervisor import backends
from securemig.transport.tls import CIPHERS

# The lab's modules (plots, statistics, the lab itself) are imported by the
# commands that run them: every other command, `migrate` first, would pay
# for them at each start (about a tenth of the CLI's import time).

#: The backends whose demo is :mod:`securemig.lab.demo_libvirt`: their
#: hypervisor's own daemons migrate the guest, its sockets carried (named by
#: capability, so the parser imports no lab module).
CARRIED_DEMOS = tuple(backends.kinds(lambda c: c.carried))


def add_demo_parser(subparsers: Subparsers) -> None:
    """Register ``securemig demo``."""
    p = subparsers.add_parser(
        "demo",
        help="run a whole migration on loopback and explain it",
        description="In a temporary directory on loopback: start a "
        "destination, create a VM, migrate it, print the phases.",
    )
    p.add_argument("--size-mib", type=_mib, default=256, help="RAM image size (default 256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--backend",
        choices=(*backends.kinds(lambda c: c.creatable), *CARRIED_DEMOS),
        default=backends.DEFAULT,
        help="image: a suspended VM of files (default); a backend that runs guests "
        f"(qemu): a running guest; {'/'.join(CARRIED_DEMOS)}: two libvirtds, an adopted domain "
        "with an encrypted vTPM, migrated there and back, and refused by a changed host",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="with --backend qemu: a running Linux guest under load, migrated live, "
        "securely, there and back; its downtime, heartbeat and PCR 16; with --backend "
        f"{'/'.join(CARRIED_DEMOS)}: its domain migrated live",
    )
    p.set_defaults(func=cmd_demo)


#: The most ``--concurrency`` takes: each migration is a process and a VM
#: of each size on disk at both ends.
MAX_CONCURRENCY = 64


def add_bench_parser(subparsers: Subparsers) -> None:
    """Register ``securemig bench``."""
    p = subparsers.add_parser(
        "bench",
        help="measure secure and insecure migration against a plain copy",
        description="Secure and insecure migrations between two enrolled swtpm hosts "
        "against a plain socket copy into an fsynced file, same data, same run: wall time "
        "per phase, CPU and peak RSS of each side, bytes on the wire; a report of the "
        "ratios and targets.  See doc/performance.rst.",
    )
    p.add_argument(
        "--sizes", default="128,256,512,1024", help="comma-separated MiB (default %(default)s)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per size (default 3)")
    p.add_argument(
        "--live",
        action="store_true",
        help="instead: a running Linux guest migrated live, alternating securemig's secure "
        "live migration, QEMU's own TLS migration and QEMU's plain one (--repeat each; "
        "--protocols may add secure-live-daemon, driven by the source host's daemon)",
    )
    p.add_argument(
        "--live-mib", type=int, default=512, help="--live: guest memory (default %(default)s)"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=0,
        metavar="N",
        help="--live: every protocol on N multifd channels (secure-live: migrate --live "
        "--parallel N; qemu-tls and qemu-plain: multifd-channels N on both QEMUs); "
        "default 0: one stream",
    )
    p.add_argument(
        "--dirty-mib-s",
        type=int,
        default=32,
        help="--live, --libvirt: MiB per second the guest rewrites (default %(default)s)",
    )
    p.add_argument(
        "--libvirt",
        action="store_true",
        help="instead: one adopted domain of two libvirtds migrated live, alternating "
        "securemig migrate --live --copy-storage, `virsh migrate --tls` (certificates from "
        "a site CA made for the bench, peers verified) and plain `virsh migrate` "
        "(--repeat each; --libvirt-mib, --dirty-mib-s, --disk-mib: default 64; "
        "--protocols may add secure-libvirt-daemon, driven by the source host's daemon)",
    )
    p.add_argument(
        "--libvirt-mib",
        type=int,
        default=256,
        help="--libvirt: the domain's memory (default %(default)s)",
    )
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    p.add_argument(
        "--json",
        type=Path,
        help="write the records here as JSON (e.g. out.json), and out-records.csv, "
        "out-report.md and out-*.png plots beside it",
    )
    p.add_argument(
        "--link-mbit",
        type=int,
        help="root only: run the destination side in a network namespace behind a veth "
        "link limited to N Mbit/s (tc tbf), instead of loopback",
    )
    p.add_argument(
        "--variants",
        default="full",
        help="full (RAM and disk travel) and/or shared-storage (RAM only); default %(default)s",
    )
    p.add_argument(
        "--disk-mib",
        type=int,
        default=0,
        help="disk image of each VM (travels in the full variant; on shared storage in "
        "the other); default: none in the full variant, 64 MiB on shared storage",
    )
    p.add_argument(
        "--out", type=Path, help="write records.json, records.csv, report.md and PNG plots here"
    )
    p.add_argument(
        "--ciphers",
        default="",
        help="secure runs per TLS 1.3 cipher, from aes128,aes256,chacha20 "
        "(default: one secure run with OpenSSL's choice)",
    )
    p.add_argument(
        "--protocols",
        help="the series to run, alternating.  Suspended (default insecure,secure; the "
        "plain copy and ssh always run): insecure, secure (data channel), secure-tls "
        "(images inside TLS, as before the data channel), secure-daemon (secure, driven by "
        "the source host's daemon: migrate --daemon).  --live (default "
        "secure-live,qemu-tls,qemu-plain): also secure-live-daemon (migrate --live "
        "--daemon).  --libvirt (default secure-libvirt,libvirt-tls,libvirt-plain): also "
        "secure-libvirt-daemon.  A -daemon series counts the CPU of both securemig daemons "
        "over the run only, each started before the clock",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="also N secure migrations of distinct VMs at once into one destination, "
        "per size and repeat: aggregate throughput and per-migration time against one "
        "alone (default 1: none)",
    )
    p.add_argument(
        "--qemu",
        action="store_true",
        help="instead: time suspend and resume of real QEMU guests of --sizes MiB",
    )
    p.add_argument(
        "--tpm",
        action="store_true",
        help="instead: time TPM operations on a fresh swtpm, or with --tcti on the "
        "TPM given (--repeat each)",
    )
    p.add_argument(
        "--tcti",
        help="--tpm: time the TPM at this TCTI (e.g. device:/dev/tpmrm0, the host's) "
        "instead of a fresh swtpm; the output says which TPM it timed",
    )
    p.set_defaults(func=cmd_bench)


def cmd_demo(args: argparse.Namespace) -> int:
    """``securemig demo``: see :mod:`securemig.lab.demo` (and
    :mod:`securemig.lab.demo_libvirt`)."""
    if args.live and not backends.capabilities(args.backend).live:
        able = " or ".join(backends.kinds(lambda c: c.live))
        return usage_error(f"--live needs --backend {able} (a running guest)")
    if args.backend in CARRIED_DEMOS:
        from securemig.lab import demo_libvirt

        return demo_libvirt.run(as_json=args.json, keep=args.keep, live=args.live)
    from securemig.lab import demo

    if args.live:
        return demo.run_live(as_json=args.json, keep=args.keep)
    return demo.run(size_mib=args.size_mib, as_json=args.json, keep=args.keep, backend=args.backend)


def cmd_bench(args: argparse.Namespace) -> int:
    """``securemig bench``: see :mod:`securemig.lab.bench`."""
    from securemig.lab import bench
    from securemig.lab.bench import libvirt as libvirt_bench
    from securemig.lab.bench import live, qemu, tpm
    from securemig.lab.bench.link import LinkError

    if args.repeat <= 0:
        return usage_error("--repeat must be a positive number")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        return usage_error(f"--concurrency takes 1 to {MAX_CONCURRENCY}")
    if args.tcti is not None and not args.tpm:
        return usage_error("--tcti goes with --tpm")
    if args.protocols is not None and (args.tpm or args.qemu):
        return usage_error("--protocols goes with the migration benches, not --tpm or --qemu")
    if args.json is not None:
        # Made (or refused) before the runs, not after minutes of them: the
        # libvirt bench failed there on a directory that did not exist.
        where = Path(args.json).parent
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return usage_error(f"--json: cannot make directory {where}: {e.strerror}")
    if args.tpm:
        if args.tcti is not None and not args.tcti.strip():
            return usage_error("--tcti takes a TCTI, e.g. device:/dev/tpmrm0")
        return tpm.run(repeat=args.repeat, json_path=args.json, tcti=args.tcti)
    if args.libvirt:
        if args.libvirt_mib < 64 or args.dirty_mib_s < 0 or args.disk_mib < 0:
            return usage_error(
                "--libvirt-mib must be at least 64, --dirty-mib-s and --disk-mib not negative"
            )
        chosen = _series(args.protocols, libvirt_bench.PROTOCOLS, libvirt_bench.SERIES)
        if isinstance(chosen, int):
            return chosen
        return libvirt_bench.run(
            args.libvirt_mib,
            args.dirty_mib_s,
            args.disk_mib or 64,
            args.repeat,
            json_path=args.json,
            protocols=chosen,
        )
    sizes = int_list(args.sizes, "--sizes", minimum=1)
    if args.qemu:
        return qemu.run(sizes, args.repeat, json_path=args.json)
    if args.live:
        if args.live_mib < 64 or args.dirty_mib_s < 0:
            return usage_error("--live-mib must be at least 64 and --dirty-mib-s not negative")
        if not 0 <= args.parallel <= live.MAX_PARALLEL:
            return usage_error(f"--parallel takes 0 to {live.MAX_PARALLEL} multifd channels")
        chosen = _series(args.protocols, live.PROTOCOLS, live.SERIES)
        if isinstance(chosen, int):
            return chosen
        return live.run(
            args.live_mib,
            args.dirty_mib_s,
            args.repeat,
            json_path=args.json,
            parallel=args.parallel,
            protocols=chosen,
        )

    protocols = _items(args.protocols if args.protocols is not None else "insecure,secure")
    ciphers: tuple[str | None, ...] = _items(args.ciphers) or (None,)
    if set(ciphers) - set(CIPHERS) - {None}:
        return usage_error(f"--ciphers takes {', '.join(CIPHERS)}")
    unknown = set(protocols) - set(bench.PROTOCOLS)
    if not protocols or unknown:
        return usage_error(
            f"unknown protocol(s) {', '.join(sorted(unknown))}: use {', '.join(bench.PROTOCOLS)}"
            if unknown
            else f"--protocols takes {', '.join(bench.PROTOCOLS)}"
        )
    variants = _items(args.variants)
    if not variants or set(variants) - set(bench.VARIANTS):
        return usage_error(f"--variants takes {', '.join(bench.VARIANTS)}")
    if args.disk_mib < 0 or (args.link_mbit is not None and args.link_mbit <= 0):
        return usage_error("--disk-mib must not be negative, nor --link-mbit below 1")

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
            concurrency=args.concurrency,
        )
    except LinkError as e:
        return error(str(e))


def _series(
    text: str | None, default: tuple[str, ...], known: tuple[str, ...]
) -> tuple[str, ...] | int:
    """The series ``--protocols`` names for a bench whose series are
    ``known`` (``default`` without the option), or the usage error's exit
    status."""
    if text is None:
        return default
    chosen = _items(text)
    unknown = set(chosen) - set(known)
    if not chosen or unknown:
        what = f"unknown series {', '.join(sorted(unknown))}: " if unknown else ""
        return usage_error(f"{what}--protocols takes {', '.join(known)} here")
    return chosen


def _items(text: str) -> tuple[str, ...]:
    """The items of a comma-separated option, stripped, empty ones left out."""
    return tuple(item.strip() for item in text.split(",") if item.strip())
