"""pipelines.storage over https://: a dataset passed by reference is downloaded by the trainer,
with a server whose certificate chains to a CA the process trusts (SSL_CERT_FILE)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from pipelines import storage
from tests.support.loopback import LoopbackHTTPServer, QuietHandler, closed_port_url
from tests.support.tls import make_tls

BODY = b'chat_completion_input,expected_answer\n"[]",007\n'


class Files(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        status = {"/sets/train.csv": 200, "/sets/busy.csv": 503}.get(self.path, 404)
        self.send_response(status)
        body = BODY if status == 200 else b"no"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def https(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tls = make_tls(tmp_path / "tls", "datasets")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    server = LoopbackHTTPServer(Files)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    with server:
        yield server.base_url.replace("http://", "https://")


def test_an_https_object_is_downloaded_whole(https: str, tmp_path: Path) -> None:
    path = storage.fetch(f"{https}/sets/train.csv", tmp_path / "dl")
    assert path == tmp_path / "dl" / "train.csv"
    assert path.read_bytes() == BODY
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["train.csv"]  # no partial left


def test_https_answers_are_told_apart(https: str, tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match=r"sets/nope\.csv': HTTP 404") as refused:
        storage.fetch(f"{https}/sets/nope.csv", tmp_path / "dl")
    assert not isinstance(refused.value, storage.StorageUnavailable)
    with pytest.raises(storage.StorageUnavailable, match="HTTP 503; retry later"):
        storage.fetch(f"{https}/sets/busy.csv", tmp_path / "dl")
    gone = closed_port_url().replace("http://", "https://") + "/x.csv"
    with pytest.raises(storage.StorageUnavailable, match="retry later"):
        storage.fetch(gone, tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []
