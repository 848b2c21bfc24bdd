"""The data channel's Twisted ends over in-memory transports."""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from securemig.protocol.errors import ErrorCode, ProtocolError
from securemig.transport.source import DataChannelSender


class FakeControl:
    """Test double of the source's control protocol: what the data channel
    sender tells it."""

    def __init__(self) -> None:
        self.failures: list[ProtocolError] = []
        self.session = self

    def fail(self, error: ProtocolError) -> None:
        self.failures.append(error)

    finished = False


class DataChannelSenderTests(SynchronousTestCase):
    def test_destination_sending_on_data_channel_fails_source(self) -> None:
        """The data channel is one-way: bytes from the destination end the
        source's migration."""
        control = FakeControl()
        sender = DataChannelSender(control)  # type: ignore[arg-type]
        sender.makeConnection(StringTransport())
        sender.dataReceived(b"x")
        self.assertEqual([e.code for e in control.failures], [ErrorCode.UNEXPECTED_MESSAGE])
