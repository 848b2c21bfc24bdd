"""Wire compatibility with the previous release (commit 1106b0d): the bytes
it sends for each message are what this release sends for the same message,
and this release reads them back to the same message.

The expected bytes were produced by running that release's own
``securemig.protocol.wire.encode`` (``scripts/check-compat.py wire``; see
``doc/protocol.rst``, "Checking compatibility"): a change to an encoding
that an older peer reads differently fails here, not in the field.  Whole
migrations between the two releases are run by that script (minutes)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode

MIGRATION_ID = bytes(range(16))

#: ``wire.encode(message).hex()`` as the previous release computes it.
PREVIOUS_RELEASE = {
    "hello_v1": (
        "010000002e0001010003766d310010000002000372616d000000000000000a00046469736b0000000040000000000000000040"
    ),
    "hello_v2_image": (
        "010000003b0002010003766d310010000002000372616d000000000000000a00046469736b000000004000000000000000000000000000010005696d61676501"
    ),
    "hello_v2_qemu_linux": (
        "01000000520002010003766d310010000002000372616d000000000000000a00046469736b00000000400000000000000000a000056c696e75780013636f6e736f6c653d747479533020717569657401000471656d7501"
    ),
    "hello_v2_live_shared": (
        "01000000350002020003766d310010000000000c2f7372762f766d312e696d67000000a000056c696e75780005717569657402000471656d7501"
    ),
    "welcome": ("0200000012000102030405060708090a0b0c0d0e0f1092"),
    "live_ready": ("5000000002141f"),
    "prepared": ("3000000000"),
    "commit": ("3100000000"),
    "done": ("3200000000"),
    "abort": ("3f000000230016001f612071656d7520564d3b207468697320686f73742072756e7320696d616765"),
    "resolve": ("4000000011000102030405060708090a0b0c0d0e0f01"),
    "resolved": ("410000001a000102030405060708090a0b0c0d0e0f010007726573756d6564"),
}


def _hello(**kw: object) -> wire.Hello:
    args: dict[str, object] = dict(
        version=1,
        variant=wire.Variant.FULL,
        vm_name="vm1",
        chunk_size=1 << 20,
        images=(wire.ImageInfo("ram", 10), wire.ImageInfo("disk", 1 << 30)),
        shared_disk="",
    )
    args.update(kw)
    return wire.Hello(**args)  # type: ignore[arg-type]


#: The same messages built with this release's classes.
MESSAGES: dict[str, wire.Message] = {
    "hello_v1": _hello(memory_mib=64),
    "hello_v2_image": _hello(version=2, backend="image", vtpm=1),
    "hello_v2_qemu_linux": _hello(
        version=2,
        memory_mib=160,
        guest="linux",
        guest_cmdline="console=ttyS0 quiet",
        backend="qemu",
        vtpm=1,
    ),
    "hello_v2_live_shared": _hello(
        version=2,
        variant=wire.Variant.SHARED_STORAGE,
        images=(),
        shared_disk="/srv/vm1.img",
        memory_mib=160,
        guest="linux",
        guest_cmdline="quiet",
        mode=wire.Mode.LIVE,
        backend="qemu",
        vtpm=1,
    ),
    "welcome": wire.Welcome(MIGRATION_ID, 4242),
    "live_ready": wire.LiveReady(5151),
    "prepared": wire.Prepared(),
    "commit": wire.Commit(),
    "done": wire.Done(),
    "abort": wire.Abort(ErrorCode.BACKEND_MISMATCH, "a qemu VM; this host runs image"),
    "resolve": wire.Resolve(MIGRATION_ID, wire.Decision.COMMITTED),
    "resolved": wire.Resolved(MIGRATION_ID, wire.Settled.DONE, "resumed"),
}


class PreviousReleaseTests(SynchronousTestCase):
    """What an older peer sends and reads, byte for byte."""

    def test_same_messages_are_the_same_bytes(self) -> None:
        """Each message this release sends to an older peer (no
        ``backend_info``: every backend but a libvirt live migration) is
        the previous release's encoding of it."""
        self.assertEqual(sorted(MESSAGES), sorted(PREVIOUS_RELEASE))
        for name, message in MESSAGES.items():
            self.assertEqual(wire.encode(message).hex(), PREVIOUS_RELEASE[name], name)

    def test_previous_release_bytes_decode_to_the_same_messages(self) -> None:
        """What an older source or destination sends is read by this one as
        the same message (``backend_info`` absent: its default)."""
        for name, hexed in PREVIOUS_RELEASE.items():
            raw = bytes.fromhex(hexed)
            message = wire.decode_payload(raw[0], raw[wire.HEADER.size :])
            self.assertEqual(message, MESSAGES[name], name)
            if isinstance(message, wire.Hello):
                self.assertEqual(message.backend_info, b"", name)
