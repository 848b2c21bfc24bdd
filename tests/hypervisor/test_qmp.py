"""The Twisted QMP client fed exactly what QEMU (or a broken QEMU) sends:
error replies carry QEMU's error class, a lost connection interrupts,
events are kept in a bounded backlog, and malformed or over-long lines
close the connection as a protocol error instead of raising out of
``lineReceived``.  The protocol is the part under test; its transport is
Twisted's string transport."""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from securemig.hypervisor import qmp


def line(message: Any) -> bytes:
    return json.dumps(message).encode() + b"\n"


class QMPProtocolTests(TestCase):
    def setUp(self) -> None:
        self.protocol = qmp.QMPProtocol(backlog=3)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(line({"QMP": {"version": {}, "capabilities": []}}))
        self.assertTrue(self.protocol.greeted.called)

    def sent(self) -> list[dict[str, Any]]:
        out = [json.loads(x) for x in self.transport.value().splitlines()]
        self.transport.clear()
        return out

    def lose(self) -> None:
        self.transport.disconnecting = True
        self.protocol.connectionLost(Failure(ConnectionLost()))

    def test_reply(self) -> None:
        d = self.protocol.execute("query-status")
        (request,) = self.sent()
        self.assertEqual(request["execute"], "query-status")
        self.protocol.dataReceived(line({"return": {"status": "running"}, "id": request["id"]}))
        self.assertEqual(self.successResultOf(d), {"status": "running"})

    def test_error_reply_carries_the_error_class(self) -> None:
        d = self.protocol.execute("cont")
        (request,) = self.sent()
        self.protocol.dataReceived(
            line({"error": {"class": "DeviceNotFound", "desc": "no such"}, "id": request["id"]})
        )
        error = self.failureResultOf(d, qmp.ExecuteError).value
        self.assertEqual(error.error_class, "DeviceNotFound")
        self.assertEqual(error.description, "no such")
        self.assertEqual(error.command, "cont")
        self.assertNotIsInstance(error, qmp.Interrupted)

    def test_connection_lost_interrupts(self) -> None:
        d = self.protocol.execute("query-migrate")
        self.lose()
        error = self.failureResultOf(d, qmp.Interrupted).value
        self.assertNotIsInstance(error, qmp.ExecuteError)
        self.assertIn("query-migrate", str(error))
        # Nobody will answer a command sent after the end.
        self.failureResultOf(self.protocol.execute("cont"), qmp.Interrupted)

    def test_unknown_ids_are_ignored(self) -> None:
        d = self.protocol.execute("query-status")
        (request,) = self.sent()
        self.protocol.dataReceived(line({"return": {}, "id": "not-ours"}))
        self.protocol.dataReceived(line({"return": {}}))
        self.protocol.dataReceived(line({"return": {}, "id": 7}))
        self.assertNoResult(d)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(line({"return": 1, "id": request["id"]}))
        self.assertEqual(self.successResultOf(d), 1)
        # A second reply to the same id is one nobody waits for.
        self.protocol.dataReceived(line({"return": 2, "id": request["id"]}))
        self.assertFalse(self.transport.disconnecting)

    def test_event_backlog_is_bounded(self) -> None:
        for n in range(5):
            self.protocol.dataReceived(line({"event": "E", "data": {"n": n}}))
        self.assertEqual([e["data"]["n"] for e in self.protocol.events], [2, 3, 4])
        self.assertEqual(self.protocol.dropped, 2)
        # The oldest kept one is claimed first, and only once.
        self.assertEqual(self.successResultOf(self.protocol.event("E"))["data"]["n"], 2)
        self.assertEqual(len(self.protocol.events), 2)

    def test_event_waiter_claims_it(self) -> None:
        d = self.protocol.event("STOP")
        self.protocol.dataReceived(line({"event": "RESUME"}))
        self.assertNoResult(d)
        self.protocol.dataReceived(line({"event": "STOP"}))
        self.assertEqual(self.successResultOf(d)["event"], "STOP")
        self.assertEqual([e["event"] for e in self.protocol.events], ["RESUME"])
        self.assertEqual(self.protocol.dropped, 0)

    def assertViolation(self, data: bytes) -> None:
        d = self.protocol.execute("query-status")
        self.protocol.dataReceived(data)  # does not raise
        self.assertTrue(self.transport.disconnecting)
        self.assertIsInstance(self.protocol.error, qmp.QMPProtocolError)
        error = self.failureResultOf(d, qmp.Interrupted).value
        self.assertIn("protocol", str(error))
        self.lose()
        self.assertTrue(self.protocol.closed.called)
        self.failureResultOf(self.protocol.execute("cont"), qmp.Interrupted)

    def test_malformed_json_is_a_protocol_error(self) -> None:
        self.assertViolation(b'{"return": \n')

    def test_not_an_object_is_a_protocol_error(self) -> None:
        self.assertViolation(b"[1, 2]\n")

    def test_undecodable_bytes_are_a_protocol_error(self) -> None:
        self.assertViolation(b"\xff\xfe\n")

    def test_over_long_line_is_a_protocol_error(self) -> None:
        self.assertViolation(b"x" * (qmp.MAX_LINE + 2))

    def test_lost_before_greeting(self) -> None:
        protocol = qmp.QMPProtocol()
        protocol.makeConnection(StringTransport())
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(protocol.greeted, qmp.Interrupted)


