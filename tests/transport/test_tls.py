"""Mutual TLS 1.3 and the channel binding, over real loopback sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import TLSVersion, optionsForClientTLS
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from securemig import files
from securemig.transport import tls
from securemig.trust.identity import issue_tls
from securemig.trust.pki import Authority


def identity(base: Path, ca: Authority, name: str) -> Path:
    """An identity directory with a TLS certificate for ``name`` from ``ca``."""
    directory = base / name
    directory.mkdir(parents=True)
    issue_tls(ca, name, directory)
    files.write_durably(directory / "site-ca.pem", ca.cert.public_bytes(serialization.Encoding.PEM))
    return directory


@implementer(IHandshakeListener)
class Probe(Protocol):
    """Records the outcome of the handshake on one side."""

    def __init__(self) -> None:
        self.done: defer.Deferred[dict[str, Any]] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        result = {
            "binding": tls.channel_binding(self.transport),
            "peer": tls.peer_names(self.transport),
            "version": handle.get_protocol_version_name(),
            "cipher": handle.get_cipher_name(),
        }
        if not self.done.called:
            self.done.callback(result)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(reason)


class MutualTLSTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.ca = Authority.create("site")
        self.source = identity(self.base, self.ca, "source-a")
        self.destination = identity(self.base, self.ca, "dest-b")
        self.server_probe: Probe | None = None

    async def connect(
        self, client_options: Any, cipher: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        server_done: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def build() -> Probe:
            probe = Probe()
            probe.done.chainDeferred(server_done)
            return probe

        endpoint = SSL4ServerEndpoint(
            reactor, 0, tls.server_options(self.destination, cipher), interface="127.0.0.1"
        )
        port = await endpoint.listen(Factory.forProtocol(build))
        self.addCleanup(port.stopListening)
        client = Probe()
        await connectProtocol(
            SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, client_options),
            client,
        )
        results = await defer.DeferredList([client.done, server_done], consumeErrors=True)
        for ok, value in results:
            if not ok:
                raise value.value  # type: ignore[union-attr]
        return results[0][1], results[1][1]  # type: ignore[return-value]

    async def test_mutual_tls_13_and_binding(self) -> None:
        """Both sides authenticate, speak TLS 1.3, and derive one binding."""
        client, server = await self.connect(tls.client_options(self.source, "dest-b"))
        self.assertEqual(client["binding"], server["binding"])
        self.assertEqual(len(client["binding"]), 32)
        self.assertEqual((client["version"], server["version"]), ("TLSv1.3", "TLSv1.3"))
        self.assertEqual(server["peer"], ["source-a"])
        self.assertEqual(client["peer"], ["dest-b"])

    async def test_cipher_chosen_by_destination(self) -> None:
        """A destination restricted to one TLS 1.3 suite gets that suite."""
        for short, suite in tls.CIPHERS.items():
            client, server = await self.connect(tls.client_options(self.source, "dest-b"), short)
            self.assertEqual((client["cipher"], server["cipher"]), (suite, suite))

    async def test_bindings_differ_between_sessions(self) -> None:
        """A second session has another binding, so a quote cannot be replayed."""
        first, _ = await self.connect(tls.client_options(self.source, "dest-b"))
        second, _ = await self.connect(tls.client_options(self.source, "dest-b"))
        self.assertNotEqual(first["binding"], second["binding"])

    async def test_no_client_certificate(self) -> None:
        ca = tls._load(self.source)[1]
        options = optionsForClientTLS("dest-b", trustRoot=ca)
        await self.assertRefused(self.connect(options), "peer did not return a certificate")

    async def test_client_certificate_from_another_ca(self) -> None:
        rogue = identity(self.base / "rogue", Authority.create("rogue"), "source-a")
        (rogue / "site-ca.pem").write_bytes((self.source / "site-ca.pem").read_bytes())
        await self.assertRefused(
            self.connect(tls.client_options(rogue, "dest-b")), "certificate verify failed"
        )

    async def test_wrong_destination_name(self) -> None:
        """The destination's certificate must name the host the source asked for."""
        await self.assertRefused(
            self.connect(tls.client_options(self.source, "other-host")), "other-host"
        )

    async def test_tls_12_refused(self) -> None:
        own, ca = tls._load(self.source)
        options = optionsForClientTLS(
            "dest-b",
            trustRoot=ca,
            clientCertificate=own,
            extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2},
        )
        await self.assertRefused(self.connect(options), "version")

    async def assertRefused(self, coroutine: Any, expected: str) -> None:
        """The handshake fails, for the reason ``expected`` names."""
        try:
            await coroutine
        except Exception as e:
            self.assertIn(expected, repr(e))
        else:
            self.fail("the connection was not refused")
