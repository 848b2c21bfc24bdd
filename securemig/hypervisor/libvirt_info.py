"""
What the backend registry and the command line need to know of the libvirt
backend without importing it: its capabilities and its default connection.

:mod:`securemig.hypervisor.libvirt` (its XML, threads and state tables, tens
of milliseconds of CPU to import) is imported only when a libvirt backend
is made or a domain adopted, so that ``securemig migrate`` of any other VM
and a daemon of another backend do not pay for it at start-up
(doc/performance.rst, "Start-up").
"""

from __future__ import annotations

from securemig.hypervisor.contract import Capabilities

#: libvirt's default system connection.
DEFAULT_URI = "qemu:///system"

#: What this backend can do (:mod:`securemig.hypervisor.backends`): the
#: suspended migration (``save`` with the domain's disks, streamed, restored
#: paused at the destination, resumed at the commit) and the live one
#: through carried sockets (libvirt's own migration, peer to peer;
#: doc/backend-libvirt.rst).  Its status says ``paused`` of a paused
#: domain, so recovery does not count on resume_continues.
CAPABILITIES = Capabilities(
    suspend=True,
    live_source=True,
    live_destination=True,
    carried=True,
    runs_guest=True,
    startable=True,
    vtpm=True,
    disks=frozenset({"raw", "qcow2"}),
)
