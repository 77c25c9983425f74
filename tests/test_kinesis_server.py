"""The test Kinesis itself: kinesalite must outlive a client that dies mid-request.

Regression: kinesalite rethrows a request's 'error', so one worker SIGKILLed mid-PutRecords
(the crash tests do that) killed the server and every Kinesis test after it errored.
"""

from __future__ import annotations

import socket
import struct

import boto3

from tests.kinesis_server import check_alive, kinesis_endpoint, kinesis_env  # noqa: F401


def _abort_mid_body(endpoint: str) -> None:
    host, port = endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n"
                     b"X-Amz-Target: Kinesis_20131202.PutRecords\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"{" * 1000)
        # Linger 0: close sends a RST, as the kernel does for a SIGKILLed process's socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_client_reset_mid_request_does_not_kill_the_server(
        kinesis_endpoint: str, kinesis_env: dict[str, str]) -> None:  # noqa: F811
    for _ in range(3):
        _abort_mid_body(kinesis_endpoint)
    client = boto3.client("kinesis", endpoint_url=kinesis_endpoint)
    assert "StreamNames" in client.list_streams()  # it answers after the resets
    check_alive(kinesis_endpoint)
