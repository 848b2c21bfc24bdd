"""Issue 24 item 7: the bench says what it measured.

Every mode honours ``--json``; every record and the report carry their
provenance; each ratio label has one definition (whole process, in
process), both shown; the floor is a C tool's copy; ``--tpm --tcti`` times
the TPM given and says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from securemig.hypervisor.bundle import create_image_vm
from securemig.hypervisor.qemu import qemu_binary
from securemig.lab import bench, processes
from securemig.lab.bench import report
from securemig.lab.bench.provenance import provenance
from securemig.lab.lab import Lab
from securemig.trust.tpm import swtpm
from tests.support.qemu import under_tcg

PROVENANCE = {
    "securemig_version",
    "git_commit",
    "date",
    "hostname",
    "cpu_model",
    "kernel",
    "load_average",
    "command_line",
}


def record(
    protocol: str, total: float, in_process: float | None, repeat: int = 0
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "protocol": protocol,
        "variant": "full",
        "cipher": None,
        "size_mib": 64,
        "repeat": repeat,
        "phases": {},
        "total_s": total,
        "cpu_s": {"source": total / 2, "destination": total / 2},
        "peak_rss_mib": {"source": 60.0, "destination": 65.0},
        "wire_bytes": 64 << 20,
        "throughput_mibps": 64 / total,
        "provenance": provenance(["securemig", "bench", "--sizes", "64"]),
    }
    if in_process is not None:
        r["in_process_s"] = in_process
    return r


# Whole process: secure/insecure = 1.50/1.00 = 1.50; in process: 1.00/0.25 = 4.00.
RECORDS = [
    record("plain-copy", 0.5, 0.5),
    record("insecure", 1.0, 0.25),
    record("secure", 1.5, 1.0),
]


class RatioLabelTests(SynchronousTestCase):
    def test_both_ratios_each_named(self) -> None:
        """The Ratios table shows the whole-process and the in-process
        secure/insecure, each under its own name; no bare label is left."""
        text = report.report(RECORDS)
        self.assertIn(report.WHOLE, text)
        self.assertIn(report.IN_PROCESS, text)
        self.assertIn("| 64 | secure | 2.00 | 3.00 | 1.50 | 4.00 | 1.50 |", text)
        # The targets name the in-process ratio as such and report the other.
        self.assertIn(f"| {report.IN_PROCESS}, 64 MiB, full, ≤ 1.10 | 4.000", text)
        self.assertIn(f"| {report.WHOLE}, 64 MiB, full (reported, no target) | 1.500", text)
        for line in text.splitlines():
            cells = [c.strip() for c in line.split("|")]
            self.assertNotIn("secure / insecure", cells, line)
            self.assertNotIn("secure / insecure time", cells, line)

    def test_summary_names_both(self) -> None:
        lines = "\n".join(bench._summarise(RECORDS))
        self.assertIn(f"{report.WHOLE} 1.50, {report.IN_PROCESS} 4.00", lines)

    def test_no_in_process_figure_made_up(self) -> None:
        """A run without in-process seconds gives "-", never its whole time
        under the in-process name."""
        records = [record("plain-copy", 0.5, 0.5), record("insecure", 1.0, None),
                   record("secure", 1.5, 1.0)]  # fmt: skip
        text = report.report(records)
        self.assertIn("| 64 | secure | 2.00 | 3.00 | 1.50 | - | 1.50 |", text)
        self.assertIn(f"{report.IN_PROCESS}, 1 GiB, full, ≤ 1.10 | needs both", text)
        self.assertIn(f"{report.IN_PROCESS} -", "\n".join(bench._summarise(records)))


class ProvenanceTests(SynchronousTestCase):
    def test_report_header_and_csv(self) -> None:
        text = report.report(RECORDS)
        head = text.split("| size MiB", 1)[0]
        info = RECORDS[0]["provenance"]
        for value in (info["securemig_version"], info["hostname"], info["cpu_model"],
                      info["kernel"], info["date"], "securemig bench --sizes 64"):  # fmt: skip
            self.assertIn(str(value), head)
        self.assertIn("load average", head)
        self.assertIn("plain-copy (the floor)", head)
        out = Path(self.mktemp())
        report.write_all(RECORDS, out)
        csv_text = (out / "records.csv").read_text()
        self.assertIn("provenance_hostname", csv_text)
        self.assertIn("provenance_command_line", csv_text)

    def test_fields(self) -> None:
        info = provenance()
        self.assertLessEqual(PROVENANCE, set(info))
        self.assertTrue(info["cpu_model"])
        self.assertRegex(info["date"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
        # This checkout is a git repository: its commit is named.
        self.assertRegex(info["git_commit"], r"^[0-9a-f]{40}(-dirty)?$")


class FloorTests(TestCase):
    def test_plain_copy_is_a_c_tool(self) -> None:
        """The floor's sender is cat (no interpreter on the clock); the
        copy arrives whole; the record states how it was measured."""
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        vm = create_image_vm(work / "plain", "p", 8)
        result = bench._plain_copy(work, vm.image_path("ram"), Lab(work / "lab"))
        self.assertEqual(result["protocol"], "plain-copy")
        self.assertEqual(result["size_mib"], 8)
        self.assertEqual(result["floor"], report.FLOOR)
        self.assertIn("cat", bench.SEND)
        self.assertNotIn("python", bench.SEND)
        self.assertFalse((work / "plain.out").exists())  # removed after the copy
        # A C sender: far less CPU than an interpreter's start-up (~50 ms).
        self.assertLess(result["cpu_s"]["source"], 0.05)
        # cat's own peak memory, not wait4's (at least this test process's).
        self.assertLess(result["peak_rss_mib"]["source"], 20)


def _run_json(case: TestCase, *argv: str) -> dict[str, Any]:
    out = Path(case.mktemp()).absolute()
    result = processes.securemig("bench", *argv, "--json", str(out))
    case.assertEqual(result.returncode, 0, result.stderr[-3000:])
    case.assertTrue(out.exists(), f"bench {' '.join(argv)} --json wrote nothing")
    document = json.loads(out.read_text())
    case.assertLessEqual(PROVENANCE, set(document["provenance"]))
    for r in document["records"]:
        case.assertLessEqual(PROVENANCE, set(r["provenance"]))
    case.assertIn(" ".join(["bench", *argv]), document["provenance"]["command_line"])
    # The printed table starts with where and how it was measured.
    case.assertTrue(
        result.stdout.startswith(
            f"securemig {document['provenance']['securemig_version']} (commit "
        )
    )
    case.assertIn(f"host {document['provenance']['hostname']}", result.stdout.splitlines()[0])
    document["stdout"] = result.stdout
    return document


class ModeJsonTests(TestCase):
    def test_tpm_json(self) -> None:
        """``bench --tpm --json F`` writes F: a fresh swtpm, said so."""
        document = _run_json(self, "--tpm", "--repeat", "1")
        self.assertEqual(document["tpm"]["kind"], "swtpm")
        self.assertTrue(document["tpm"]["fresh"])
        names = [r["operation"] for r in document["records"]]
        self.assertIn("quote", names)
        self.assertIn("enrollment (in process)", names)
        self.assertIn("TPM timed: a fresh swtpm", document["stdout"])

    def test_tpm_tcti(self) -> None:
        """``bench --tpm --tcti T`` times the TPM at T (here one the test
        started, standing in for the host's) and names it; no swtpm of its
        own is provisioned."""
        work = Path(self.mktemp()).absolute()
        swtpm.provision(work / "tpm", work / "ca")
        given = swtpm.start(work / "tpm")
        self.addCleanup(given.stop)
        document = _run_json(self, "--tpm", "--tcti", given.tcti, "--repeat", "1")
        self.assertEqual(document["tpm"], {**document["tpm"], "kind": "given",
                                           "tcti": given.tcti, "fresh": False})  # fmt: skip
        names = [r["operation"] for r in document["records"]]
        self.assertNotIn("provision swtpm (EK certs)", names)
        self.assertIn("ECDH_ZGen under PCR policy", names)
        self.assertEqual({r["tpm"] for r in document["records"]}, {given.tcti})
        self.assertIn(f"TPM timed: the TPM at TCTI {given.tcti}", document["stdout"])
        self.assertFalse(document["enrollment_timed"])

    def test_tcti_without_tpm(self) -> None:
        result = processes.securemig("bench", "--tcti", "device:/dev/tpmrm0")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--tcti goes with --tpm", result.stderr)

    def test_qemu_json(self) -> None:
        """``bench --qemu --json F`` writes F, one record per size."""
        qemu_binary()
        under_tcg(self)
        document = _run_json(self, "--qemu", "--sizes", "16", "--repeat", "1")
        self.assertEqual([r["guest_mib"] for r in document["records"]], [16])
        for key in ("suspend_s", "resume_s", "ram_image_bytes"):
            self.assertIn(key, document["records"][0])
