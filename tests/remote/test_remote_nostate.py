"""The remote handler needs no state directory: a read-only filesystem apart from an empty /tmp.

gunicorn runs as an unprivileged user (nobody) in a working directory and HOME it cannot write,
with TMPDIR an empty directory it can: what a pod with ``readOnlyRootFilesystem`` and an
``emptyDir`` at /tmp gives it. Requests are sent with real curl; the KFP stand-in runs the
pipeline's effects (simulated) and S3 is moto.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from handler import contract
from handler.remote import s3
from handler.settings import RemoteSettings
from tests.kfp_standin import KfpStandin, Simulation
from tests.remote import fixtures as fx
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.remote.remote_world import RemoteHandler
from tests.support.gunicorn import APP_ARGV
from tests.support.http_client import curl
from tests.support.jobs import job_request, write_dataset
from tests.support.loopback import wait_for
from tests.support.sink import Sink

# Root writes anywhere: drop to nobody so the directory permissions bite (as they do already
# for any other user).
NOBODY = (
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
)


class NoStateHandler(RemoteHandler):
    """The remote handler as nobody, in a read-only cwd and HOME, with an empty TMPDIR."""

    def __init__(self, env: dict[str, str], log: Path, readonly: Path, tmp: Path) -> None:
        super().__init__(env, log, workers=1)
        self.readonly = readonly
        self.base = {
            k: v
            for k, v in self.base.items()
            if not k.startswith(("KFP_", "K_", "S3_", "AWS_", "XDG_", "TMP", "TEMP"))
        }
        self.base.update(HOME=str(readonly), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")

    def start(self, timeout: float = 90.0) -> NoStateHandler:
        self.launch([*NOBODY, *APP_ARGV], self.readonly, self.base, self.env)
        self.wait_ready(timeout)
        return self


@pytest.fixture
def world_dir():
    """A directory nobody can reach (pytest's own tmp dirs are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="kfp-nostate-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_remote_handler_runs_with_no_state_dir_at_all(tmp_path, world_dir, s3_env, bucket):
    readonly = world_dir / "readonly"
    readonly.mkdir(mode=0o555)
    readonly.chmod(0o555)
    empty_tmp = world_dir / "tmp"
    empty_tmp.mkdir()
    empty_tmp.chmod(0o777)
    probe = subprocess.run(
        [*NOBODY, "touch", str(readonly / "x")], capture_output=True, check=False
    )
    assert probe.returncode != 0, "the working directory must really be read-only for the handler"

    dataset = write_dataset(tmp_path / "train.jsonl")
    client = s3.s3_client(RemoteSettings(s3_endpoint_url=s3_env["S3_ENDPOINT_URL"]))
    client.upload_file(str(dataset), bucket, f"{fx.PREFIX}/datasets/ns-1.jsonl")
    with (
        Sink() as sink,
        KfpStandin(token=None, work_dir=tmp_path / "kfp", simulate=Simulation(0.3)) as standin,
    ):
        standin.set_secret(
            fx.S3_SECRET,
            {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY},
        )
        standin.set_task_env({"S3_ENDPOINT_URL": s3_env["S3_ENDPOINT_URL"]})
        env = {
            **s3_env,
            "KFP_TRAINER_MODE": "remote",
            "KFP_HOST": standin.url,
            "S3_BUCKET": bucket,
            "S3_PREFIX": fx.PREFIX,
            "K_SINK": sink.url,
        }
        handler = NoStateHandler(env, tmp_path / "handler.log", readonly, empty_tmp).start()
        try:
            data = job_request("ns-1", f"s3://{bucket}/{fx.PREFIX}/datasets/ns-1.jsonl")
            data["model_artifact"] = {"uri": f"s3://{bucket}/{fx.PREFIX}/models/m.tar"}
            status, headers, body = handler.request(data, tmp_path)
            assert status == 200, body
            assert headers["ce-type"] == contract.JOB_SCHEDULED
            assert handler.request(data, tmp_path)[1]["ce-id"] == headers["ce-id"]
            notice = wait_for(
                lambda: [e for e in sink.of("ns-1") if e["type"] == contract.RUN_FINISHED],
                60,
                "the run's notice",
            )[0]
            status, headers, body = handler.post_event(
                contract.RUN_FINISHED, notice["data"], notice["id"], tmp_path
            )
            assert status == 200 and headers["ce-type"] == contract.JOB_COMPLETED, body
            status, job = handler.job("ns-1")
            assert status == 200 and job["status"] == "completed"
            assert handler.ping(tmp_path)[0] == 202
            status, _, body = curl(handler.url + "/jobs")
            assert status == 200 and [j["job_uuid"] for j in json.loads(body)["jobs"]] == ["ns-1"]
        finally:
            code = handler.stop()
        assert code == 0, handler.log_tail()
    assert "error" not in [r.get("level") for r in handler.log_lines()], handler.log_tail()
    assert list(readonly.iterdir()) == []
    # /tmp may be written (it is the pod's emptyDir): what is left is the workers' Prometheus
    # files (handler/metrics.py), never a store.
    left = [p.name for p in empty_tmp.iterdir()]
    assert all(name.startswith("kfp-trainer-metrics-") for name in left), left
    assert not list(empty_tmp.rglob("*.sqlite3")) and not list(empty_tmp.rglob("jobs"))
