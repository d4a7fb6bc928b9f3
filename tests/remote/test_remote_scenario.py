"""Serverless for real: three stateless handlers behind the Broker, through a bad afternoon.

Three gunicorn processes (each its own temp dir, nothing shared) sit behind the Broker stand-in,
which routes by knative/triggers.yaml with the manifests' delivery spec, time shrunk 60-fold
(KFP down for 10 s here is the 10-minute outage the spec is sized for), and sends a random 20%
of deliveries twice. KFP is the stand-in with simulated runs, S3 is moto. Then:

- 100 job requests go to the Broker (a tenth name a dataset that does not exist);
- one handler is killed with SIGKILL mid-stream;
- KFP is down for 10 s;
- every handler is stopped while runs finish (the last ten jobs' runs are held until then, so
  their notices must wait at the Broker), and a fresh one is started (reconcile ticks go to it).

Afterwards: exactly one KFP run per job uuid, no request dead-lettered (KFP could take them
all), every job's terminal event delivered at least once, and after dedup by source + id
exactly one terminal event per job, with the right status and checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from handler import contract
from handler.remote import s3
from handler.settings import RemoteSettings
from tests.broker_standin import BrokerStandin
from tests.kfp_standin import KfpStandin, Simulation
from tests.remote import fixtures as fx
from tests.remote.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from tests.remote.remote_world import RemoteHandler
from tests.support.http_client import ce_headers
from tests.support.jobs import job_request, write_dataset
from tests.support.loopback import wait_for
from tests.support.sink import Sink

JOBS = 100
BAD_EVERY = 10  # every tenth job names a dataset nobody uploaded: its run fails
TIME_SCALE = 1 / 60
KFP_DOWN_S = 10.0
HELD_FROM = "sc-090"  # these jobs' runs end only once every handler is down
RUNS_WAIT_S = 120  # for a KFP run of every job, after the last request


class Fleet:
    """The handler replicas; ``endpoints()`` is what the Service routes to right now."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.live: list[RemoteHandler] = []
        self.all: list[RemoteHandler] = []
        self._lock = threading.Lock()

    def start(self, name: str) -> RemoteHandler:
        own = self.tmp / name
        own.mkdir()
        handler = RemoteHandler(
            {**self.env, "TMPDIR": str(own), "HOME": str(own)}, own / "handler.log", workers=1
        )
        handler.start()
        with self._lock:
            self.live.append(handler)
            self.all.append(handler)
        return handler

    def endpoints(self) -> list[str]:
        with self._lock:
            return [h.url + "/" for h in self.live]

    def kill(self, handler: RemoteHandler) -> None:
        """SIGKILL, as an OOM kill or a node loss would; the endpoint goes a moment later."""
        assert handler.proc is not None
        os.killpg(handler.proc.pid, signal.SIGKILL)
        handler.proc.wait(10)
        time.sleep(1.0)  # the Service's endpoints catch up
        with self._lock:
            self.live.remove(handler)

    def stop_all(self) -> None:
        with self._lock:
            live, self.live = self.live, []
        for handler in live:
            handler.stop()


def _no_run_report(missing: list[str], broker: BrokerStandin) -> str:
    """What the Broker did with each job.requested that has no run: the failure names it all."""
    start = min((a.at for a in broker.attempts), default=0.0)
    lines = [
        f"no KFP run after {RUNS_WAIT_S} s for {len(missing)} job(s) (attempt times from the first)"
    ]
    for job in missing:
        tried = [
            f"{a.at - start:.1f}s {a.url or '-'} copy{a.copy}: {a.status}"
            for a in broker.attempts
            if a.event_type == contract.JOB_REQUESTED and a.event_id == f"{job}/job.requested"
        ]
        dead = [
            d.get("knativeerrorcode")
            for d in broker.dead_lettered(contract.JOB_REQUESTED)
            if d.get("subject") == job
        ]
        lines.append(f"{job}: attempts {tried}, dead-lettered with {dead}")
    if broker.faults:
        lines.append(f"the Broker stand-in itself failed on: {broker.faults}")
    return "\n".join(lines)


