"""The ``securemig`` command's parser, assembled from one module per
command group: every command reaches a ``cmd_*``, in the documented order."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from securemig.app.cli.common import EXIT_FAILED, EXIT_USAGE
from securemig.app.cli.main import build_parser, main
from securemig.lab import processes
from securemig.trust.tpm.tpm import TPM


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The commands (or actions) of ``parser`` by name; empty for a leaf."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = (), func: object = None
) -> list[tuple[tuple[str, ...], object]]:
    """Every runnable command line's words, and the ``func`` it dispatches to."""
    func = parser.get_default("func") or func
    children = subparsers(parser)
    if not children:
        return [(path, func)]
    return [leaf for name, child in children.items() for leaf in leaves(child, (*path, name), func)]


class ParserTests(SynchronousTestCase):
    def test_commands_in_order(self) -> None:
        """``securemig --help`` lists the commands in the order they always had."""
        self.assertEqual(
            list(subparsers(build_parser())),
            [
                "vm",
                "migrate",
                "status",
                "jobs",
                "abort",
                "recover",
                "journal",
                "config",
                "demo",
                "ca",
                "pca",
                "host",
                "policy",
                "tpm",
                "bench",
            ],
        )

    def test_every_command_has_a_handler(self) -> None:
        """Each command and action sets ``func`` to a ``cmd_*`` of its module."""
        found = leaves(build_parser())
        # pca: init, authorize, replace, revoke, list; vm: +stop, delete, adopt, console
        self.assertEqual(len(found), 32)
        for path, func in found:
            self.assertTrue(callable(func), path)
            self.assertTrue(getattr(func, "__name__", "").startswith("cmd_"), path)

    def test_usage_mistake_exits_2(self) -> None:
        """A usage mistake the parser cannot see is one error line and exit
        status 2, as the parser's own are."""
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(["bench", "--ciphers", "rot13"])
        self.assertEqual(status, EXIT_USAGE)
        self.assertEqual(
            stderr.getvalue(), "securemig: error: --ciphers takes aes128, aes256, chacha20\n"
        )

    def test_operator_mistake_exits_1(self) -> None:
        """A right command line that cannot be carried out is one error line
        and exit status 1."""
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(["status", "--state-dir", self.mktemp()])
        self.assertEqual(status, EXIT_FAILED)
        self.assertRegex(stderr.getvalue(), r"^securemig: error: no journal at \S+\n$")

    def test_migrate_exits_at_once_keeping_exit_handlers_and_output(self) -> None:
        """``migrate`` run as the program skips the interpreter's teardown
        (``main`` does not return), but keeps its exit status, its buffered
        output and the exit handlers."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        script = (
            "import atexit, sys\n"
            "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
            "import securemig.app.cli.main as m\n"
            "sys.stdout.write('buffered')\n"  # stdout is a pipe: block-buffered
            "sys.argv = ['securemig', 'migrate', 'vm1', '--vm-dir', sys.argv[1], "
            "'--state-dir', sys.argv[1], '--to', '127.0.0.1:1', '--insecure', '--no-progress']\n"
            "status = m.main()\n"
            "print('returned', status, file=sys.stderr)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, str(base)],
            capture_output=True,
            text=True,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        )
        self.assertEqual(result.returncode, EXIT_FAILED, result.stderr)
        self.assertEqual(result.stdout, "buffered")
        self.assertIn("securemig: error:", result.stderr)
        self.assertIn("handler ran", result.stderr)
        # main() did not return: the process ended in it.
        self.assertNotIn("returned", result.stderr)

    def test_start_up_leaves_out_what_it_does_not_run(self) -> None:
        """What every start of ``securemig`` (above all ``migrate``) and of
        the daemon pays for: not the lab and bench (plots, statistics),
        nor twisted.web (the daemon's optional --metrics endpoint), nor
        the libvirt backend's module (and its XML parser)."""
        script = (
            "import sys\n"
            "import securemig.app.cli.main, securemig.app.service\n"
            "print(sorted(m for m in sys.modules if m.startswith("
            "('securemig.lab.bench', 'securemig.lab.demo', 'securemig.lab.lab', "
            "'twisted.web', 'tqdm', 'statistics', 'decimal', 'xml.etree'))"
            " or m == 'securemig.hypervisor.libvirt'))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "[]")

    def test_start_up_starts_no_process_and_builds_no_machine(self) -> None:
        """Importing the command and the daemon and tuning malloc, as both
        do before their first byte, start no child process (once two
        ``ldconfig -p`` runs of ``ctypes.util.find_library``) and build no
        session state machine (each is built when its first session starts);
        yet the C library's calls are found and the tuning applies."""
        script = (
            "import sys\n"
            "spawned = []\n"
            "def hook(event, args):\n"
            "    if event in ('subprocess.Popen', 'os.posix_spawn', 'os.fork', 'os.exec',\n"
            "                 'os.system', 'os.spawn'):\n"
            "        spawned.append(event)\n"
            "sys.addaudithook(hook)\n"
            "import securemig.app.cli.main, securemig.app.service\n"
            "from securemig.host import glibc, storage\n"
            "from securemig.protocol import destination, source\n"
            "tuned = glibc.tune_malloc()\n"
            "built = source.source_machine.cache_info().currsize"
            " + destination.destination_machine.cache_info().currsize\n"
            "print(spawned, built, tuned, storage._SYNC_FILE_RANGE is not None)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "[] 0 True True")

    def test_help_lists_exit_statuses(self) -> None:
        """``securemig --help`` ends with the exit statuses."""
        text = build_parser().format_help()
        for line in ("exit status:", "  0  done", "  2  usage error", "  3  migrate committed"):
            self.assertIn(line, text)


class TpmSimulateTests(SynchronousTestCase):
    """`securemig tpm simulate DIR`: a host TPM an operator can enroll."""

    def simulate(self, *args: Path | str) -> tuple[subprocess.Popen[str], list[str], str]:
        """Start ``securemig tpm simulate ARGS`` (directories, options); its
        process, the lines it printed before it ran the TPMs, and that
        ``running as pid`` line."""
        sim = subprocess.Popen(
            [processes.script("securemig"), "tpm", "simulate", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(lambda: sim.poll() is None and sim.kill())
        assert sim.stdout is not None
        lines = []
        while not (line := sim.stdout.readline()).startswith("running as pid"):
            if not line:  # it ended before it ran the TPM: say why
                self.fail(sim.stderr.read() if sim.stderr else "no output")
            lines.append(line)
        return sim, lines, line

    def test_simulate_then_stop(self) -> None:
        """It manufactures a TPM with EK certificates from a vendor CA, runs it,
        prints a TCTI that opens it and the vendor CA for `pca init`, and
        SIGTERM ends it and its swtpm."""
        base = Path(self.mktemp()).absolute()
        sim, lines, line = self.simulate(base)
        tcti = next(x for x in lines if x.startswith("TCTI: ")).split(": ", 1)[1].strip()
        vendor = next(x for x in lines if "--vendor-ca" in x)
        self.assertIn("issuercert.pem", vendor)
        swtpm_pid = int(line.split()[3].rstrip(";"))
        tpm = TPM(tcti)
        self.assertTrue(tpm.ek_certificate())
        tpm.close()
        sim.send_signal(signal.SIGTERM)
        self.assertEqual(sim.wait(20), 0)
        with self.assertRaises(ProcessLookupError):
            os.kill(swtpm_pid, 0)
        # The next run serves the same TPM on the same port: the TCTI that
        # host init recorded still opens it.
        again, out, _ = self.simulate(base)
        again.send_signal(signal.SIGTERM)
        self.assertEqual(again.wait(20), 0)
        self.assertIn(f"TCTI: {tcti}\n", out)
        self.assertFalse(any(x.startswith("manufactured") for x in out), out)

    def test_several_tpms_one_vendor(self) -> None:
        """`tpm simulate A B`: two TPMs made by A's vendor CA, which `pca init
        --vendor-ca A/vendor-ca` (a directory) trusts with its two certificates."""
        base = Path(self.mktemp()).absolute()
        sim, lines, _ = self.simulate(base / "a", base / "b")
        tctis = [x.split()[1] for x in lines if x.startswith("TCTI: ")]
        self.assertEqual(len(set(tctis)), 2, lines)
        self.assertFalse((base / "b" / "vendor-ca").exists())
        made = processes.securemig(
            "pca", "init", str(base / "pca"), "--vendor-ca", str(base / "a" / "vendor-ca")
        )
        self.assertEqual(made.returncode, 0, made.stderr)
        self.assertIn("trusting 2 vendor CA(s)", made.stdout)
        for tcti in tctis:
            tpm = TPM(tcti)
            self.assertTrue(tpm.ek_certificate())
            tpm.close()
        sim.send_signal(signal.SIGTERM)
        self.assertEqual(sim.wait(20), 0)

    def test_simulate_ecc_ek(self) -> None:
        """--ek ecc: an ECC P-256 EK certificate from a vendor intermediate,
        and the arguments that enroll it (the root for pca init, the chain
        for host init)."""
        base = Path(self.mktemp()).absolute()
        sim, lines, _ = self.simulate(base, "--ek", "ecc")
        self.addCleanup(lambda: sim.poll() is None and (sim.terminate(), sim.wait(20)))
        tcti = next(x for x in lines if x.startswith("TCTI: ")).split(": ", 1)[1].strip()
        vendor = next(x for x in lines if "--vendor-ca" in x)
        self.assertIn("ecc-root/ca.pem", vendor)
        self.assertNotIn("issuercert.pem", vendor)
        chain = next(x for x in lines if "--ek-chain" in x).split("--ek-chain ", 1)[1].strip()
        intermediate = x509.load_pem_x509_certificate(Path(chain).read_bytes())
        with TPM(tcti) as tpm:
            ek = x509.load_der_x509_certificate(tpm.ek_certificate("ecc"))
        self.assertEqual(ek.issuer, intermediate.subject)


class _Terminal(io.StringIO):
    """stderr as a terminal: the bar is drawn (into memory)."""

    def isatty(self) -> bool:
        return True


class LiveProgressBarTests(SynchronousTestCase):
    def test_live_bar_has_a_total(self) -> None:
        """A live migration's bar counts to the guest's RAM (it had no
        total: a live migration streams no image), and grows with the
        pages QEMU sends again rather than overflowing."""
        from securemig.app.control_client import ProgressBar
        from securemig.host.departure import Departure
        from securemig.host.journal import Journal
        from securemig.hypervisor.bundle import Bundle
        from securemig.protocol import wire

        base = Path(self.mktemp()).absolute()
        created = processes.securemig(
            "vm", "create", "vm1", "--dir", str(base), "--backend", "qemu", "--ram-mib", "96"
        )
        self.assertEqual(created.returncode, 0, created.stderr)
        journal = Journal(base / "journal.sqlite")
        self.addCleanup(journal.close)
        departure = Departure(
            Bundle.find(base, "vm1"), wire.Variant.SHARED_STORAGE, "peer", "secure", journal,
            live=True,
        )  # fmt: skip
        self.assertEqual(departure.total_bytes, 0)
        self.assertEqual(departure.expected_bytes, 96 << 20)
        terminal = _Terminal()
        with contextlib.redirect_stderr(terminal):
            bar = ProgressBar("migrating vm1", shown=True)
            bar.start(departure.expected_bytes)
            self.assertEqual(bar.bar.total, 96 << 20)
            bar.update(90 << 20)
            bar.update(16 << 20)  # the second round: pages dirtied meanwhile
            self.assertEqual((bar.bar.n, bar.bar.total), (106 << 20, 106 << 20))
            bar.close()
        self.assertIn("106M", terminal.getvalue())
