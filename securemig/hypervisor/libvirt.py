"""
The libvirt backend: a VM is an operator's libvirt domain (issue 23).

libvirt stays in charge of the domain (vCPUs, CPU model, NICs, disks in raw
or qcow2: whatever its XML says); securemig adds what libvirt lacks, the
vTPM secret's protection.  A domain's vTPM is swtpm with ``<encryption
secret='UUID'/>``: one libvirt secret is both the key of the vTPM state at
rest and of the vTPM blobs in QEMU's migration stream.  libvirt keeps it in
``/etc/libvirt/secrets`` (unless ephemeral) and hands it to anyone who may
call ``secret-get-value`` (unless private).  Under securemig:

- :meth:`LibvirtBackend.adopt` reads the secret's value once, seals it to
  this host's TPM (the bundle's ``vtpm-key.sealed``, as a QEMU VM's vTPM key
  is sealed), writes the bundle durably, and only then undefines the
  libvirt secret: libvirt holds no copy (no file, nothing
  ``secret-get-value`` could return).  A domain without an emulator vTPM
  encrypted by a secret is refused with a sentence saying so (securemig does
  not add one: libvirt would manufacture a new, empty vTPM, and an existing
  unencrypted state would stay readable where it lies);
- :meth:`LibvirtBackend.start` unseals the value, defines the secret
  (same UUID, ``ephemeral`` and ``private``) just long enough for libvirt to
  start swtpm with it, starts the domain and undefines the secret, also
  when the start failed;
- :meth:`LibvirtBackend.suspend` / :meth:`LibvirtBackend.resume` are
  libvirt's ``save`` into the bundle's RAM image (the vTPM blob inside is
  encrypted by the secret; guest RAM is not) and ``restore`` with the secret
  defined only for the restore.  ``save`` also puts the domain's file disks
  in the bundle (hard links, no copy), so the suspended migration streams
  them as the images ``disk``, ``disk2``, ...; at a destination the arrived
  domain is restored paused from staging before PREPARED
  (:meth:`LibvirtBackend.ready_blocking`: a save file this host cannot load
  fails before the commit), its disks being the bundle's own files, and at
  the commit it is resumed and only then defined (persistent) here;
- status is libvirt's domain state.

A bundle (``DIR/NAME/``, NAME the domain's name) holds the manifest
(backend ``libvirt``), the sealed secret and ``libvirt.json``: the domain's
and the secret's UUIDs and the connection URI it was adopted on.

Every libvirt call blocks: they run on one dedicated thread
(:class:`LibvirtBackend` owns it), never on the reactor's.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import MISSING, asdict, dataclass, replace
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from xml.sax.saxutils import escape

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from securemig import crashpoint, files
from securemig.crashpoint import CrashPoint
from securemig.hypervisor.bundle import Bundle, BundleError, Image, Manifest, check_vm_name
from securemig.hypervisor.contract import (
    BACKEND_INFO_FILE,
    LIVE_DOWNTIME_LIMIT_MS,
    LIVE_MAX_BANDWIDTH,
    Backend,
)
from securemig.hypervisor.libvirt_info import CAPABILITIES as CAPABILITIES
from securemig.hypervisor.libvirt_info import DEFAULT_URI as DEFAULT_URI
from securemig.protocol.errors import ErrorCode, LocalFault
from securemig.protocol.recovery import SourceGuest

# CAPABILITIES and DEFAULT_URI are defined in libvirt_info, which the
# registry and the command line read without importing this module; they
# are this module's names too.

#: What to install when libvirt-python is missing.
PYTHON_PACKAGE = "libvirt-python"
DEV_PACKAGE = "libvirt-dev"
#: The file in a bundle naming its domain, secret and connection.
DOMAIN_FILE = "libvirt.json"
#: A TPM sealed object holds at most 128 bytes.
MAX_SECRET = 128
#: libvirt's runtime directory, as libvirt sees it.
RUN_DIR = Path("/run/libvirt")
#: Per-migration socket directories live under RUN_DIR/MIGRATIONS/ID.
MIGRATIONS = "securemig"
#: libvirt's own clients' variable naming the URI to use when none is
#: given: this host's libvirt for arrivals (:func:`default_uri`).
CONNECT_ENV = "LIBVIRT_DEFAULT_URI"
#: Where this process sees what libvirt sees as ``/run/libvirt`` (a lab host
#: in its own mount namespace); default :data:`RUN_DIR`.
RUN_DIR_ENV = "SECUREMIG_LIBVIRT_RUN_DIR"
#: Held from the check that a copied disk's path is free to its creation
#: (:meth:`LibvirtBackend._prepare_in`), across this process's arrivals.
_CREATING = threading.Lock()
#: Held while a storage pool is made, used and destroyed
#: (:func:`_directory_pool`), across this process's libvirt threads.
_POOLS = threading.Lock()
#: How long a storage pool call waits for another process's pool of the
#: same directory to go.
POOL_WAIT = 30.0
#: Set to 1 where both hosts share the disks' storage but libvirt cannot
#: tell (the lab's hosts on one machine): libvirt's safety check waived
#: (``VIR_MIGRATE_UNSAFE``) for a migration without ``--copy-storage``.
UNSAFE_SHARED_ENV = "SECUREMIG_LIBVIRT_UNSAFE_SHARED"
#: The directories (as libvirt sees them, separated by ``:``) in which a
#: destination creates the disks of an arriving domain whose disks are
#: copied (``--copy-storage``): an attested source still names the paths,
#: and must not make this host's libvirt create files anywhere else.
DISK_DIRS_ENV = "SECUREMIG_LIBVIRT_DISK_DIRS"
#: Where libvirt keeps its images by default.
DEFAULT_DISK_DIRS = ("/var/lib/libvirt/images",)
#: The file of an arrival's staging naming the domain that arrives (from
#: HELLO's ``backend_info``) and the migration's socket tag.
INCOMING_FILE = BACKEND_INFO_FILE
#: The file of an arrival's staging listing the disks this migration
#: creates here (``--copy-storage``), written durably before the first is
#: created: an arrival that does not commit removes exactly these.
CREATED_DISKS_FILE = "created-disks.json"
#: The file of a source's bundle naming the migration (its tag) that copies
#: the domain's disks and their paths, written durably before libvirt's
#: migration starts (and removed before one that copies nothing): once that
#: migration committed, the copies left here are removed with the domain.
COPIED_DISKS_FILE = "copied-disks.json"
#: An incoming domain waits this long at most for libvirt's migration.
INCOMING_TIMEOUT = 3600.0
#: How often the destination asks libvirt whether the domain arrived.
INCOMING_POLL = 0.1
#: Where libvirt keeps each running domain's status (``NAME.xml``, its own
#: journal: a migration job's phase is saved there before libvirt acts on
#: it) and pid file, under its runtime directory.
STATUS_DIR = "qemu"
#: The phase libvirt's source saves once the destination's Finish succeeded
#: and before it ends its QEMU: from then on it never runs the guest again
#: (a libvirtd restarted in this phase kills the domain: "migration
#: completed"), where ``confirm3_cancelled`` resumes it.
CONFIRMED_PHASE = "confirm3"
#: How long a waiter sleeps when nothing woke it: seldom where inotify
#: tells of every change of libvirt's status files, else as often as
#: :data:`INCOMING_POLL`.
STATUS_FALLBACK = 1.0
#: Seconds a question to libvirt (``guest_here``, ``process_alive``) may
#: take before the answer is "cannot be asked".
QUERY_TIMEOUT = 30.0

#: Threads asking libvirt questions, shared by every backend object of the
#: process: recovery makes a backend per round and record, and a libvirtd
#: that stays stopped blocks each thread that asked it until it answers;
#: shared and bounded, a stopped libvirtd holds at most this many threads
#: (later questions queue and time out) instead of one more per question.
QUESTION_THREADS = 8
_question_pool: ThreadPool | None = None


def _questions(reactor: Any) -> ThreadPool:
    """The process's pool for :meth:`LibvirtBackend._ask`, started on first
    use and stopped when the reactor shuts down."""
    global _question_pool
    if _question_pool is None:
        pool = ThreadPool(minthreads=0, maxthreads=QUESTION_THREADS, name="securemig-libvirt-ask")
        pool.start()
        _question_pool = pool

        def stop() -> None:
            global _question_pool
            _question_pool = None
            pool.stop()

        reactor.addSystemEventTrigger("during", "shutdown", stop)
    return _question_pool


#: libvirt's ``VIR_DOMAIN_PAUSED_USER``: paused by request (``PAUSED``
#: migration flag at its Finish), as opposed to paused while it arrives.
PAUSED_USER = 1
#: libvirt's ``VIR_DOMAIN_SHUTOFF_MIGRATED``: shut off because it migrated.
SHUTOFF_MIGRATED = 4
#: At most this many disks, and QEMU multifd channels, per migration.
MAX_DISKS = 8
MAX_PARALLEL = 16
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: libvirt's domain states (``virDomainState``) as operators read them.
STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}

T = TypeVar("T")

log = Logger()


def default_uri() -> str:
    """The libvirt a host's daemon works with when a domain names none (an
    arriving one): ``LIBVIRT_DEFAULT_URI`` if set -- libvirt's own clients'
    convention, how the lab points each daemon at its host's libvirtd --
    else :data:`DEFAULT_URI`."""
    return os.environ.get(CONNECT_ENV) or DEFAULT_URI


class LibvirtError(LocalFault, RuntimeError):
    """libvirt could not do what was asked; the message says what and why."""

    default_code = ErrorCode.RESUME_FAILED


def require_libvirt() -> ModuleType:
    """The ``libvirt`` module, or an error naming what to install."""
    try:
        import libvirt
    except ImportError:
        raise LibvirtError(
            f"the Python module libvirt is missing: install {PYTHON_PACKAGE} "
            f"(pip install 'securemig[libvirt]', built against the Debian package {DEV_PACKAGE})"
        ) from None
    # libvirt prints every error on stderr besides raising it: the raised
    # one is handled (and said) where it is caught.
    libvirt.registerErrorHandler(_quiet, None)
    return libvirt


def _quiet(context: object, error: object) -> None:
    """libvirt's error callback: nothing (errors are raised as exceptions)."""


@dataclass(frozen=True)
class DomainRecord:
    """``libvirt.json``: which domain a bundle is, and where."""

    domain: str
    domain_uuid: str
    secret_uuid: str
    connect: str
    #: A domain that arrived suspended: the directory securemig made for its
    #: disks (outside the bundle, whose directory is renamed at the commit
    #: while QEMU, which reopens a disk by its path, runs on); removed with
    #: the domain.  Empty for an adopted domain: its disks are the operator's.
    disk_dir: str = ""

    @classmethod
    def load(cls, bundle: Bundle) -> DomainRecord:
        """The bundle's record, or a clear refusal."""
        try:
            data = json.loads((bundle.path / DOMAIN_FILE).read_bytes())
            return cls(
                **{
                    k: str(data[k])
                    for k, f in cls.__dataclass_fields__.items()
                    if k in data or f.default is MISSING
                }
            )
        except FileNotFoundError:
            raise BundleError(f"VM {bundle.name} is no adopted libvirt domain") from None
        except (ValueError, TypeError, KeyError) as e:
            raise BundleError(f"malformed {DOMAIN_FILE} of VM {bundle.name}: {e}") from None

    def to_json(self) -> bytes:
        """The record as stored."""
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


def vtpm_secret_uuid(domain_xml: str) -> str | None:
    """The UUID of the secret encrypting the domain's emulator vTPM, if it
    has one."""
    root = ET.fromstring(domain_xml)
    for tpm in root.iterfind("devices/tpm"):
        backend = tpm.find("backend")
        if backend is None or backend.get("type") != "emulator":
            continue
        encryption = backend.find("encryption")
        if encryption is not None and encryption.get("secret"):
            return encryption.get("secret")
    return None