def test_three_stateless_handlers_ride_out_kills_outages_and_scale_to_zero(
    tmp_path, s3_env, bucket
):
    remote = RemoteSettings(s3_endpoint_url=s3_env["S3_ENDPOINT_URL"], s3_bucket=bucket)
    client = s3.s3_client(remote)
    local = write_dataset(tmp_path / "train.jsonl")
    good = f"{fx.PREFIX}/datasets/train.jsonl"
    client.upload_file(str(local), bucket, good)
    display, dead = Sink().__enter__(), Sink().__enter__()
    scaled_to_zero = threading.Event()
    simulation = Simulation(
        train_s=2.0, hold=lambda job: job >= HELD_FROM and not scaled_to_zero.is_set()
    )
    standin = KfpStandin(token=None, work_dir=tmp_path / "kfp", simulate=simulation)
    standin.set_secret(
        fx.S3_SECRET,
        {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY},
    )
    standin.set_task_env({"S3_ENDPOINT_URL": s3_env["S3_ENDPOINT_URL"]})
    standin.start()
    fleet: Fleet | None = None
    broker: BrokerStandin | None = None
    try:
        fleet = Fleet(tmp_path, {})
        broker = BrokerStandin(
            {
                "kfp-trainer-handler": lambda: fleet.endpoints(),
                "kfp-trainer-event-display": display.url,
                "kfp-trainer-dead-letters": dead.url,
            },
            time_scale=TIME_SCALE,
            duplicate_rate=0.2,
            seed=2026,
        ).__enter__()
        fleet.env = {
            **s3_env,
            "KFP_TRAINER_MODE": "remote",
            "KFP_HOST": standin.url,
            "KFP_EXPERIMENT": "scenario",
            "S3_BUCKET": bucket,
            "S3_PREFIX": fx.PREFIX,
            "K_SINK": broker.url,
            "GUNICORN_THREADS": "4",
            "KFP_TRAINER_NOTIFY_WINDOW_S": "120",
        }
        replicas = [fleet.start(f"handler-{i}") for i in range(3)]

        expected: dict[str, str] = {}
        for i in range(JOBS):
            job = f"sc-{i:03d}"
            bad = i % BAD_EVERY == BAD_EVERY - 1
            uri = (
                f"s3://{bucket}/{fx.PREFIX}/datasets/missing-{i}.jsonl"
                if bad
                else f"s3://{bucket}/{good}"
            )
            data = job_request(job, uri)
            data["model_artifact"] = {"uri": f"s3://{bucket}/{fx.PREFIX}/models/m.tar"}
            expected[job] = "failed" if bad else "completed"
            headers = ce_headers(contract.JOB_REQUESTED, f"{job}/job.requested", subject=job)
            answer = requests.post(broker.url, headers=headers, data=json.dumps(data), timeout=10)
            assert answer.status_code == 202
            if i == 30:
                fleet.kill(replicas[1])
            if i == 60:
                standin.stop()
                threading.Timer(KFP_DOWN_S, standin.start).start()
            time.sleep(0.05)

        def jobs_without_a_run() -> list[str]:
            runs = standin.state.list_runs({}).get("runs", [])
            return sorted(set(expected) - {r["display_name"] for r in runs})

        try:
            wait_for(
                lambda: not jobs_without_a_run(), RUNS_WAIT_S, "a KFP run for every job", every=0.5
            )
        except AssertionError:
            raise AssertionError(_no_run_report(jobs_without_a_run(), broker)) from None
        # Scale to zero while runs finish: their notices wait at the Broker, retried.
        fleet.stop_all()
        scaled_to_zero.set()
        time.sleep(5)
        fresh = fleet.start("handler-fresh")
        assert broker.wait_idle(120)
        assert standin.state.wait_idle(120)
        for tick in range(2):  # PingSource ticks reach the fresh pod
            status, _, body = fresh.ping(tmp_path, tick)
            assert status == 202, body
        assert broker.wait_idle(60)

        # Exactly one KFP run per job uuid.
        runs = standin.state.list_runs({}).get("runs", [])
        per_job = Counter(r["display_name"] for r in runs)
        assert set(per_job) == set(expected)
        assert max(per_job.values()) == 1, {k: v for k, v in per_job.items() if v > 1}

        # Nothing dead-lettered that KFP could have taken.
        assert broker.dead_lettered(contract.JOB_REQUESTED) == []
        assert broker.faults == [], "the Broker stand-in dropped deliveries"

        # Every terminal event at least once; after dedup, exactly one per job, and right.
        terminal = [e for e in display.events if e["type"] in contract.TERMINAL_TYPES]
        by_key: dict[tuple[str, str], dict] = {}
        for event in terminal:
            by_key.setdefault((event["source"], event["id"]), event)
        per_job_events = Counter(e["subject"] for e in by_key.values())
        assert set(per_job_events) == set(expected), sorted(set(expected) - set(per_job_events))
        assert set(per_job_events.values()) == {1}
        assert len(terminal) > len(by_key), "at least once: some ends arrived more than once"
        for event in by_key.values():
            job = event["subject"]
            data = event["data"]
            assert data["status"] == expected[job], (job, data)
            assert event["id"] == f"{job}/job.{expected[job]}"
            if expected[job] == "completed":
                (checkpoint,) = data["checkpoints"]
                assert (
                    checkpoint["path"]
                    == f"s3://{bucket}/{fx.PREFIX}/jobs/{job}/checkpoints/llama3.2-tiny-sft-0"
                )
                assert data["dataset_rows"] == 8
            else:
                assert data["checkpoints"] == []
                assert f"missing-{int(job[3:])}.jsonl" in data["error"]

        # It really was a bad afternoon.
        attempts = broker.attempts
        killed = replicas[1].url + "/"
        assert any(a.url == killed and a.status is None for a in attempts), "the kill bit"
        assert any(a.event_type == contract.JOB_REQUESTED and a.status == 503 for a in attempts)
        assert any(a.copy == 1 for a in attempts), "some deliveries went out twice"
        answered_by = {
            a.url for a in attempts if a.event_type == contract.RUN_FINISHED and a.status == 200
        }
        assert fresh.url + "/" in answered_by, "the fresh pod answered notices held at the Broker"
    finally:
        if fleet is not None:
            fleet.stop_all()
        if broker is not None:
            broker.close()
        standin.close()
        display.__exit__(None, None, None)
        dead.__exit__(None, None, None)
