"""handler.remote.transport: one kept-alive connection per thread, replaced when the server closed
it, and the KFP calls over it surviving a KFP restart without a failed request."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from handler.remote.kfp import KfpClient
from handler.remote.transport import Connections
from handler.settings import RemoteSettings
from tests.kfp_standin import KfpStandin


class _Counting(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive; counts connections; ``/close`` answers with Connection: close."""

    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1

    def do_GET(self) -> None:
        data = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if self.path.endswith("/close"):
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def counting():
    _Counting.connections = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_one_connection_per_thread_is_kept_alive(counting):
    url = f"http://127.0.0.1:{counting.server_address[1]}/base"
    connections = Connections(url, timeout_s=5)
    for _ in range(3):
        answer = connections.send("GET", "/x?a=1", None, {})
        assert answer.status == 200 and json.loads(answer.data) == {"path": "/base/x?a=1"}
    assert _Counting.connections == 1
    other = threading.Thread(target=connections.send, args=("GET", "/y", None, {}))
    other.start()
    other.join()
    assert _Counting.connections == 2
    connections.send("GET", "/close", None, {})  # the server said it closes: a new one next
    connections.send("GET", "/z", None, {})
    assert _Counting.connections == 3
    connections.close()


def test_kfp_restarted_between_calls_is_not_a_failed_call(tmp_path: Path):
    """KFP restarted between two calls: the kept-alive connection it cut is not reused (calls
    are not retried once sent: a create must not go out twice), so the next call goes out on a
    fresh connection and succeeds."""
    with KfpStandin(token=None, work_dir=tmp_path / "standin") as standin:
        client = KfpClient(RemoteSettings(kfp_host=standin.url))
        exp = client.experiment_id("e")
        assert client.runs_named(exp, "job-1") == []
        for _ in range(2):
            standin.stop()
            standin.start()
            assert client.runs_named(exp, "job-1") == []
        assert [s for _, _, s in standin.requests][-3:] == [200, 200, 200]
