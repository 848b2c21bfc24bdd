"""
A rate-limited link for ``securemig bench --link-mbit N``.

The destination side of the benchmark (the migration destination, the
plain copy's receiver) runs in a network namespace of its own, joined to
this one by a veth pair.  Both ends of the pair shape their egress with a
token bucket (``tc qdisc ... tbf``: this kernel has ``tbf``, not ``netem``),
so every byte between source and destination crosses an N Mbit/s link.
The destination's host TPM (a swtpm) listens on this side's veth address,
so the destination reaches it across the link too (a few KiB per
migration).

Needs root and iproute2 (``ip``, ``tc``).  Everything is created with random
names and removed by :meth:`Link.close` (deleting the namespace deletes the
veth pair with it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

#: The Debian package that provides ``ip`` and ``tc``.
PACKAGE = "iproute2"


class LinkError(RuntimeError):
    """The link could not be set up; the message says why."""


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LinkError(f"{' '.join(argv)}: {(result.stderr or result.stdout).strip()}")


class Link:
    """A network namespace behind an N Mbit/s veth link."""

    def __init__(self, mbit: int) -> None:
        if mbit <= 0:
            raise LinkError("--link-mbit must be positive")
        if os.geteuid() != 0:
            raise LinkError("--link-mbit needs root (network namespaces, tc)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise LinkError(f"{tool} not found: install the Debian package {PACKAGE}")
        tag = os.urandom(3).hex()
        self.mbit = mbit
        self.namespace = f"securemig-{tag}"
        self.host_if, self.ns_if = f"smg{tag}h", f"smg{tag}n"
        subnet = int(tag[:2], 16)
        #: This side's address (the source, the destination's TPM) and the
        #: namespace's (the destination).
        self.host_ip, self.ns_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self._created = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    @property
    def wrapper(self) -> tuple[str, ...]:
        """The command prefix that runs a program in the namespace."""
        return ("ip", "netns", "exec", self.namespace)

    def _create(self) -> None:
        _run("ip", "netns", "add", self.namespace)
        self._created = True
        ns = ("ip", "netns", "exec", self.namespace)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.namespace)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run(*ns, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _run(*ns, "ip", "link", "set", self.ns_if, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        # A bucket of 10 ms at the rate (at least 64 KiB): enough for the
        # kernel's timer granularity at high rates, small enough to shape.
        burst = max(64 * 1024, self.mbit * 1_000_000 // 8 // 100)
        shape = ("root", "tbf", "rate", f"{self.mbit}mbit", "burst", str(burst), "latency", "50ms")
        _run("tc", "qdisc", "add", "dev", self.host_if, *shape)
        _run(*ns, "tc", "qdisc", "add", "dev", self.ns_if, *shape)

    def qdisc(self) -> str:
        """``tc qdisc show`` of this side's end (to check the shaping)."""
        result = subprocess.run(
            ["tc", "qdisc", "show", "dev", self.host_if], capture_output=True, text=True
        )
        return result.stdout

    def close(self) -> None:
        """Remove the namespace and with it the veth pair."""
        if self._created:
            self._created = False
            subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
            # The host end goes with its peer; make sure.
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