class FramingTests(TestCase):
    def test_encode(self) -> None:
        self.assertEqual(
            json.loads(qmp.encode("pmemsave", "i1", val=1, size=2)),
            {"execute": "pmemsave", "id": "i1", "arguments": {"val": 1, "size": 2}},
        )
        self.assertEqual(json.loads(qmp.encode("cont")), {"execute": "cont"})

    def test_result(self) -> None:
        self.assertEqual(qmp.result({"return": 3}, "x"), 3)
        with self.assertRaises(qmp.ExecuteError) as raised:
            qmp.result({"error": {"class": "GenericError", "desc": "bad"}}, "x")
        self.assertEqual(
            (raised.exception.error_class, str(raised.exception)), ("GenericError", "x: bad")
        )


class BlockingQueryTests(TestCase):
    """The blocking client against a scripted QMP server on a real unix
    socket (a thread serves one connection)."""

    def serve(self, answer: list[bytes]) -> str:
        """A QMP server that greets, answers qmp_capabilities (after an event
        and a reply with an id not ours), then sends ``answer`` to the command."""
        path = os.path.join(self.mktemp() + ".sock")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        self.addCleanup(server.close)
        self.requests: list[dict[str, Any]] = []

        def run() -> None:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as stream:
                stream.write(line({"QMP": {"version": {}, "capabilities": []}}))
                stream.flush()
                request = json.loads(stream.readline())
                self.requests.append(request)
                stream.write(line({"event": "RESUME"}))
                stream.write(line({"return": {}, "id": "someone-else"}))
                stream.write(line({"return": {}, "id": request["id"]}))
                stream.flush()
                request = json.loads(stream.readline())
                self.requests.append(request)
                for data in answer:
                    stream.write(data.replace(b"ID", request["id"].encode()))
                stream.flush()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        return path

    def test_return(self) -> None:
        path = self.serve([b'{"return": {"status": "running"}, "id": "ID"}\n'])
        self.assertEqual(qmp.query(path, "query-status", timeout=10), {"status": "running"})
        self.assertEqual(
            [r["execute"] for r in self.requests], ["qmp_capabilities", "query-status"]
        )

    def test_arguments(self) -> None:
        path = self.serve([b'{"return": {}, "id": "ID"}\n'])
        qmp.query(path, "pmemsave", timeout=10, val=1, size=2, filename="f")
        self.assertEqual(self.requests[1]["arguments"], {"val": 1, "size": 2, "filename": "f"})

    def test_error_reply(self) -> None:
        path = self.serve([b'{"error": {"class": "GenericError", "desc": "no"}, "id": "ID"}\n'])
        with self.assertRaises(qmp.ExecuteError) as raised:
            qmp.query(path, "cont", timeout=10)
        self.assertEqual(raised.exception.error_class, "GenericError")

    def test_malformed(self) -> None:
        path = self.serve([b'{"return": \n'])
        self.assertRaises(qmp.QMPProtocolError, qmp.query, path, "cont", timeout=10)

    def test_closed(self) -> None:
        path = self.serve([])
        self.assertRaises(qmp.Interrupted, qmp.query, path, "cont", timeout=10)
