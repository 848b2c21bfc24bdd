"""``securemig bench --link-mbit``: the destination side behind a shaped
veth link in a network namespace the test creates (and removes)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.lab import processes
from securemig.lab.bench.link import Link, LinkError


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


class LinkTests(TestCase):
    def test_link_is_shaped_and_removed(self) -> None:
        link = Link(300)
        try:
            self.assertIn(link.namespace, namespaces())
            self.assertRegex(link.qdisc(), r"tbf .*rate 300Mbit")
        finally:
            link.close()
        self.assertNotIn(link.namespace, namespaces())

    def test_bad_rate_refused(self) -> None:
        self.assertRaises(LinkError, Link, 0)

    def test_bench_behind_a_link(self) -> None:
        """The baselines and both protocols cross an 80 Mbit/s link: none
        moves faster than it (shaping that works can only slow them), and
        the namespace is gone afterwards."""
        out = Path(self.mktemp()).absolute()
        result = processes.securemig(
            "bench",
            "--link-mbit",
            "80",
            "--sizes",
            "8",
            "--repeat",
            "1",
            "--json",
            str(out / "b.json"),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        name = re.search(r"network namespace (securemig-\w+)", result.stderr)
        assert name is not None
        self.assertNotIn(name.group(1), namespaces())
        records = [r for r in json.loads((out / "b.json").read_text()) if r["size_mib"]]
        self.assertEqual(
            {r["protocol"] for r in records},
            {"plain-copy", "ssh-aes128-gcm", "ssh-chacha20", "insecure", "secure"},
        )
        for r in records:
            self.assertEqual(r["link_mbit"], 80)
            # 80 Mbit/s is 9.5 MiB/s; allow for the token bucket's burst.
            self.assertLess(r["size_mib"] / r["total_s"], 12.0, r)
