"""
VM bundles: a directory holding a VM's manifest and its image files.

A bundle is ``DIR/NAME/`` with ``manifest.json`` and one ``IMAGE.img`` per
image (``ram``, and ``disk`` unless the disk lives on shared storage).  The
source migrates bundles out of a ``--vm-dir``; the destination stores arriving
VMs in the same layout under ``STATE_DIR/vms/``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from securemig import files
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode, LocalFault
from securemig.trust import vtpm as vtpm_module

MANIFEST = "manifest.json"
LOCK = ".lock"
#: The VM's vTPM key, sealed to this host's TPM (secure variant only).
VTPM_KEY = "vtpm-key.sealed"
#: The image that carries a VM's vTPM state (swtpm's, still encrypted).
VTPM_IMAGE = "vtpm"
FORMAT = 1


class BundleError(LocalFault):
    """A bundle is missing, malformed or unsuitable for what was asked."""

    default_code = ErrorCode.IO_ERROR


def image_file(name: str) -> str:
    """Where image ``name`` lives inside a bundle (derived from the name alone,
    so a peer never chooses a path): ``NAME.img``, except the vTPM's state,
    which is swtpm's state file in ``vtpm/``."""
    if name == VTPM_IMAGE:
        return "vtpm/tpm2-00.permall"
    return f"{name}.img"


@dataclass
class Image:
    """One image file of a bundle."""

    name: str
    size: int

    @property
    def file(self) -> str:
        """Its path inside the bundle."""
        return image_file(self.name)


@dataclass
class Manifest:
    """What a bundle holds; stored as ``manifest.json``."""

    name: str
    backend: str = "image"
    images: list[Image] = field(default_factory=list)
    #: Absolute path of the disk image when it lives on shared storage.
    shared_disk: str | None = None
    #: SHA-256 of the vTPM's EK public area: the vTPM's identity (if it has one).
    vtpm: str | None = None
    #: Guest memory for hypervisor backends (QEMU), in MiB.
    memory_mib: int | None = None
    #: QEMU: ``firmware`` (no OS; a marker in RAM) or ``linux`` (the built
    #: Linux guest, :mod:`securemig.hypervisor.guest`) and its kernel command line.
    guest: str = "firmware"
    guest_cmdline: str = ""
    state: str = "suspended"
    format: int = FORMAT

    def to_json(self) -> bytes:
        """The manifest as stored."""
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse a stored manifest, refusing unknown formats and bad names."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != FORMAT:
                raise BundleError(f"manifest format {data.get('format')!r}, expected {FORMAT}")
            if not isinstance(data.get("images"), list):
                raise ValueError("'images' is not a list")
            data["images"] = [Image(**image) for image in data["images"]]
            manifest = cls(**data)
        except (ValueError, TypeError, KeyError) as e:
            raise BundleError(f"malformed manifest: {e}") from None
        if not isinstance(manifest.name, str):
            raise BundleError(f"malformed manifest: name {manifest.name!r} is not a string")
        check_vm_name(manifest.name)
        for image in manifest.images:
            if not isinstance(image.name, str) or not wire.IMAGE_NAME_RE.fullmatch(image.name):
                raise BundleError(f"bad image name {image.name!r} in manifest")
            if not isinstance(image.size, int) or isinstance(image.size, bool) or image.size < 0:
                raise BundleError(f"bad size {image.size!r} of image {image.name} in manifest")
        for key in ("backend", "state", "guest", "guest_cmdline"):
            if not isinstance(getattr(manifest, key), str):
                raise BundleError(f"malformed manifest: {key} is not a string")
        return manifest


def check_vm_name(name: str) -> None:
    """Refuse VM names that are not also safe directory names."""
    if not wire.VM_NAME_RE.fullmatch(name):
        raise BundleError(
            f"bad VM name {name!r}: use letters, digits, '.', '_' and '-', at most 64, "
            "starting with a letter or digit"
        )


class Bundle:
    """A VM bundle on disk."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.manifest.name

    @classmethod
    def load(cls, path: Path) -> Bundle:
        """Open the bundle at ``path``."""
        try:
            raw = (path / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise BundleError(f"no VM bundle at {path} (no {MANIFEST})") from None
        return cls(path, Manifest.from_json(raw))

    @classmethod
    def find(cls, vm_dir: Path, name: str) -> Bundle:
        """Open the bundle of VM ``name`` in ``vm_dir``."""
        check_vm_name(name)
        bundle = cls.load(vm_dir / name)
        if bundle.name != name:
            raise BundleError(f"{vm_dir / name} holds VM {bundle.name!r}, not {name!r}")
        return bundle

    def image_path(self, image: Image | str) -> Path:
        """Where an image's bytes are."""
        name = image if isinstance(image, str) else image.name
        return self.path / image_file(name)

    @property
    def vtpm_key_path(self) -> Path:
        """Where the sealed vTPM key lives."""
        return self.path / VTPM_KEY

    @property
    def lock_path(self) -> Path:
        """The lock a migration of this VM holds."""
        return self.path / LOCK

    def save(self) -> None:
        """Write the manifest durably."""
        files.write_durably(self.path / MANIFEST, self.manifest.to_json())

    def streamed_images(self, variant: wire.Variant) -> list[Image]:
        """The images a migration of this variant sends, or a clear refusal."""
        if variant is wire.Variant.SHARED_STORAGE:
            if any(image.name == "disk" for image in self.manifest.images):
                raise BundleError(
                    f"VM {self.name} keeps its disk in the bundle, not on shared storage; "
                    "migrate it without --shared-storage"
                )
        elif self.manifest.shared_disk is not None:
            raise BundleError(
                f"VM {self.name} has its disk on shared storage ({self.manifest.shared_disk}); "
                "migrate it with --shared-storage"
            )
        return list(self.manifest.images)

    def check_images(self) -> None:
        """Every image file exists with the size the manifest says."""
        for image in self.manifest.images:
            path = self.image_path(image)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise BundleError(f"image {path} is missing") from None
            if size != image.size:
                raise BundleError(f"image {path} has {size} bytes; manifest says {image.size}")


