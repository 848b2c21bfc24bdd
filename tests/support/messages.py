"""Protocol messages for the sans-IO session and connection tests."""

from __future__ import annotations

from typing import Any

from securemig.protocol import wire


def make_hello(sizes: tuple[int, ...] = (5, 3), **kw: Any) -> wire.Hello:
    names = ["ram", "disk", "extra"]
    args: dict[str, Any] = dict(
        version=wire.PROTOCOL_VERSION,
        variant=wire.Variant.FULL,
        vm_name="vm1",
        chunk_size=wire.MIN_CHUNK_SIZE,
        images=tuple(wire.ImageInfo(names[i], n) for i, n in enumerate(sizes)),
        shared_disk="",
    )
    args.update(kw)
    return wire.Hello(**args)


EVIDENCE = wire.Evidence(b"attest", b"sig", (), b"ak", b"cert")


OFFER = wire.KeyOffer(b"public", b"attest", b"sig")


WRAPPED = wire.WrappedKey(b"\x04" + b"e" * 64, b"n" * 12, b"ciphertext")
