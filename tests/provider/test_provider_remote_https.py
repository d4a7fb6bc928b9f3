"""Remote mode end to end, an ``https://`` dataset passed by reference: llama-stack SDK ->
provider (remote) -> Broker -> handler -> KFP stand-in (the real pipeline, real training) ->
the train task downloads the CSV itself over TLS. The provider never reads it, S3 never holds
a copy. (The s3:// twin of this test is in tests/remote/test_remote_e2e.py, whose world this
module builds again with an https root allowed.)
"""

from __future__ import annotations

import hashlib
import ssl
import threading

import pytest

from tests.remote import fixtures as fx
from tests.remote.conftest import moto_url  # noqa: F401 (the session's moto server)
from tests.remote.test_remote_e2e import running_world
from tests.support.loopback import LoopbackHTTPServer, QuietHandler
from tests.support.tls import make_tls

pytestmark = pytest.mark.timeout(900)

PATH = "/corpora/agents.csv"


def _csv() -> bytes:
    lines = ["chat_completion_input,expected_answer"]
    for i in range(20):
        lines.append(f'"[{{""role"": ""user"", ""content"": ""Agent {i}?""}}]",00{i % 10}')
    return ("\n".join(lines) + "\n").encode()


class Corpora(LoopbackHTTPServer):
    """An https:// file server on 127.0.0.1 with a certificate from a test CA; counts GETs."""

    def __init__(self, body: bytes, tls) -> None:
        self.gets: list[str] = []
        lock = threading.Lock()
        outer = self

        class Files(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                with lock:
                    outer.gets.append(self.path)
                found = self.path == PATH
                self.send_response(200 if found else 404)
                answer = body if found else b"no such file"
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        super().__init__(Files)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)

    @property
    def https_url(self) -> str:
        return self.base_url.replace("http://", "https://")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tls = make_tls(tmp_path_factory.mktemp("tls"), "corpora")
    mp = pytest.MonkeyPatch()
    # Every process of the world (handler, stand-in's tasks, llama stack run) trusts the CA.
    mp.setenv("SSL_CERT_FILE", str(tls.ca))
    with Corpora(_csv(), tls) as server:
        yield server
    mp.undo()


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_url, corpora):  # noqa: F811 (the fixture imported above)
    def env(world) -> dict[str, str]:
        return {
            "KFP_EXPERIMENT": "https",
            "KFP_TRAINER_DATA_ROOTS": f"{corpora.https_url}/corpora/",
        }

    with running_world(tmp_path_factory.mktemp("remote-https"), moto_url, "remote-https", env) as w:
        yield w


def test_an_https_dataset_is_passed_by_reference_and_read_by_the_train_task(
    world, corpora, tmp_path
) -> None:
    uri = corpora.https_url + PATH
    first, status = world.fine_tune_through_llama_stack(
        tmp_path,
        "e2e-https",
        "web-agents",
        uri,
        KFP_TRAINER_DATA_ROOTS=corpora.https_url + "/corpora/",
    )
    assert first["datasets"]["dataset"]["delivery"] == "by_reference", first
    assert status.dataset_rows == 20
    assert corpora.gets == [PATH]  # once, by the train task: the provider never read it
    assert fx.list_keys(world.remote, f"{fx.PREFIX}/datasets/e2e-https/") == []  # no copy
    (run,) = world.runs_named("e2e-https")
    assert run["runtime_config"]["parameters"]["dataset_uri"] == uri
    read = world.result("e2e-https")["datasets"]["dataset"]
    assert (read["uri"], read["format"], read["rows"]) == (uri, "csv", 20)
    assert read["sha256"] == hashlib.sha256(_csv()).hexdigest()  # every cell as written