def file_disks(domain_xml: str) -> list[tuple[str, str]]:
    """The domain's file-backed disks as (image name, path as libvirt sees
    it), in the XML's order: ``disk``, ``disk2``, ``disk3``, ...  Both sides
    of a suspended migration name them the same way from the same XML."""
    found: list[tuple[str, str]] = []
    for disk in ET.fromstring(domain_xml).iterfind("devices/disk"):
        source = disk.find("source")
        if disk.get("device", "disk") != "disk" or source is None or not source.get("file"):
            continue
        name = "disk" if not found else f"disk{len(found) + 1}"
        found.append((name, str(source.get("file"))))
    return found


def with_disks(domain_xml: str, paths: dict[str, str]) -> str:
    """``domain_xml`` with the source of each file disk named in ``paths``
    (by its image name, :func:`file_disks`) set to the path given."""
    root = ET.fromstring(domain_xml)
    index = 0
    for disk in root.iterfind("devices/disk"):
        source = disk.find("source")
        if disk.get("device", "disk") != "disk" or source is None or not source.get("file"):
            continue
        index += 1
        name = "disk" if index == 1 else f"disk{index}"
        if name in paths:
            source.set("file", paths[name])
    return ET.tostring(root, encoding="unicode")


def arrival_disks(domain_xml: str, record: DomainRecord, bundle: Bundle) -> dict[str, str]:
    """Where an arrived domain's disks are: its record's disk directory
    (``NAME.img`` each), or, without one, the bundle's images."""
    if record.disk_dir:
        return {n: f"{record.disk_dir}/{n}.img" for n, _ in file_disks(domain_xml)}
    return {n: str(bundle.image_path(n).absolute()) for n, _ in file_disks(domain_xml)}


