"""A streamed S3 download that breaks mid-way resumes from the byte it reached (issue: reliability, item 6).

Between boto3 and a real moto_server sits a TCP proxy that cuts the first download of the object after
200 kB of its body: the reader reopens with ``Range: bytes=<reached>-`` and the bytes come out whole."""

from __future__ import annotations

import os
import socket
import threading
import uuid

import boto3

from conftest import _free_port
from eupe import storage


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the S3 server; the first response to a GET without a Range header is cut
    after ``cut`` bytes (the connection closed, as a broken network would)."""

    def __init__(self, upstream: str, cut: int):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream, self.cut, self.cuts, self.ranges = (host, int(port)), cut, 0, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        up = socket.create_connection(self.upstream)
        request = client.recv(65536)
        head = request.decode("latin-1").lower()
        cutting = head.startswith("get ") and "range:" not in head and "/data.bin" in head and self.cuts == 0
        if "range:" in head:
            self.ranges.append(head.split("range:", 1)[1].split("\r\n", 1)[0].strip())
        self.cuts += cutting
        up.sendall(request)
        threading.Thread(target=self._pump, args=(client, up), daemon=True).start()
        sent = 0
        while True:
            data = up.recv(65536)
            if not data:
                break
            if cutting and sent + len(data) > self.cut:
                client.sendall(data[: self.cut - sent])
                break
            client.sendall(data)
            sent += len(data)
        client.close()
        up.close()

    @staticmethod
    def _pump(client: socket.socket, up: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                up.sendall(data)
        except OSError:
            pass


def test_a_broken_download_resumes_from_the_byte_it_reached(s3_server, monkeypatch):
    bucket = f"range-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=bucket)
    payload = os.urandom(3 << 20)
    client.put_object(Bucket=bucket, Key="shards/data.bin", Body=payload)
    proxy = CuttingProxy(s3_server, cut=200_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    with storage.open_read(f"s3://{bucket}/shards/data.bin") as f:
        got = f.read()
    assert proxy.cuts == 1 and len(got) == len(payload) and got == payload
    (reopened,) = proxy.ranges
    start = int(reopened.removeprefix("bytes=").rstrip("-"))
    assert 0 < start < 200_000  # from the byte reached (the headers took part of the cut), not from 0