def _fill_random(path: Path, size: int) -> None:
    # Test data, not secrets: a fast seeded generator instead of os.urandom.
    rng = random.Random(os.urandom(16))
    step = 1 << 20
    with open(path, "wb") as f:
        for offset in range(0, size, step):
            f.write(rng.randbytes(min(step, size - offset)))
        f.flush()
        os.fsync(f.fileno())


def create_image_vm(
    vm_dir: Path,
    name: str,
    ram_mib: int,
    disk_mib: int | None = None,
    shared_disk: Path | None = None,
    sealed_vtpm_key: bytes | None = None,
    vtpm: tuple[bytes, Path] | None = None,
    owner: str | None = None,
    backend: str = "image",
    guest: str = "firmware",
    guest_cmdline: str = "",
    guest_vm: bool | None = None,
) -> Bundle:
    """Create a suspended VM of backend ``backend`` with random contents.

    With ``shared_disk`` the disk image is created there (it must not exist)
    and only recorded in the manifest.  With ``vtpm`` = (key, vendor CA
    directory) the VM gets a vTPM encrypted with that key, and
    ``sealed_vtpm_key`` is the key as sealed to this host's TPM.  ``owner``
    (a host name) is recorded as the owner of a shared disk.  A QEMU VM's
    ``guest`` is ``firmware`` (a random marker in RAM) or ``linux`` (booted
    with ``guest_cmdline``).  ``guest_vm``: the backend runs guests, so a
    stopped guest of ``ram_mib`` MiB is created (booted later by its
    backend); by default for ``qemu`` only: callers that know the registry
    (:func:`securemig.hypervisor.backends.create_vm`) say it.
    """
    check_vm_name(name)
    if ram_mib <= 0:
        raise BundleError("--ram-mib must be positive")
    path = vm_dir / name
    if path.exists():
        raise BundleError(f"{path} already exists")
    vm_dir.mkdir(parents=True, exist_ok=True)
    staging = vm_dir / f".{name}.creating"
    files.remove_tree(staging)
    staging.mkdir()
    if guest_vm is None:
        guest_vm = backend == "qemu"
    manifest = Manifest(name=name, backend=backend, images=[Image("ram", ram_mib << 20)])
    if guest_vm:
        # A guest starts from firmware (`securemig vm start`); its RAM image
        # is written when it is suspended.  A random marker placed in guest
        # RAM shows that state moved.
        manifest = Manifest(
            name=name,
            backend=backend,
            images=[Image("ram", 0)],
            memory_mib=ram_mib,
            state="stopped",
            guest=guest,
            guest_cmdline=guest_cmdline,
        )
    if guest not in ("firmware", "linux") or (guest == "linux" and not guest_vm):
        raise BundleError(f"guest {guest!r}: a VM that runs a guest is firmware or linux")
    if shared_disk is not None:
        shared_disk = shared_disk.absolute()
        if shared_disk.exists():
            raise BundleError(f"shared disk {shared_disk} already exists")
        _fill_random(shared_disk, (disk_mib or 64) << 20)
        manifest.shared_disk = str(shared_disk)
        if owner is not None:
            set_disk_owner(shared_disk, owner)
    elif disk_mib:
        manifest.images.append(Image("disk", disk_mib << 20))
    bundle = Bundle(staging, manifest)
    for image in manifest.images:
        _fill_random(bundle.image_path(image), image.size)
    if guest_vm and guest == "firmware":
        _fill_random(staging / "marker.bin", 4096)
    if sealed_vtpm_key is not None:
        files.write_durably(bundle.vtpm_key_path, sealed_vtpm_key, mode=0o600)
    if vtpm is not None:
        manifest.vtpm = vtpm_module.create(staging, *vtpm)
        manifest.images.append(Image("vtpm", bundle.image_path("vtpm").stat().st_size))
    bundle.save()
    files.rename_durably(staging, path)
    return Bundle(path, manifest)


# Shared storage: which host may run the VM on a shared disk.


def disk_owner_path(disk: Path) -> Path:
    """The record, beside a disk on shared storage, of which host owns it."""
    return disk.with_name(disk.name + ".securemig-owner")


def disk_owner(disk: Path) -> str | None:
    """The host that owns a shared disk (may run its VM), if recorded."""
    try:
        return str(json.loads(disk_owner_path(disk).read_bytes())["host"])
    except FileNotFoundError:
        return None


def set_disk_owner(disk: Path, host: str, migration_id: str | None = None) -> None:
    """Hand a shared disk to ``host``, durably (the secure shared-storage
    variant does this at the source's commit point).  Every host mounts the
    same record, so exactly one host at a time may resume the VM on it."""
    record = {"host": host, "migration_id": migration_id}
    files.write_durably(disk_owner_path(disk), json.dumps(record).encode())