def record_from_xml(domain_xml: str, connect: str) -> DomainRecord:
    """The record of a domain from its XML (an arrived save file's): its
    name, UUID and vTPM secret; refused without an encrypted vTPM."""
    root = ET.fromstring(domain_xml)
    name, uuid_ = root.findtext("name"), root.findtext("uuid")
    secret_uuid = vtpm_secret_uuid(domain_xml)
    if not name or not uuid_ or secret_uuid is None:
        raise BundleError(
            "the arrived save file holds no domain with an emulator vTPM encrypted by a secret"
        )
    return DomainRecord(name, uuid_, secret_uuid, connect)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` the same file as ``source`` (a hard link: no copy, the
    disk stays where the domain's definition says), or a copy across file
    systems."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM):
            raise
        shutil.copyfile(source, target)


def secret_xml(secret_uuid: str, domain: str) -> str:
    """The secret securemig defines: usage ``vtpm``, ephemeral (never
    written to ``/etc/libvirt/secrets``) and private (``secret-get-value``
    refuses)."""
    return (
        f"<secret ephemeral='yes' private='yes'><uuid>{escape(secret_uuid)}</uuid>"
        f"<usage type='vtpm'><name>{escape(domain)}-vtpm</name></usage></secret>"
    )


def _lookup(conn: Any, domain_uuid: str) -> Any | None:
    """The domain of this UUID on ``conn``, or None if libvirt has none."""
    libvirt = require_libvirt()
    try:
        return conn.lookupByUUIDString(domain_uuid)
    except libvirt.libvirtError:
        return None


#: Seconds libvirt may take to notice that a domain's QEMU ended.
QEMU_GONE_TIMEOUT = 10.0
#: Seconds :func:`_remove_domain` asks again while libvirt's own teardown of
#: the domain (or its migration job) is under way.
REMOVE_TIMEOUT = 120.0


def _removing_meanwhile(error: Any) -> bool:
    """Whether a libvirt ``error`` of a destroy or undefine means libvirt
    itself stopped or dropped the domain meanwhile, or still holds its job
    (its own teardown under way), so that the call is to be asked again
    rather than failed."""
    libvirt = require_libvirt()
    return bool(
        error.get_error_code()
        in (
            libvirt.VIR_ERR_NO_DOMAIN,
            libvirt.VIR_ERR_OPERATION_INVALID,
            libvirt.VIR_ERR_OPERATION_TIMEOUT,
        )
    )


def _remove_domain(conn: Any, domain_uuid: str, undefine_flags: int) -> None:
    """The domain of this UUID on ``conn`` (if libvirt has it) destroyed,
    and undefined with ``undefine_flags`` if persistent.

    libvirt may be removing it at the same moment: an incoming migration
    cut mid-copy ends there on its own (its QEMU exits on the broken
    stream, the connection that prepared it closes), and libvirt stops and
    drops the transient domain between any two of our calls -- a domain
    looked up and seen active answers ``destroy`` with "domain is not
    running", or ``isPersistent`` with "no domain".  Such a call (and a
    job libvirt still holds: "cannot acquire state change lock") is asked
    again from a fresh lookup, for at most :data:`REMOVE_TIMEOUT`; any other
    failure is raised."""
    libvirt = require_libvirt()
    deadline = time.monotonic() + REMOVE_TIMEOUT
    while (domain := _lookup(conn, domain_uuid)) is not None:
        try:
            if domain.isActive():
                domain.destroy()
            if domain.isPersistent():
                domain.undefineFlags(undefine_flags)
            return
        except libvirt.libvirtError as e:
            if not _removing_meanwhile(e) or time.monotonic() > deadline:
                raise
            log.info(
                "domain {d}: libvirt is removing it too ({e}); asking again",
                d=domain_uuid,
                e=e.get_error_message(),
            )
            time.sleep(0.1)


def _undefine_secret(conn: Any, secret_uuid: str) -> None:
    """The secret of this UUID undefined on ``conn``, if libvirt has it."""
    libvirt = require_libvirt()
    try:
        conn.secretLookupByUUIDString(secret_uuid).undefine()
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_SECRET or secret_defined(conn, secret_uuid):
            raise


def _resumed_or_gone(conn: Any, domain: Any, domain_uuid: str) -> Any | None:
    """Continue ``domain`` if it runs paused.  If that fails because its
    QEMU died (a paused arrival whose process was killed: libvirt answers
    ``Unable to read from monitor``, or has just dropped the transient
    domain), wait until libvirt says it is no longer active and return it
    as libvirt now has it (None: transient, gone), so that the caller
    restores it from its save file.  Any other failure is raised."""
    libvirt = require_libvirt()
    try:
        if domain.isActive() and domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            domain.resume()
        return domain
    except libvirt.libvirtError:
        deadline = time.monotonic() + QEMU_GONE_TIMEOUT
        while True:
            now = _lookup(conn, domain_uuid)
            try:
                if now is None or not now.isActive():
                    log.warn("domain {d}: its QEMU ended while paused", d=domain_uuid)
                    return now
            except libvirt.libvirtError:
                pass  # dropped between the lookup and the question: asked again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def secret_defined(conn: Any, secret_uuid: str) -> bool:
    """Whether libvirt on ``conn`` has a secret of this UUID."""
    libvirt = require_libvirt()
    try:
        conn.secretLookupByUUIDString(secret_uuid)
    except libvirt.libvirtError:
        return False
    return True


@contextmanager
def secret_held(conn: Any, secret_uuid: str, domain: str, value: bytes) -> Iterator[None]:
    """The secret defined (ephemeral, private) for the duration of the
    block -- the start of a swtpm -- and undefined after it, whatever
    happened."""
    libvirt = require_libvirt()
    if secret_defined(conn, secret_uuid):
        # Left by a crash between define and undefine: replace it.
        conn.secretLookupByUUIDString(secret_uuid).undefine()
    try:
        secret = conn.secretDefineXML(secret_xml(secret_uuid, domain))
    except libvirt.libvirtError as e:
        raise LibvirtError(f"libvirt refused the vTPM secret of domain {domain}: {e}") from None
    try:
        secret.setValue(value)
        yield
    finally:
        try:
            secret.undefine()
        except libvirt.libvirtError:
            if secret_defined(conn, secret_uuid):
                raise


# -- live migration (issue 23): libvirt's own, its sockets carried by securemig


def confirmed_out(status_xml: bytes) -> bool:
    """Whether libvirt's status of a domain (``STATUS_DIR/NAME.xml``) says
    its outgoing migration completed: the async job ``migration out`` in
    phase :data:`CONFIRMED_PHASE`, which libvirt saves before ending its
    QEMU and never takes back.  Anything else (no job, another phase, a
    file being replaced, not libvirt's format) is no."""
    try:
        root = ET.fromstring(status_xml)
    except ET.ParseError:
        return False
    job = root.find("job")
    return (
        job is not None
        and job.get("async") == "migration out"
        and job.get("phase") == CONFIRMED_PHASE
    )


def arrived_paused(status_xml: bytes, domain_uuid: str) -> bool:
    """Whether libvirt's status of a domain arriving here
    (``STATUS_DIR/NAME.xml``) says domain ``domain_uuid`` arrived: its
    Finish paused it by request (``VIR_MIGRATE_PAUSED``: state ``paused``,
    reason ``user``).  Anything else (paused while it arrives, another
    domain, another state, a file being replaced, not libvirt's format) is
    no: then libvirt itself is asked.  The state is the one libvirt's own ``state()``
    answers, read without a connection to libvirtd: the guest waits
    paused from the Finish until the commit, and this is that wait's
    first step."""
    try:
        root = ET.fromstring(status_xml)
    except ET.ParseError:
        return False
    uuid = root.findtext("domain/uuid")
    return (
        root.tag == "domstatus"
        and uuid is not None
        and uuid.strip().lower() == domain_uuid.lower()
        and (root.get("state"), root.get("reason")) == ("paused", "user")
    )


class StatusWatch:
    """Calls ``on_change`` whenever libvirt writes a file of domain ``name``
    in its status directory ``directory`` (its status XML, saved at each
    step of a job, or its pid file) -- inotify, through the reactor -- so a
    waiter looks at libvirt's state when it changes rather than on a
    timer.  :attr:`active` is False where inotify cannot watch (no such
    directory, a reactor without file descriptors): the waiter then looks
    every :data:`INCOMING_POLL` seconds."""

    def __init__(
        self, reactor: Any, directory: Path, name: str, on_change: Callable[[], None]
    ) -> None:
        self.on_change = on_change
        self._prefix = name + "."
        self._notifier: Any = None
        notifier: Any = None
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(reactor)
            notifier.startReading()
            notifier.watch(
                FilePath(str(directory)),
                mask=inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE | inotify.IN_DELETE,
                callbacks=[self._event],
            )
        except Exception as e:
            log.debug("no inotify watch of {d}: {e}", d=str(directory), e=e)
            if notifier is not None:
                with suppress(Exception):
                    notifier.loseConnection()
            return
        self._notifier = notifier

    @property
    def active(self) -> bool:
        """Whether changes are told (else the waiter polls)."""
        return self._notifier is not None

    @property
    def interval(self) -> float:
        """How long a waiter sleeps when nothing woke it."""
        return STATUS_FALLBACK if self.active else INCOMING_POLL

    def _event(self, _: object, path: Any, mask: int) -> None:
        name = path.basename()  # bytes: inotify's FilePath is of bytes
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        if name.startswith(self._prefix):
            self.on_change()

    def close(self) -> None:
        """Stop watching."""
        if self._notifier is not None:
            notifier, self._notifier = self._notifier, None
            notifier.loseConnection()


class Waker:
    """Wakes whoever sleeps on it (``sleep``) when ``wake`` is called or the
    time given has passed, whichever comes first.  A wake with no sleeper
    is kept for the next one: a change told while the waiter was looking
    (on a thread) is not lost."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._sleepers: list[Deferred[None]] = []
        self._pending = False

    def wake(self) -> None:
        """Wake every sleeper now (or the next one)."""
        sleepers, self._sleepers = self._sleepers, []
        if not sleepers:
            self._pending = True
        for d in sleepers:
            if not d.called:
                d.callback(None)

    def sleep(self, seconds: float) -> Deferred[None]:
        """Fires on the next :meth:`wake` (at once if one came since the last
        sleep), or after ``seconds``."""
        if self._pending:
            self._pending = False
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._sleepers.append(d)
        call = self.reactor.callLater(seconds, lambda: None if d.called else d.callback(None))

        def stop(result: None) -> None:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(stop)


@dataclass(frozen=True)
class SocketPaths:
    """A migration's UNIX socket paths: the same path names on both hosts
    (``/run/libvirt/securemig/ID/NAME.sock`` as libvirt sees them, NAME one
    of :data:`securemig.transport.carried.SOCKETS`), each
    host's own files."""

    #: The directory as libvirt and QEMU see it.
    libvirt_dir: str
    #: The same directory as this securemig process sees it.
    local_dir: Path

    def libvirt(self, name: str) -> str:
        """Socket ``name`` (``rpc``: libvirt's; ``memory``: QEMU's stream;
        ``disk``: NBD) as libvirt sees it."""
        return f"{self.libvirt_dir}/{name}.sock"

    def local(self, name: str) -> Path:
        """Socket ``name`` as this process sees it."""
        return self.local_dir / f"{name}.sock"


def socket_paths(run_dir: Path, migration_id: str) -> SocketPaths:
    """The per-migration sockets of migration ``migration_id`` (hex) on a
    host whose libvirt runtime directory securemig sees at ``run_dir``:
    unique per migration (libvirt's source stats and chowns the NBD socket;
    a reused path fails)."""
    if not migration_id or any(c not in "0123456789abcdef" for c in migration_id):
        raise ValueError("a migration id is lowercase hex")
    return SocketPaths(
        f"{RUN_DIR}/{MIGRATIONS}/{migration_id}", run_dir / MIGRATIONS / migration_id
    )


@dataclass(frozen=True)
class Disk:
    """A disk of a migrating domain: its path (as libvirt sees it), format
    and capacity in bytes; the destination creates it empty before the copy."""

    path: str
    format: str
    capacity: int


@dataclass(frozen=True)
class Outgoing:
    """What the destination needs before libvirt's Prepare: the domain and
    secret, and the disks to create."""

    domain: str
    domain_uuid: str
    secret_uuid: str
    disks: tuple[Disk, ...]


@dataclass(frozen=True)
class Incoming:
    """HELLO's ``backend_info`` of a libvirt domain: what arrives and how."""

    outgoing: Outgoing
    copy_storage: bool
    parallel: int

    def to_json(self) -> bytes:
        """As HELLO carries it."""
        o = self.outgoing
        return json.dumps(
            {
                "domain": o.domain,
                "domain_uuid": o.domain_uuid,
                "secret_uuid": o.secret_uuid,
                "disks": [[d.path, d.format, d.capacity] for d in o.disks],
                "copy_storage": self.copy_storage,
                "parallel": self.parallel,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def parse(cls, data: bytes) -> Incoming:
        """From a source's HELLO: every field checked (a source is attested,
        not trusted to name paths freely); BundleError saying what is wrong."""
        try:
            raw = json.loads(data)
            domain = str(raw["domain"])
            check_vm_name(domain)
            uuids = str(raw["domain_uuid"]), str(raw["secret_uuid"])
            if not all(UUID_RE.fullmatch(u) for u in uuids):
                raise ValueError("a UUID is malformed")
            disks = []
            if len(raw["disks"]) > MAX_DISKS:
                raise ValueError(f"more than {MAX_DISKS} disks")
            for path, fmt, capacity in raw["disks"]:
                path, fmt = str(path), str(fmt)
                if not os.path.isabs(path) or os.path.normpath(path) != path:
                    raise ValueError(f"disk path {path!r} is not absolute and normalised")
                if fmt not in ("raw", "qcow2"):
                    raise ValueError(f"disk format {fmt!r}")
                if not isinstance(capacity, int) or not 0 < capacity <= 1 << 44:
                    raise ValueError(f"disk capacity {capacity!r}")
                disks.append(Disk(path, fmt, capacity))
            parallel = raw["parallel"]
            if not isinstance(parallel, int) or not 0 <= parallel <= MAX_PARALLEL:
                raise ValueError(f"parallel {parallel!r}")
            return cls(
                Outgoing(domain, uuids[0], uuids[1], tuple(disks)),
                bool(raw["copy_storage"]),
                parallel,
            )
        except BundleError as e:
            raise BundleError(f"the arriving libvirt domain: {e}") from None
        except (ValueError, TypeError, KeyError) as e:
            raise BundleError(f"the arriving libvirt domain is described wrongly: {e}") from None


@dataclass
class LibvirtStats:
    """libvirt's numbers of a completed outgoing migration (its job
    statistics at the source), named as QEMU's LiveStats are.  Filled in
    place (:meth:`fill`) when libvirt's call returns, which may be after
    the commit (:class:`LibvirtOutgoing`)."""

    status: str = "completed"
    total_ms: int = 0
    downtime_ms: int = 0
    setup_ms: int = 0
    transferred: int = 0
    iterations: int = 0
    dirty_pages_rate: int = 0

    def guest_downtime_ms(self, started: float, running: float) -> int | None:
        """The guest's downtime as the source can bound it, as QEMU's
        (:meth:`securemig.hypervisor.qemu.LiveStats.guest_downtime_ms`):
        from its stop (``started`` + libvirt's elapsed time, less its
        downtime) to ``running``, never below libvirt's downtime; None
        without libvirt's numbers (its call failed after it confirmed)."""
        if not self.total_ms:
            return None
        stopped = started + (self.total_ms - self.downtime_ms) / 1000
        return max(self.downtime_ms, round((running - stopped) * 1000))

    def fill(self, other: LibvirtStats) -> None:
        """Take ``other``'s numbers."""
        self.__dict__.update(asdict(other))

    @classmethod
    def of(cls, stats: dict[str, Any]) -> LibvirtStats:
        """From ``virDomainGetJobStats(COMPLETED)``."""
        return cls(
            total_ms=int(stats.get("time_elapsed", 0)),
            downtime_ms=int(stats.get("downtime", 0)),
            setup_ms=int(stats.get("setup_time", 0)),
            transferred=int(stats.get("data_processed", 0)),
            iterations=int(stats.get("memory_iteration", 0)),
            dirty_pages_rate=int(stats.get("memory_dirty_rate", 0)),
        )


def copied_disks(domain: Any) -> tuple[Disk, ...]:
    """The domain's file-backed disks that libvirt copies with
    ``NON_SHARED_DISK`` (not ``<readonly/>``, not ``<shareable/>``: those
    must be at the destination already, as for libvirt's own migration),
    with their format and capacity: the disks a destination creates for a
    ``--copy-storage`` migration, and those a committed one leaves stale
    copies of at the source."""
    found = []
    for disk in ET.fromstring(domain.XMLDesc(0)).iterfind("devices/disk"):
        source = disk.find("source")
        driver = disk.find("driver")
        if disk.get("device", "disk") != "disk" or source is None or not source.get("file"):
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        path = str(source.get("file"))
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        found.append(Disk(path, fmt, int(domain.blockInfo(path)[0])))
    return tuple(found)


def migration_bandwidth(max_bandwidth: int) -> int:
    """libvirt's bandwidth for a migration (MiB/s, at least 1) from
    ``--bandwidth`` in bytes per second; 0 (libvirt's own) for the default
    :data:`LIVE_MAX_BANDWIDTH`, which means no limit."""
    if not 0 < max_bandwidth < LIVE_MAX_BANDWIDTH:
        return 0
    return max(1, max_bandwidth >> 20)


def _migration_flags(
    libvirt: Any, copy_storage: bool, parallel: int, unchecked_shared: bool = False
) -> int:
    """Live, peer to peer (the source's libvirtd opens the destination URI,
    so its RPC goes through the carried socket too), persistent at the
    destination, and ``PAUSED``: the destination does not run the guest
    until securemig's commit.  The source's definition is kept (no
    ``UNDEFINE_SOURCE``): it goes, with its vTPM state, only after
    COMMITTED."""
    flags = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_PAUSED
    )
    if copy_storage:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    if parallel:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
    if unchecked_shared:
        # libvirt recognises shared storage by its file system (NFS, Ceph,
        # ...); storage the operator knows is shared but libvirt cannot tell
        # (the lab's, one machine) needs its check waived.
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    return int(flags)


def disk_dirs() -> tuple[str, ...]:
    """The directories copied disks may be created in (:data:`DISK_DIRS_ENV`,
    else :data:`DEFAULT_DISK_DIRS`); relative entries count for nothing."""
    raw = os.environ.get(DISK_DIRS_ENV)
    if not raw:
        return DEFAULT_DISK_DIRS
    return tuple(os.path.normpath(d) for d in raw.split(":") if os.path.isabs(d))


def check_disk_dirs(disks: tuple[Disk, ...], allowed: tuple[str, ...]) -> None:
    """Refuse (``POLICY_REFUSED``) a disk to copy whose path is not inside
    one of the ``allowed`` directories.  The paths were checked absolute
    and normalised (:meth:`Incoming.parse`), so a prefix test on whole
    path components decides (``/images-x`` is not inside ``/images``)."""
    for disk in disks:
        if not any(disk.path.startswith(d.rstrip("/") + "/") for d in allowed):
            raise BundleError(
                f"disk {disk.path} would be created outside the directories this host "
                f"creates copied disks in ({', '.join(allowed) or 'none'}; "
                f"{DISK_DIRS_ENV} names them)",
                ErrorCode.POLICY_REFUSED,
            )


def disks_in_use(conn: Any) -> dict[str, str]:
    """Every file a domain defined (or running) on ``conn`` uses as a disk,
    with that domain's name."""
    used: dict[str, str] = {}
    for domain in conn.listAllDomains(0):
        for disk in ET.fromstring(domain.XMLDesc(0)).iterfind("devices/disk"):
            source = disk.find("source")
            if source is not None and source.get("file"):
                used[os.path.normpath(str(source.get("file")))] = domain.name()
    return used


def check_disks_unused(disks: tuple[Disk, ...], used: dict[str, str]) -> None:
    """Refuse a copied disk whose path a domain here uses (``used``:
    :func:`disks_in_use`): the copy would overwrite that domain's disk.  (A
    file no domain uses is refused too, by :func:`check_disks_new`; this
    check names the domain.)"""
    for disk in disks:
        other = used.get(os.path.normpath(disk.path))
        if other is not None:
            raise BundleError(
                f"disk {disk.path} is used by domain {other} here: a copied disk never "
                "overwrites another domain's",
                ErrorCode.POLICY_REFUSED,
            )


@contextmanager
def _directory_pool(conn: Any, directory: str) -> Iterator[Any]:
    """A libvirt storage pool of ``directory`` (as libvirt sees it),
    refreshed: an operator's pool of it if there is one (libvirt refuses a
    second pool of one directory, even beside a stopped one: the usual
    ``default`` pool of ``/var/lib/libvirt/images``), started for the call
    if it was stopped, else a transient one made for the call; either is
    stopped again after it (a transient one then goes).

    One call at a time in this process.  Another live process's call (the
    ``securemig migrate`` command beside the daemon) may hold its transient
    pool of the directory: this call waits for it (:data:`POOL_WAIT`).  One
    a killed process left is taken over, and goes after the call."""
    libvirt = require_libvirt()
    directory = os.path.normpath(directory)
    deadline = time.monotonic() + POOL_WAIT
    with _POOLS:
        while True:
            pool = _existing_pool(conn, directory)
            # Stopped after the call unless it is an operator's pool that
            # was running (one made, started or taken over here goes).
            stop = pool is None or pool is _BUSY or str(pool.name()).startswith("securemig-")
            try:
                if pool is None:
                    pool = conn.storagePoolCreateXML(
                        f"<pool type='dir'><name>securemig-{os.getpid()}-"
                        f"{secrets.token_hex(4)}</name>"
                        f"<target><path>{escape(directory)}</path></target></pool>",
                        0,
                    )
                elif pool is not _BUSY and not pool.isActive():
                    pool.create(0)
                    stop = True
                if pool is not _BUSY:
                    break
            except libvirt.libvirtError:
                pass  # made or started meanwhile by another process: asked again
            if time.monotonic() > deadline:
                raise LibvirtError(
                    f"libvirt's storage pool of {directory} stayed busy for {POOL_WAIT:g} s "
                    "(another securemig process holds it)"
                )
            time.sleep(0.1)
        try:
            pool.refresh(0)
            yield pool
        finally:
            if stop:
                with suppress(libvirt.libvirtError):
                    pool.destroy()


#: :func:`_existing_pool`'s answer for a pool another live process holds.
_BUSY = object()


def _existing_pool(conn: Any, directory: str) -> Any:
    """The directory pool (running or not) whose target is ``directory``:
    an operator's, or a transient one of securemig's that a killed process
    left; :data:`_BUSY` if it is one a live securemig process holds now;
    None if there is none."""
    libvirt = require_libvirt()
    for pool in conn.listAllStoragePools(0):
        try:
            root = ET.fromstring(pool.XMLDesc(0))
            name = str(pool.name())
        except (libvirt.libvirtError, ET.ParseError):
            continue  # dropped meanwhile
        target = root.findtext("target/path")
        if root.get("type") != "dir" or not target or os.path.normpath(target) != directory:
            continue
        owner = name.split("-")[1] if name.startswith("securemig-") else ""
        if owner.isdigit() and int(owner) != os.getpid() and files.process_alive(int(owner)):
            return _BUSY
        return pool
    return None


def _volume(pool: Any, name: str) -> Any:
    """The volume ``name`` of ``pool``, or None."""
    libvirt = require_libvirt()
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def _refuse_existing(pool: Any, disk: Disk) -> None:
    """Refuse (``POLICY_REFUSED``) a disk to copy whose path names a file
    here already -- an operator's, another VM's, a symbolic link to
    anything: the attested source names the path, and a copied disk is
    written only into a file its migration created."""
    if _volume(pool, disk.path.rpartition("/")[2]) is not None:
        raise BundleError(
            f"disk {disk.path} exists here already: a copied disk is only written "
            "into a file the migration creates (remove it, or migrate without "
            "--copy-storage if both hosts share the storage)",
            ErrorCode.POLICY_REFUSED,
        )


def check_disks_new(conn: Any, disks: tuple[Disk, ...]) -> None:
    """:func:`_refuse_existing` for each of ``disks`` (paths as libvirt on
    ``conn`` sees them), and their formats checked."""
    for disk in disks:
        if disk.format not in ("raw", "qcow2"):
            raise BundleError(f"disk {disk.path}: format {disk.format} (raw or qcow2 are copied)")
        with _directory_pool(conn, disk.path.rpartition("/")[0]) as pool:
            _refuse_existing(pool, disk)


def _create_volume(conn: Any, disk: Disk, claimed: Callable[[], None] = lambda: None) -> None:
    """An empty disk at ``disk.path`` (libvirt's view) through a libvirt
    storage pool, so libvirt creates it where it sees it; never over a file
    (:func:`_refuse_existing`), nor through a symbolic link to nothing.

    libvirt creates a raw file with ``O_EXCL`` (which refuses any link),
    but a qcow2 one with ``qemu-img create``, which follows a dangling link
    and creates its target, wherever that is: so the path is claimed first
    as an empty raw file, which then makes way for the qcow2 image.
    ``claimed`` is called once the path is this migration's (the claim
    made): from then on the file is one to delete should anything fail."""
    libvirt = require_libvirt()
    directory, _, name = disk.path.rpartition("/")
    with _directory_pool(conn, directory) as pool:
        _refuse_existing(pool, disk)
        try:
            claim = pool.createXML(_volume_xml(name, 0, "raw"), 0)
        except libvirt.libvirtError as e:
            # A dangling symbolic link is no volume to libvirt's refresh,
            # but the create refuses it: refused as any file there.
            if os.strerror(errno.EEXIST) not in str(e.get_error_message()):
                raise
            raise BundleError(
                f"disk {disk.path} exists here already (a symbolic link to nothing): "
                "a copied disk is only written into a file the migration creates",
                ErrorCode.POLICY_REFUSED,
            ) from None
        claimed()
        claim.delete(0)
        pool.createXML(_volume_xml(name, disk.capacity, disk.format), 0)


def _volume_xml(name: str, capacity: int, fmt: str) -> str:
    """A storage volume's definition: ``name`` in its pool, empty."""
    return (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{capacity}"
        f"</capacity><allocation>0</allocation><target><format type='{fmt}'/>"
        "</target></volume>"
    )


def _delete_volumes(conn: Any, paths: list[str]) -> list[str]:
    """The files at ``paths`` (libvirt's view) deleted through libvirt;
    those already gone are skipped (a redone removal), and so is any a
    domain here uses (:func:`disks_in_use`: once its own domain went, a
    listed path another domain took since is that domain's).  Returns the
    paths left that way."""
    used = disks_in_use(conn)
    left = []
    for path in paths:
        if os.path.normpath(path) in used:
            log.warn(
                "copied disk {p} is left: domain {d} uses it",
                p=path,
                d=used[os.path.normpath(path)],
            )
            left.append(path)
            continue
        directory, _, name = path.rpartition("/")
        with _directory_pool(conn, directory) as pool:
            volume = _volume(pool, name)
            if volume is not None:
                volume.delete(0)
                log.info("copied disk {p} removed", p=path)
    return left


def _listed_disks(path: Path, migration: str | None = None) -> list[str]:
    """The disk paths a :data:`CREATED_DISKS_FILE` or
    :data:`COPIED_DISKS_FILE` lists (only if it names ``migration``, when
    given); none if there is no such file."""
    try:
        raw = json.loads(path.read_bytes())
        if migration is not None and raw["migration"] != migration:
            return []
        return [str(p) for p in raw["disks"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{path}: {e}") from None


def _list_disks(path: Path, migration: str, disks: list[str]) -> None:
    """Journal the disk paths ``disks`` of ``migration`` in ``path``
    (durably), before they are created or copied."""
    files.write_durably(path, json.dumps({"migration": migration, "disks": disks}).encode())


class LibvirtBackend(Backend):
    """Adopted libvirt domains; each bundle names its domain and URI."""

    name = "libvirt"
    capabilities = CAPABILITIES

    def __init__(
        self,
        reactor: Any = None,
        vtpm_key: Callable[[Bundle], bytes] | None = None,
        connect: str | None = None,
        run_dir: Path | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        #: Unseals a bundle's secret value with this host's TPM; None on a
        #: host without a TPM identity, where domains cannot start.
        self.vtpm_key = vtpm_key
        #: Overrides the URI a bundle was adopted on.
        self.connect = connect
        #: Where securemig sees what libvirt sees as ``/run/libvirt`` (the
        #: same directory, except for a lab host in its mount namespace).
        if run_dir is None:
            run_dir = Path(os.environ.get(RUN_DIR_ENV) or RUN_DIR)
        self.run_dir = run_dir
        self._pool: ThreadPool | None = None

    # -- blocking calls, on the backend's own thread

    def _call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="securemig-libvirt")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.close)
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    def _ask(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """A short question to libvirt (where is the guest?) on the
        process's question threads (:data:`QUESTION_THREADS`), failing with
        :class:`LibvirtError` after :data:`QUERY_TIMEOUT`: a stopped
        libvirtd never answers (the thread that asked stays blocked until it
        does), and the caller must go on knowing it could not ask."""
        given_up = False

        def question() -> T:
            if given_up:  # timed out while queued behind blocked ones
                raise LibvirtError("libvirt was not asked: an earlier question blocks")
            return fn(*args)

        d = deferToThreadPool(self.reactor, _questions(self.reactor), question)
        d.addTimeout(QUERY_TIMEOUT, self.reactor)

        def timed_out(f: Any) -> Any:
            nonlocal given_up
            if f.check(defer.TimeoutError):
                given_up = True
                raise LibvirtError(f"libvirt did not answer in {QUERY_TIMEOUT:g} s")
            return f

        return d.addErrback(timed_out)

    def close(self) -> None:
        """Stop the backend's thread (when its queued calls are done)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()

    def _open(self, uri: str) -> Any:
        libvirt = require_libvirt()
        try:
            return libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot connect to libvirt at {uri}: {e}") from None

    @contextmanager
    def _connection(self, uri: str) -> Iterator[Any]:
        """A connection to libvirt at ``uri``, closed when the block ends."""
        conn = self._open(uri)
        try:
            yield conn
        finally:
            conn.close()

    def _uri(self, record: DomainRecord) -> str:
        return self.connect or record.connect

    def _domain(self, conn: Any, record: DomainRecord) -> Any:
        libvirt = require_libvirt()
        try:
            return conn.lookupByUUIDString(record.domain_uuid)
        except libvirt.libvirtError:
            raise BundleError(
                f"libvirt at {self._uri(record)} has no domain {record.domain} "
                f"(UUID {record.domain_uuid})"
            ) from None

    def _key(self, bundle: Bundle) -> bytes:
        if self.vtpm_key is None:
            raise LibvirtError(
                f"domain {bundle.name} has a vTPM whose secret is sealed to this host's TPM: "
                "give this host's --identity"
            )
        return self.vtpm_key(bundle)

    # -- adopt

    def adopt(
        self, vm_dir: Path, domain: str, connect: str, seal: Callable[[bytes], bytes]
    ) -> Deferred[Bundle]:
        """Bring libvirt domain ``domain`` (on ``connect``) under securemig's
        care: a bundle ``vm_dir/domain`` with its vTPM secret's value sealed
        by ``seal`` (this host's TPM), then the libvirt secret undefined."""
        return self._call(self._adopt, vm_dir, domain, connect, seal)

    def _adopt(
        self, vm_dir: Path, domain_name: str, connect: str, seal: Callable[[bytes], bytes]
    ) -> Bundle:
        libvirt = require_libvirt()
        check_vm_name(domain_name)
        path = vm_dir / domain_name
        if path.exists():
            return self._adopted_already(path, domain_name)
        with self._connection(connect) as conn:
            try:
                domain = conn.lookupByName(domain_name)
            except libvirt.libvirtError:
                raise BundleError(f"libvirt at {connect} has no domain {domain_name}") from None
            secret_uuid = vtpm_secret_uuid(domain.XMLDesc(0))
            if secret_uuid is None:
                raise BundleError(
                    f"domain {domain_name} has no emulator vTPM encrypted by a libvirt secret "
                    "(<tpm><backend type='emulator'><encryption secret='UUID'/>); securemig "
                    "adopts only such domains and does not add one"
                )
            try:
                secret = conn.secretLookupByUUIDString(secret_uuid)
            except libvirt.libvirtError:
                raise BundleError(
                    f"the vTPM secret {secret_uuid} of domain {domain_name} is not defined in "
                    "libvirt: define it (with its value) once, to be sealed"
                ) from None
            try:
                value = secret.value()
            except libvirt.libvirtError as e:
                raise BundleError(
                    f"libvirt does not give the value of the vTPM secret of domain "
                    f"{domain_name} ({e.get_error_message()}): it must be readable once, "
                    "at adoption (not private)"
                ) from None
            if not 0 < len(value) <= MAX_SECRET:
                raise BundleError(
                    f"the vTPM secret of domain {domain_name} has {len(value)} bytes; "
                    f"1 to {MAX_SECRET} can be sealed"
                )
            record = DomainRecord(domain_name, domain.UUIDString(), secret_uuid, connect)
            sealed = seal(value)
            del value
            running = domain.state()[0] in (1, 3)
            self._write_bundle(vm_dir, record, sealed, "running" if running else "stopped")
            # Only once the sealed copy is durable: libvirt's copy goes.  A
            # crash between the two is finished by adopting again.
            crashpoint.reached(CrashPoint.ADOPT_SEALED)
            secret.undefine()
            return Bundle.find(vm_dir, domain_name)

    def _adopted_already(self, path: Path, domain_name: str) -> Bundle:
        """Adopting an adopted domain again: an adoption interrupted after its
        bundle was durable (libvirt's secret still defined) is finished --
        the secret undefined -- and its bundle returned; a complete one is
        refused."""
        bundle = Bundle.find(path.parent, domain_name)
        record = DomainRecord.load(bundle)
        with self._connection(self.connect or record.connect) as conn:
            if not secret_defined(conn, record.secret_uuid):
                raise BundleError(f"{path} already exists: domain {domain_name} is adopted already")
            conn.secretLookupByUUIDString(record.secret_uuid).undefine()
        return bundle

    @staticmethod
    def _write_bundle(vm_dir: Path, record: DomainRecord, sealed: bytes, state: str) -> None:
        vm_dir.mkdir(parents=True, exist_ok=True)
        staging = vm_dir / f".{record.domain}.adopting"
        files.remove_tree(staging)
        staging.mkdir()
        bundle = Bundle(
            staging, Manifest(name=record.domain, backend="libvirt", images=[], state=state)
        )
        files.write_durably(bundle.vtpm_key_path, sealed, mode=0o600)
        files.write_durably(staging / DOMAIN_FILE, record.to_json())
        bundle.save()
        files.rename_durably(staging, vm_dir / record.domain)

    # -- start, suspend, resume, discard

    def start(self, bundle: Bundle) -> Deferred[None]:
        """Start the domain: its secret defined only while swtpm starts."""
        return self._call(self._start, bundle)

    def _start(self, bundle: Bundle) -> None:
        libvirt = require_libvirt()
        record = DomainRecord.load(bundle)
        with self._connection(self._uri(record)) as conn:
            domain = self._domain(conn, record)
            if domain.isActive():
                return
            value = self._key(bundle)
            with secret_held(conn, record.secret_uuid, record.domain, value):
                try:
                    domain.create()
                except libvirt.libvirtError as e:
                    raise LibvirtError(
                        f"libvirt did not start domain {record.domain}: {e.get_error_message()}"
                    ) from None
        bundle.manifest.state = "running"
        bundle.save()

    def suspend(self, bundle: Bundle) -> Deferred[None]:
        """libvirt's ``save`` of the domain into the bundle's RAM image (the
        domain stops, still defined here; its vTPM blob inside is encrypted
        by the secret), its file disks put in the bundle as images beside
        it: what a suspended migration streams."""
        return self._call(self._suspend, bundle)

    def _suspend(self, bundle: Bundle) -> None:
        libvirt = require_libvirt()
        record = DomainRecord.load(bundle)
        ram = bundle.image_path("ram").absolute()
        with self._connection(self._uri(record)) as conn:
            domain = self._domain(conn, record)
            # The definition's disks: a running arrival's live XML still
            # names the staging directory its bundle was renamed from.
            # A disk this process does not see at libvirt's path (a lab host's
            # own tree) stays out: saved and restored here it needs no copy;
            # a destination then cannot restore the domain and says so
            # before the commit.
            disks = [
                (name, path)
                for name, path in file_disks(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                if Path(path).is_file()
            ]
            try:
                domain.save(str(ram))
            except libvirt.libvirtError as e:
                raise LibvirtError(
                    f"libvirt did not save domain {record.domain}: {e.get_error_message()}"
                ) from None
        images = [Image("ram", ram.stat().st_size)]
        for name, path in disks:
            target = bundle.image_path(name).absolute()
            if Path(path).absolute() != target:
                _link_or_copy(Path(path), target)
            images.append(Image(name, target.stat().st_size))
        bundle.manifest.images = images
        bundle.manifest.state = "suspended"
        bundle.save()

    def ready_blocking(self, bundle: Bundle) -> None:
        """Destination, a suspended arrival in staging, before PREPARED (off
        the reactor thread): the domain restored from the arrived save file,
        **paused**, the secret defined only for the restore.  A save file
        this host cannot load (a wrong secret cannot open its vTPM blob, a
        missing emulator...) fails here, before the source commits.  Its
        disks move out of staging into a directory of their own beside it
        (``disks/ID/``: staging is renamed at the commit, and QEMU reopens a
        disk by its path when it saves).  The domain stays transient (not
        defined here) until the commit (:meth:`resume`)."""
        libvirt = require_libvirt()
        ram = bundle.image_path("ram").absolute()
        if bundle.manifest.state != "suspended" or not ram.exists():
            return
        uri = self.connect or default_uri()
        with self._connection(uri) as conn:
            try:
                saved = conn.saveImageGetXMLDesc(str(ram), 0)
            except libvirt.libvirtError as e:
                raise LibvirtError(
                    f"libvirt cannot read the arrived save file: {e.get_error_message()}"
                ) from None
            record = record_from_xml(saved, uri)
            if record.domain != bundle.name:
                raise BundleError(
                    f"the arrived save file holds domain {record.domain}, not {bundle.name}"
                )
            if _lookup(conn, record.domain_uuid) is not None:
                raise BundleError(f"domain {record.domain} is defined here already")
            disk_dir = bundle.path.absolute().parent.parent / "disks" / bundle.path.name
            record = replace(record, disk_dir=str(disk_dir))
            # Written first: whoever removes staging ends the domain, and its
            # disks, by it.
            files.write_durably(bundle.path / DOMAIN_FILE, record.to_json())
            disks = arrival_disks(saved, record, bundle)
            disk_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name, target in disks.items():
                if bundle.image_path(name).exists():
                    os.rename(bundle.image_path(name), target)
            files.fsync_dir(disk_dir)
            value = self._key(bundle)
            with secret_held(conn, record.secret_uuid, record.domain, value):
                try:
                    conn.restoreFlags(
                        str(ram), with_disks(saved, disks), libvirt.VIR_DOMAIN_SAVE_PAUSED
                    )
                except libvirt.libvirtError as e:
                    raise LibvirtError(
                        f"libvirt did not restore domain {record.domain} here: "
                        f"{e.get_error_message()}"
                    ) from None

    def resume(self, bundle: Bundle) -> Deferred[None]:
        """Run the domain again: a paused one (restored paused at its
        arrival, a live arrival waiting for its commit, the operator's
        pause) continues, a running one is left as it is, a saved one is
        restored from the bundle's RAM image with the secret defined only
        for the restore.  A domain that is not defined here (an arrival) is
        defined now, its disks the bundle's files."""
        return self._call(self._resume, bundle)

    def _resume(self, bundle: Bundle) -> None:
        libvirt = require_libvirt()
        record = DomainRecord.load(bundle)
        created = bundle.path / CREATED_DISKS_FILE
        # Before the guest runs: from now on its disks are the VM's own,
        # never an aborted arrival's to delete.
        files.remove_durably(created)
        ram = bundle.image_path("ram").absolute()
        with self._connection(self._uri(record)) as conn:
            domain = _lookup(conn, record.domain_uuid)
            if domain is not None and ram.exists():
                # A paused arrival whose QEMU may have just died (libvirt
                # not yet told): then it is restored from the save file
                # below, memory intact.
                domain = _resumed_or_gone(conn, domain, record.domain_uuid)
            if domain is not None and domain.isActive():
                if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    domain.resume()
            elif domain is not None and not ram.exists():
                # Shut off with no saved state (a live migration whose
                # destination QEMU died after libvirt ended this one): its
                # memory is gone; its disks and vTPM state are here.
                raise BundleError(
                    f"domain {record.domain} is shut off here with no saved state: its "
                    f"memory is lost; `securemig vm start {record.domain}` boots it from its "
                    "disks and vTPM state"
                )
            elif not ram.exists():
                raise BundleError(
                    f"libvirt at {self._uri(record)} has no domain {record.domain} "
                    f"(UUID {record.domain_uuid}) and the bundle no saved one"
                )
            else:
                # Defined here (the source after a rollback): the disks of its
                # definition.  Not (an arrival whose QEMU ended): the bundle's.
                saved = conn.saveImageGetXMLDesc(str(ram), 0)
                if domain is None:
                    dxml = with_disks(saved, arrival_disks(saved, record, bundle))
                else:
                    defined = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                    dxml = with_disks(saved, dict(file_disks(defined)))
                value = self._key(bundle)
                with secret_held(conn, record.secret_uuid, record.domain, value):
                    try:
                        conn.restoreFlags(str(ram), dxml, 0)
                    except libvirt.libvirtError as e:
                        raise LibvirtError(
                            f"libvirt did not restore domain {record.domain}: "
                            f"{e.get_error_message()}"
                        ) from None
            domain = self._domain(conn, record)
            if not domain.isPersistent():
                # An arrival: defined here only now, after the commit.
                conn.defineXML(
                    domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE)
                )
            used = {path for _, path in file_disks(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))}
        ram.unlink(missing_ok=True)
        kept = []
        for image in bundle.manifest.images:
            path = bundle.image_path(image)
            if image.name == "ram":
                continue
            if str(path.absolute()) in used:
                kept.append(image)  # the domain's own disk (an arrival's)
            else:
                path.unlink(missing_ok=True)  # a link to the domain's disk, made by save
        bundle.manifest.images = kept
        # An arrival resumed (committed): no longer one to abort, and its
        # secret (if a crash left it defined) goes.
        if (bundle.path / INCOMING_FILE).exists():
            with self._connection(self._uri(record)) as conn:
                if secret_defined(conn, record.secret_uuid):
                    conn.secretLookupByUUIDString(record.secret_uuid).undefine()
            (bundle.path / INCOMING_FILE).unlink()
        bundle.manifest.state = "running"
        bundle.save()

    def discard(self, bundle: Bundle) -> Deferred[None]:
        """Remove the domain from this host: stopped, undefined with its vTPM
        state, and the bundle (with the sealed secret) removed."""
        return self._call(self._discard, bundle)

    def discard_moved(self, bundle: Bundle, moved: str) -> Deferred[None]:
        """:meth:`discard`, and if committed migration ``moved`` copied the
        domain's disks (``--copy-storage``), the stale copies left here."""
        return self._call(self._discard, bundle, moved)

    def _discard(self, bundle: Bundle, moved: str = "") -> None:
        libvirt = require_libvirt()
        record = DomainRecord.load(bundle)
        with self._connection(self._uri(record)) as conn:
            domain = _lookup(conn, record.domain_uuid)
            ran = False
            if domain is not None:
                if domain.isActive():
                    ran = True
                    domain.destroy()
                if domain.isPersistent():
                    domain.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_TPM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    )
            if secret_defined(conn, record.secret_uuid):
                conn.secretLookupByUUIDString(record.secret_uuid).undefine()
            if moved and ran:
                # It ran here after all: its disks are not known to be mere
                # copies of what moved; left for the operator.
                log.warn(
                    "domain {d} ran here when its move was released: its disks are left",
                    d=record.domain,
                )
            elif moved:
                _delete_volumes(conn, _listed_disks(bundle.path / COPIED_DISKS_FILE, moved))
                crashpoint.reached(CrashPoint.SOURCE_COPIES_REMOVED)
        if record.disk_dir:
            files.remove_tree(Path(record.disk_dir))
        files.remove_tree(bundle.path)

    def end(self, bundle: Bundle) -> Deferred[None]:
        """Power the domain off here (``destroy``: its memory is lost, its
        vTPM state stays), on the backend's own thread; nothing for a bundle
        that is no adopted domain (a staging directory another backend's VM
        left: answered at once, with no thread)."""
        if not (bundle.path / DOMAIN_FILE).exists() and not (bundle.path / INCOMING_FILE).exists():
            return succeed(None)
        return self._call(self.end_blocking, bundle)

    def end_blocking(self, bundle: Bundle) -> None:
        """:meth:`end`, blocking the calling thread (never the reactor's).
        An arrival's staging (a live arrival not committed): the domain
        libvirt made here destroyed and undefined with its new vTPM state,
        the secret undefined (:meth:`abort_in`)."""
        if (bundle.path / INCOMING_FILE).exists():
            try:
                incoming, tag = _read_incoming(bundle)
            except BundleError:
                return
            self._abort_in(incoming.outgoing, socket_paths(self.run_dir, tag), bundle.path)
            return
        try:
            record = DomainRecord.load(bundle)
        except BundleError:
            return
        with self._connection(self._uri(record)) as conn:
            domain = _lookup(conn, record.domain_uuid)
            if domain is not None and domain.isActive():
                domain.destroy()
        if record.disk_dir and Path(record.disk_dir).name == bundle.path.name:
            # Still the staging directory the disks came from: an arrival
            # that never committed, its transient domain gone with destroy;
            # nothing will use these disks again.
            files.remove_tree(Path(record.disk_dir))

    def arrived(self, bundle: Bundle) -> bool:
        """A live arrival in staging: libvirt's migration finished here (the
        domain paused by request, persistent), the source's QEMU ended.
        Blocks on libvirt."""
        if not (bundle.path / INCOMING_FILE).exists():
            return False
        try:
            incoming, _ = _read_incoming(bundle)
        except BundleError:
            return False
        if self._incoming_state(incoming.outgoing) != (3, PAUSED_USER):
            return False
        # Its swtpm holds the key: libvirt's copy goes (a crash may have come
        # between the arrival and end_in).
        with self._connection(self.connect or default_uri()) as conn:
            if secret_defined(conn, incoming.outgoing.secret_uuid):
                conn.secretLookupByUUIDString(incoming.outgoing.secret_uuid).undefine()
        return True

    def moved_away(self, bundle: Bundle) -> bool:
        """The domain is shut off here because libvirt migrated it
        (``VIR_DOMAIN_SHUTOFF_MIGRATED``): its Confirm phase ended this
        QEMU after the destination's Finish.  Blocks on libvirt."""
        try:
            record = DomainRecord.load(bundle)
        except BundleError:
            return False
        with self._connection(self._uri(record)) as conn:
            domain = _lookup(conn, record.domain_uuid)
            state = None if domain is None else tuple(domain.state())
            log.info("domain {d} at the source: libvirt state {s}", d=record.domain, s=state)
            return state == (5, SHUTOFF_MIGRATED)

    def guest_here(self, bundle: Bundle) -> Deferred[SourceGuest]:
        """Source: where libvirt says the domain's guest is (off the reactor
        thread): RUNS while it is active (running, or paused with its QEMU:
        resumable with its memory), MOVED if shut off because libvirt
        migrated it, GONE if shut off otherwise or undefined, UNKNOWN if
        libvirt cannot be asked (not connected, no answer, an error other
        than "no such domain")."""

        def failed(f: Any) -> SourceGuest:
            log.warn(
                "domain {d}: cannot ask libvirt where it is: {e}",
                d=bundle.name,
                e=f.getErrorMessage(),
            )
            return SourceGuest.UNKNOWN

        return self._ask(self._guest_here, bundle).addErrback(failed)

    def _guest_here(self, bundle: Bundle) -> SourceGuest:
        libvirt = require_libvirt()
        try:
            record = DomainRecord.load(bundle)
        except BundleError:
            return SourceGuest.GONE
        with self._connection(self._uri(record)) as conn:
            try:
                domain = conn.lookupByUUIDString(record.domain_uuid)
                state, reason = domain.state()
                active = bool(domain.isActive())
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return SourceGuest.GONE
                raise LibvirtError(f"libvirt did not say where it is: {e}") from None
        log.info("domain {d} at the source: libvirt state {s}", d=record.domain, s=(state, reason))
        if active:
            return SourceGuest.RUNS
        if (state, reason) == (5, SHUTOFF_MIGRATED):
            return SourceGuest.MOVED
        return SourceGuest.GONE

    def process_alive(self, bundle: Bundle) -> Deferred[bool]:
        """:meth:`has_process` off the reactor thread."""
        return self._ask(self.has_process, bundle)

    def ask(self, question: Callable[..., T], *args: Any) -> Deferred[T]:
        """A blocking question (:meth:`arrived`, :meth:`has_process`,
        :meth:`status`) on the process's question threads, failing with
        :class:`LibvirtError` after :data:`QUERY_TIMEOUT` (a stopped
        libvirtd never answers)."""
        return self._ask(question, *args)

    def has_process(self, bundle: Bundle) -> bool:
        """Whether libvirt runs the domain here (running or paused); False
        for a bundle that is no adopted domain.  Blocks on libvirt."""
        try:
            record = DomainRecord.load(bundle)
        except BundleError:
            return False
        with self._connection(self._uri(record)) as conn:
            domain = _lookup(conn, record.domain_uuid)
            return domain is not None and bool(domain.isActive())

    # -- status

    def state(self, bundle: Bundle) -> Deferred[str]:
        """libvirt's state of the domain (off the reactor thread)."""
        return self._call(self.status, bundle)

    def status(self, bundle: Bundle) -> str:
        """libvirt's state of the domain: ``running``, ``paused``,
        ``shutoff``, ...; ``undefined`` if libvirt has no such domain.
        Blocks (the backend contract's status is synchronous; the CLI calls
        it without a reactor); :meth:`state` is the asynchronous one."""
        record = DomainRecord.load(bundle)
        return self._state_at(self._uri(record), record.domain_uuid)

    def _state_at(self, uri: str, domain_uuid: str) -> str:
        with self._connection(uri) as conn:
            domain = _lookup(conn, domain_uuid)
            if domain is None:
                return "undefined"
            return STATES.get(domain.state()[0], "unknown")

    # -- live migration (issue 23)

    def outgoing(self, bundle: Bundle) -> Deferred[Outgoing]:
        """Source, before anything is sent: the domain's secret and disks."""
        return self._call(self._outgoing, bundle)

    def _outgoing(self, bundle: Bundle) -> Outgoing:
        record = DomainRecord.load(bundle)
        with self._connection(self._uri(record)) as conn:
            domain = self._domain(conn, record)
            if not domain.isActive():
                raise BundleError(f"domain {record.domain} does not run: nothing to migrate live")
            return Outgoing(
                record.domain, record.domain_uuid, record.secret_uuid, copied_disks(domain)
            )

    def migrate_out(
        self,
        bundle: Bundle,
        paths: SocketPaths,
        copy_storage: bool,
        parallel: int = 0,
        unchecked_shared: bool = False,
    ) -> Deferred[None]:
        """Source: libvirt's live migration of the domain to the destination
        whose libvirt, QEMU and NBD sockets are carried at ``paths`` (each
        must already be listened on here).  Returns when libvirt completed:
        the destination holds the domain paused, this host's QEMU ended, its
        definition and vTPM state kept (see :meth:`finish_out`).  If it
        fails, libvirt let the guest run on here.  ``parallel``: QEMU's
        multifd channels (each one more carried connection);
        ``unchecked_shared``: storage both hosts share that libvirt cannot
        recognise as shared (``VIR_MIGRATE_UNSAFE``)."""
        return self._call(
            self._migrate_out, bundle, paths, copy_storage, parallel, unchecked_shared
        )

    def _migrate_out(
        self,
        bundle: Bundle,
        paths: SocketPaths,
        copy_storage: bool,
        parallel: int,
        unchecked_shared: bool,
        downtime_ms: int = 0,
        bandwidth_mib: int = 0,
    ) -> None:
        libvirt = require_libvirt()
        record = DomainRecord.load(bundle)
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: "unix://" + paths.libvirt("memory")
        }
        if copy_storage:
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = "unix://" + paths.libvirt("disk")
        if parallel:
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = parallel
        if bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
        with self._connection(self._uri(record)) as conn:
            domain = self._domain(conn, record)
            if downtime_ms:
                # QEMU's downtime-limit of this domain (libvirt allows it
                # before the job; its migration keeps it).
                try:
                    domain.migrateSetMaxDowntime(downtime_ms, 0)
                except libvirt.libvirtError as e:
                    raise LibvirtError(
                        f"cannot set the downtime limit of domain {record.domain}: "
                        f"{e.get_error_message()}",
                        ErrorCode.LIVE_FAILED,
                    ) from None
            copied = bundle.path / COPIED_DISKS_FILE
            if copy_storage:
                # Before the copy starts: once this migration committed, the
                # copies left here go (_finish_out, or discard after a crash).
                _list_disks(copied, paths.local_dir.name, [d.path for d in copied_disks(domain)])
            else:
                # An earlier migration's list, which must never remove the
                # disks this one leaves where they are.
                files.remove_durably(copied)
            try:
                domain.migrateToURI3(
                    "qemu+unix:///system?socket=" + paths.libvirt("rpc"),
                    params,
                    _migration_flags(libvirt, copy_storage, parallel, unchecked_shared),
                )
            except libvirt.libvirtError as e:
                raise LibvirtError(
                    f"libvirt's migration of domain {record.domain} failed: "
                    f"{e.get_error_message()}",
                    ErrorCode.LIVE_FAILED,
                ) from None

    def finish_out(self, bundle: Bundle, tag: str) -> Deferred[None]:
        """Source, after migration ``tag`` (its id in hex) COMMITTED: the
        domain's definition and vTPM state (the rollback copy) undefined
        here, the disks it copied deleted here (the stale copies), the
        bundle with its sealed secret removed.  A domain that runs here
        again is left alone (it did not move)."""
        return self._call(self._finish_out, bundle, tag)

    def _finish_out(self, bundle: Bundle, tag: str) -> None:
        libvirt = require_libvirt()
        record = DomainRecord.load(bundle)
        with self._connection(self._uri(record)) as conn:
            domain = _lookup(conn, record.domain_uuid)
            if domain is not None:
                if domain.isActive():
                    raise LibvirtError(
                        f"domain {record.domain} runs here: it was not migrated, nothing removed"
                    )
                domain.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_TPM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                )
            _delete_volumes(conn, _listed_disks(bundle.path / COPIED_DISKS_FILE, tag))
        crashpoint.reached(CrashPoint.SOURCE_COPIES_REMOVED)
        files.remove_tree(bundle.path)

    # -- destination

    def prepare_in(
        self,
        outgoing: Outgoing,
        value: bytes,
        paths: SocketPaths,
        copy_storage: bool,
        staging: Path | None = None,
    ) -> Deferred[None]:
        """Destination, after attestation and key release: the socket
        directory, the disks to copy into (empty, same size and format) and
        the secret -- same UUID, the released value, ephemeral and private --
        which libvirt's Prepare needs to start swtpm.  The secret stays
        defined until :meth:`end_in` (the migration's end, whatever it was).
        The disks created are first listed in ``staging``'s
        :data:`CREATED_DISKS_FILE`, so that an arrival that does not commit
        removes them (:meth:`abort_in`)."""
        return self._call(self._prepare_in, outgoing, value, paths, copy_storage, staging)

    def _prepare_in(
        self,
        outgoing: Outgoing,
        value: bytes,
        paths: SocketPaths,
        copy_storage: bool,
        staging: Path | None = None,
    ) -> None:
        require_libvirt()
        paths.local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._connection(self.connect or default_uri()) as conn:
            if _lookup(conn, outgoing.domain_uuid) is not None:
                raise BundleError(f"domain {outgoing.domain} is defined here already")
            if copy_storage:
                check_disk_dirs(outgoing.disks, disk_dirs())
                check_disks_unused(outgoing.disks, disks_in_use(conn))
                # All checked before any is listed: the list is what an abort
                # deletes, so it never names a file that was there before.
                with _CREATING:
                    # One arrival at a time from the check to the last
                    # create: two arrivals naming one path cannot both pass.
                    check_disks_new(conn, outgoing.disks)
                    self._create_listed(conn, outgoing.disks, paths.local_dir.name, staging)
            if secret_defined(conn, outgoing.secret_uuid):
                conn.secretLookupByUUIDString(outgoing.secret_uuid).undefine()
            secret = conn.secretDefineXML(secret_xml(outgoing.secret_uuid, outgoing.domain))
            secret.setValue(value)

    @staticmethod
    def _create_listed(conn: Any, disks: tuple[Disk, ...], tag: str, staging: Path | None) -> None:
        """Create ``disks``, listed first in ``staging``'s
        :data:`CREATED_DISKS_FILE` (journaled before acted on); if one
        cannot be created, the list is cut back to those whose path was
        claimed (:func:`_create_volume`)."""
        listed = staging / CREATED_DISKS_FILE if staging is not None else None
        if listed is not None:
            _list_disks(listed, tag, [d.path for d in disks])
            crashpoint.reached(CrashPoint.DESTINATION_DISKS_LISTED)
        made: list[Disk] = []
        try:
            for disk in disks:
                _create_volume(conn, disk, partial(made.append, disk))
        except BaseException:
            if listed is not None:
                _list_disks(listed, tag, [d.path for d in made])
            raise

    def end_in(self, outgoing: Outgoing, paths: SocketPaths) -> Deferred[None]:
        """Destination, once libvirt's migration ended (swtpm holds the key,
        or it failed): the secret undefined, the socket directory removed."""
        return self._call(self._end_in, outgoing, paths)

    def _end_in(self, outgoing: Outgoing, paths: SocketPaths) -> None:
        with self._connection(self.connect or default_uri()) as conn:
            _undefine_secret(conn, outgoing.secret_uuid)
        files.remove_tree(paths.local_dir)

    def arrived_state(self, outgoing: Outgoing) -> Deferred[str]:
        """Destination: libvirt's state of the arriving domain here."""
        return self._call(self._arrived_state, outgoing)

    def _arrived_state(self, outgoing: Outgoing) -> str:
        return self._state_at(self.connect or default_uri(), outgoing.domain_uuid)

    def commit_in(self, vm_dir: Path, outgoing: Outgoing, sealed: bytes) -> Deferred[Bundle]:
        """Destination, at COMMIT: the bundle (the secret sealed to this
        host's TPM, ``sealed``) written durably, then the paused domain
        resumed."""
        return self._call(self._commit_in, vm_dir, outgoing, sealed)

    def _commit_in(self, vm_dir: Path, outgoing: Outgoing, sealed: bytes) -> Bundle:
        uri = self.connect or default_uri()
        record = DomainRecord(outgoing.domain, outgoing.domain_uuid, outgoing.secret_uuid, uri)
        if not (vm_dir / record.domain).exists():
            self._write_bundle(vm_dir, record, sealed, "running")
        bundle = Bundle.find(vm_dir, record.domain)
        self._resume(bundle)
        return bundle

    def abort_in(
        self, outgoing: Outgoing, paths: SocketPaths, staging: Path | None = None
    ) -> Deferred[None]:
        """Destination, before COMMIT: a domain libvirt left here (paused,
        half-defined) destroyed and undefined with its new vTPM state, then
        the disks this migration created (``staging``'s
        :data:`CREATED_DISKS_FILE`) deleted; the secret undefined."""
        return self._call(self._abort_in, outgoing, paths, staging)

    def _abort_in(
        self, outgoing: Outgoing, paths: SocketPaths, staging: Path | None = None
    ) -> None:
        libvirt = require_libvirt()
        with self._connection(self.connect or default_uri()) as conn:
            # libvirt may be failing its incoming migration meanwhile (the
            # cut stream): _remove_domain asks again as it drops the domain.
            _remove_domain(conn, outgoing.domain_uuid, libvirt.VIR_DOMAIN_UNDEFINE_TPM)
            if staging is not None:
                # No domain uses them now: a half-copied disk never stays.
                created = staging / CREATED_DISKS_FILE
                left = _delete_volumes(conn, _listed_disks(created))
                # Deleted: a redone abort must not delete what another
                # arrival may create at these paths from now on (one a
                # domain uses now stays listed: asked again next time).
                if left:
                    _list_disks(created, paths.local_dir.name, left)
                else:
                    files.remove_durably(created)
        self._end_in(outgoing, paths)

    # -- securemig migrate --live (the backend contract's carried live migration)

    def live_channels(self, backend_info: bytes) -> int:
        """Destination, at admission: the arriving domain's description
        checked (:meth:`Incoming.parse`), and the disks it would have this
        host create checked against :func:`disk_dirs`, before anything is
        held or released.  libvirt's multifd channels are carried sockets of
        its own: none counted here."""
        incoming = Incoming.parse(backend_info)
        if incoming.copy_storage:
            check_disk_dirs(incoming.outgoing.disks, disk_dirs())
        return 0

    def carried_connections(self, backend_info: bytes) -> int:
        """Destination: libvirt's RPC connection, QEMU's main channel and
        each multifd channel, and an NBD connection per disk copied."""
        incoming = Incoming.parse(backend_info)
        disks = len(incoming.outgoing.disks) if incoming.copy_storage else 0
        return 2 + incoming.parallel + disks

    def live_info(self, bundle: Bundle, copy_storage: bool, parallel: int) -> Deferred[bytes]:
        """Source: HELLO's ``backend_info`` (:class:`Incoming`)."""
        if not 0 <= parallel <= MAX_PARALLEL:
            raise BundleError(f"--parallel: 0 to {MAX_PARALLEL} channels")

        def info() -> bytes:
            return Incoming(self._outgoing(bundle), copy_storage, parallel).to_json()

        return self._call(info)

    def carried_sockets(self, tag: str, destination: bool) -> dict[str, str]:
        """The migration's sockets: at the source the paths securemig
        listens on (their directory made, private), at the destination what
        it dials (its libvirtd's socket for ``rpc``; the paths libvirt's
        QEMU and NBD server listen on for ``memory`` and ``disk``)."""
        paths = socket_paths(self.run_dir, tag)
        names = ("rpc", "memory", "disk")
        if destination:
            sockets = {name: str(paths.local(name)) for name in names}
            sockets["rpc"] = str(self.run_dir / "libvirt-sock")
            return sockets
        paths.local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return {name: str(paths.local(name)) for name in names}

    def live_source(
        self,
        bundle: Bundle,
        uri: str,
        downtime_limit_ms: int = 0,
        max_bandwidth: int = 0,
        copy_storage: bool = False,
        parallel: int = 0,
    ) -> Deferred[Any]:
        """Source: start libvirt's migration of the domain through the
        carried sockets of migration ``uri`` (its tag,
        :meth:`carried_sockets`); fires at once with its
        :class:`LibvirtOutgoing`.  A downtime limit other than the default
        is set on the domain (``migrateSetMaxDowntime``) before it starts
        (and stays with its QEMU), and a bandwidth below
        :data:`LIVE_MAX_BANDWIDTH` (``--bandwidth`` under 1024 MiB/s) is
        libvirt's for it, in whole MiB/s (:func:`migration_bandwidth`)."""
        unsafe = not copy_storage and os.environ.get(UNSAFE_SHARED_ENV) == "1"
        paths = socket_paths(self.run_dir, uri)
        done = self._call(
            self._migrate_out_stats,
            bundle,
            paths,
            copy_storage,
            parallel,
            unsafe,
            # The default leaves the domain's own (QEMU's 300 ms, or what an
            # operator set with virsh migrate-setmaxdowntime): the value set
            # stays with the domain's QEMU after the migration.
            0 if downtime_limit_ms == LIVE_DOWNTIME_LIMIT_MS else downtime_limit_ms,
            migration_bandwidth(max_bandwidth),
        )
        return succeed(LibvirtOutgoing(self, bundle, done, paths.local_dir.name))

    def _migrate_out_stats(
        self,
        bundle: Bundle,
        paths: SocketPaths,
        copy_storage: bool,
        parallel: int,
        unsafe: bool,
        downtime_ms: int = 0,
        bandwidth_mib: int = 0,
    ) -> LibvirtStats:
        libvirt = require_libvirt()
        self._migrate_out(bundle, paths, copy_storage, parallel, unsafe, downtime_ms, bandwidth_mib)
        record = DomainRecord.load(bundle)
        try:
            with self._connection(self._uri(record)) as conn:
                domain = self._domain(conn, record)
                return LibvirtStats.of(domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except (libvirt.libvirtError, BundleError):
            return LibvirtStats()  # the numbers are a report only

    def abort_job(self, bundle: Bundle) -> Deferred[None]:
        """Source, before the commit: abort libvirt's running migration job
        (on a thread of its own: the backend's is busy with the migration)."""

        def abort() -> None:
            libvirt = require_libvirt()
            record = DomainRecord.load(bundle)
            with self._connection(self._uri(record)) as conn:
                domain = _lookup(conn, record.domain_uuid)
                if domain is not None:
                    # No job is no error: it ended meanwhile.
                    with suppress(libvirt.libvirtError):
                        domain.abortJob()

        return deferToThread(abort)

    def live_destination(self, bundle: Bundle, tag: str = "") -> Deferred[Any]:
        """Destination, after attestation and key release: from the arrival's
        ``INCOMING_FILE`` (HELLO's ``backend_info``) the bundle's record, the
        disks to copy into and the secret with the released value
        (:meth:`prepare_in`); fires with the :class:`LibvirtIncoming` that
        waits for libvirt's migration."""
        return self._call(self._live_destination, bundle, tag)

    def _live_destination(self, bundle: Bundle, tag: str) -> LibvirtIncoming:
        incoming = Incoming.parse((bundle.path / INCOMING_FILE).read_bytes())
        outgoing = incoming.outgoing
        if outgoing.domain != bundle.name:
            raise BundleError(
                f"the arriving domain is {outgoing.domain}, but HELLO named VM {bundle.name}"
            )
        files.write_durably(
            bundle.path / INCOMING_FILE,
            json.dumps({"info": incoming.to_json().decode(), "tag": tag}).encode(),
        )
        record = DomainRecord(
            outgoing.domain,
            outgoing.domain_uuid,
            outgoing.secret_uuid,
            self.connect or default_uri(),
        )
        files.write_durably(bundle.path / DOMAIN_FILE, record.to_json())
        paths = socket_paths(self.run_dir, tag)
        self._prepare_in(outgoing, self._key(bundle), paths, incoming.copy_storage, bundle.path)
        return LibvirtIncoming(self, bundle, outgoing, paths)

    def incoming_state(self, outgoing: Outgoing) -> Deferred[tuple[int, int] | None]:
        """Destination: libvirt's (state, reason) of the arriving domain, or
        None while (or once) it has none."""
        return self._call(self._incoming_state, outgoing)

    def _incoming_state(self, outgoing: Outgoing) -> tuple[int, int] | None:
        libvirt = require_libvirt()
        with self._connection(self.connect or default_uri()) as conn:
            domain = _lookup(conn, outgoing.domain_uuid)
            if domain is None:
                return None
            try:
                state, reason = domain.state()
            except libvirt.libvirtError as e:
                # A failed incoming migration's transient domain, dropped by
                # libvirt between the lookup and the question: gone, not
                # "cannot tell" (which would hold a cut arrival in doubt).
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            return int(state), int(reason)

    def resume_domain(self, record_uri: str, domain_uuid: str) -> Deferred[None]:
        """Resume a paused domain (left running if it runs)."""

        def resume() -> None:
            libvirt = require_libvirt()
            with self._connection(record_uri) as conn:
                domain = _lookup(conn, domain_uuid)
                if domain is None or not domain.isActive():
                    raise LibvirtError("the domain does not run here: nothing to continue")
                if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    domain.resume()

        return self._call(resume)


def _read_incoming(bundle: Bundle) -> tuple[Incoming, str]:
    """An arrival's incoming file: what arrives, and the migration's tag."""
    try:
        data = (bundle.path / INCOMING_FILE).read_bytes()
        raw = json.loads(data)
        if "tag" not in raw:
            # As the arrival wrote it (HELLO's bytes), before live_destination
            # added the tag: a staging directory is named by the migration id.
            return Incoming.parse(data), bundle.path.name
        return Incoming.parse(raw["info"].encode()), str(raw["tag"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{bundle.path / INCOMING_FILE}: {e}") from None


class LibvirtOutgoing:
    """The source's side of one libvirt migration (a LiveSide): libvirt's
    ``migrateToURI3`` running on the backend's thread.

    libvirt has completed once its source saved the job's phase
    :data:`CONFIRMED_PHASE` in the domain's status file (seen through
    :class:`StatusWatch`): the destination's Finish succeeded, the domain
    waits there paused, and libvirt here only ends its QEMU (a libvirtd
    restarted meanwhile kills it too).  That end takes a second or more
    (QEMU's exit, polled by libvirt) before ``migrateToURI3`` returns; the
    commit need not wait for it, and the guest, paused at the destination
    until the commit, does not.  Before that phase (the Finish's answer
    lost, the carrier cut) libvirt cancels and runs the guest on here, so
    nothing else counts as completion.  The definition, vTPM state and
    sealed secret stay here until COMMITTED; :meth:`finish` waits for the
    call's return."""

    def __init__(
        self, backend: LibvirtBackend, bundle: Bundle, done: Deferred[Any], tag: str = ""
    ) -> None:
        self.backend = backend
        self.bundle = bundle
        #: The migration's tag (its id in hex): the copies its finish removes.
        self.tag = tag
        #: ``time.monotonic()`` when libvirt's migration was asked for (the
        #: contract's ``LiveSide.started``: the guest's downtime is bounded
        #: from it, as for QEMU's own).
        self.started: float | None = time.monotonic()
        #: libvirt's numbers, filled when its call returns.
        self.stats = LibvirtStats()
        self.error: BaseException | None = None
        #: libvirt's call returned (with :attr:`stats` or :attr:`error`).
        self.ended = False
        #: libvirt's source saved the confirmed phase: the migration completed.
        self.decided = False
        self._status = backend.run_dir / STATUS_DIR / f"{bundle.name}.xml"
        self._waker = Waker(backend.reactor)
        self._watch = StatusWatch(
            backend.reactor, self._status.parent, bundle.name, self._waker.wake
        )

        def ok(stats: LibvirtStats) -> None:
            self.stats.fill(stats)
            self._ended()

        def failed(f: Any) -> None:
            self.error = f.value
            self._ended()

        done.addCallbacks(ok, failed)

    def _ended(self) -> None:
        self.ended = True
        self._watch.close()
        self._waker.wake()

    def _confirmed(self) -> bool:
        """Whether libvirt's source saved the confirmed phase (read from its
        status file: a small file in its runtime directory, no libvirt call)."""
        if not self.decided and not self.ended:
            try:
                self.decided = confirmed_out(self._status.read_bytes())
            except OSError:
                return False
            if self.decided:
                log.info("domain {d}: libvirt's source confirmed the migration", d=self.bundle.name)
        return self.decided

    async def wait(self, timeout: float = INCOMING_TIMEOUT) -> LibvirtStats:
        """Until libvirt's migration completed (the confirmed phase) or its
        call returned; its numbers (filled in place once the call returns),
        or its error."""
        deadline = time.monotonic() + timeout
        while not self.ended and not self._confirmed():
            if time.monotonic() > deadline:
                raise LibvirtError(
                    f"libvirt's migration of domain {self.bundle.name} did not complete in time",
                    ErrorCode.LIVE_FAILED,
                )
            await self._waker.sleep(self._watch.interval)
        if self.decided:
            return self.stats
        if self.error is not None:
            if isinstance(self.error, LibvirtError):
                raise self.error
            raise LibvirtError(str(self.error), ErrorCode.LIVE_FAILED)
        return self.stats

    async def returned(self, timeout: float = INCOMING_TIMEOUT) -> None:
        """Until libvirt's call returned (its QEMU here ended, or the
        migration failed), whatever it returned."""
        deadline = time.monotonic() + timeout
        while not self.ended:
            if time.monotonic() > deadline:
                raise LibvirtError(
                    f"libvirt's migration call for domain {self.bundle.name} did not return "
                    "in time",
                    ErrorCode.LIVE_FAILED,
                )
            await self._waker.sleep(STATUS_FALLBACK)

    async def cont(self) -> None:
        """Let the guest run here (paused by libvirt after a failure)."""
        record = DomainRecord.load(self.bundle)
        await self.backend.resume_domain(self.backend._uri(record), record.domain_uuid)

    @property
    def completed(self) -> bool:
        """libvirt's migration completed (the confirmed phase, or its call
        returned success): the destination holds the guest (paused) and
        this QEMU ends, or has ended."""
        return self.decided or (self.ended and self.error is None)

    async def cancel(self) -> None:
        """Before the commit: abort libvirt's job if it still runs; the guest
        goes on here.  A migration libvirt completed meanwhile cannot be
        cancelled (this QEMU ends): :attr:`completed` says so, and
        nothing is continued here."""
        if not self.ended and not self._confirmed():
            await self.backend.abort_job(self.bundle)
        # Cancelled, or failed: either way the guest is (still) here.
        with suppress(LibvirtError):
            await self.wait(timeout=120.0)
        if not self.completed:
            await self.cont()

    def abandon(self) -> Deferred[None]:
        """Nothing at the source."""
        return succeed(None)

    async def finish(self) -> None:
        """After the commit: once libvirt's call returned (its QEMU here
        ended; :attr:`stats` filled), the definition and vTPM state removed
        here.  A libvirt that cannot be asked then (its libvirtd died after
        it confirmed) fails it: the release leaves the removal to this
        host's daemon (``departure.release``)."""
        await self.returned()
        await self.backend.finish_out(self.bundle, self.tag)

    def release(self) -> None:
        """Nothing held (each call opens its own connection)."""


class LibvirtIncoming:
    """The destination's side of one libvirt migration (a LiveSide): the
    domain libvirt makes here from the source's stream, paused until the
    commit (``VIR_MIGRATE_PAUSED``)."""

    def __init__(
        self, backend: LibvirtBackend, bundle: Bundle, outgoing: Outgoing, paths: SocketPaths
    ) -> None:
        self.backend = backend
        self.bundle = bundle
        self.outgoing = outgoing
        self.paths = paths
        #: The pid file libvirt keeps of the domain's QEMU here (crash points).
        self.pidfile = backend.run_dir / STATUS_DIR / f"{outgoing.domain}.pid"
        #: libvirt's status of the domain here (its state, saved at each step).
        self.statusfile = self.pidfile.with_suffix(".xml")

    async def wait(self, timeout: float = INCOMING_TIMEOUT) -> None:
        """Until libvirt's migration finished here (the domain paused by
        request, not paused arriving); then the secret's undefinition is
        queued on the backend's thread (swtpm holds it).  LibvirtError if
        the domain, once seen, is gone (libvirt failed the migration and
        removed it).  libvirt's state is asked
        whenever libvirt rewrites the domain's status file (its Finish
        does; :class:`StatusWatch`), not on a timer: the guest waits paused
        from the Finish until the commit, and this is the first step of
        that wait."""
        waker = Waker(self.backend.reactor)
        watch = StatusWatch(
            self.backend.reactor, self.pidfile.parent, self.outgoing.domain, waker.wake
        )
        try:
            await self._arrived(waker, watch, timeout)
        finally:
            watch.close()
        # The secret goes on the backend's thread, before any later call of
        # this arrival there (its commit's), but PREPARED need not wait for
        # it: a crash before it is done leaves it to recovery (``arrived``).
        self.backend.end_in(self.outgoing, self.paths).addErrback(
            lambda f: log.warn(
                "domain {d}: undefining its secret here: {e}",
                d=self.outgoing.domain,
                e=f.getErrorMessage(),
            )
        )

    def _arrived_in_status(self) -> bool:
        """Whether libvirt's status file says the domain arrived
        (:func:`arrived_paused`; no file: no)."""
        try:
            data = self.statusfile.read_bytes()
        except OSError:
            return False
        return arrived_paused(data, self.outgoing.domain_uuid)

    async def _arrived(self, waker: Waker, watch: StatusWatch, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen = False
        while True:
            # libvirt's status file first: once it says the domain arrived,
            # libvirtd is not asked (each question is a connection of its
            # own).  Until then libvirtd is, as its status changes: a
            # libvirtd that died or a domain it removed (a failed migration)
            # must end the wait, and a file left by a dead libvirtd would
            # not tell.  (libvirt's Finish changes the state before it saves
            # the file: the question after the save before often sees the
            # arrival first; the file answers when it came too early.)
            if self._arrived_in_status():
                log.info(
                    "domain {d}: arrived here, paused (libvirt's status file)",
                    d=self.outgoing.domain,
                )
                return
            state = await self.backend.incoming_state(self.outgoing)
            if state is None and seen:
                raise LibvirtError(
                    f"libvirt's incoming migration of domain {self.outgoing.domain} failed "
                    "(the domain is gone here)",
                    ErrorCode.LIVE_FAILED,
                )
            if state is not None:
                seen = True
                if state == (3, PAUSED_USER):
                    return
                if state[0] != 3:
                    raise LibvirtError(
                        f"the arriving domain {self.outgoing.domain} is "
                        f"{STATES.get(state[0], 'unknown')}, not paused",
                        ErrorCode.LIVE_FAILED,
                    )
            if time.monotonic() > deadline:
                raise LibvirtError(
                    f"domain {self.outgoing.domain} did not arrive in time", ErrorCode.LIVE_FAILED
                )
            await waker.sleep(watch.interval)

    async def waits_loaded(self) -> bool:
        """Whether the arrived domain is still here, paused (never run).

        Asked on the switchover path (the guest waits paused for it), so
        its QEMU's pid file answers first, on the reactor thread: a QEMU
        that ended (or is a zombie) is the loss the commit must see; one
        that runs is the domain libvirt left paused (``VIR_MIGRATE_PAUSED``:
        only the commit resumes it).  libvirt is asked only where the pid
        file does not tell."""
        alive = files.pid_file_alive(self.pidfile)
        if alive is not None:
            return alive
        state = await self.backend.incoming_state(self.outgoing)
        return state is not None and state[0] == 3

    async def alive_moved(self, bundle: Bundle) -> bool:
        """The pid file libvirt keeps of the domain's QEMU answers: the move
        into place was the bundle's, not libvirt's (:meth:`waits_loaded`)."""
        return await self.waits_loaded()

    async def continue_moved(self, bundle: Bundle) -> bool:
        """No connection is held here (each libvirt call opens its own):
        the VM is resumed as :meth:`LibvirtBackend.resume` does."""
        return False

    async def cont(self) -> None:
        """Let the guest run here."""
        await self.backend.resume_domain(
            self.backend.connect or default_uri(), self.outgoing.domain_uuid
        )

    async def cancel(self) -> None:
        """Nothing to cancel at the destination (the source's job is)."""

    def abandon(self) -> Deferred[None]:
        """Before the commit: the domain libvirt made here goes, with the
        disks this migration created (:meth:`abort_in`)."""
        return self.backend.abort_in(self.outgoing, self.paths, self.bundle.path)

    async def finish(self) -> None:
        """Nothing at the destination."""

    def release(self) -> None:
        """Nothing held (each call opens its own connection)."""
