"""The KFP stand-in, driven by the real kfp SDK client: what the remote backend relies on."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import kfp
import kfp_server_api
import pytest

from tests.kfp_standin import KfpStandin
from tests.kfp_standin.runs import Execution
from tests.remote import standin_pipelines as sp
from tests.support.loopback import wait_for

TOKEN = "token-one"
POLL_S = 0.2


@pytest.fixture
def standin(tmp_path: Path):
    with KfpStandin(token=TOKEN, work_dir=tmp_path / "standin") as server:
        yield server


def client_for(standin: KfpStandin, token: str = TOKEN) -> kfp.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=standin.url, existing_token=token)


def by_name(client: kfp.Client, name: str, experiment_id: str | None = None):
    flt = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    return client.list_runs(experiment_id=experiment_id, filter=flt).runs or []


def test_healthz_and_experiments(standin):
    client = client_for(standin)
    assert client.get_kfp_healthz().multi_user is False
    first = client.create_experiment("exp-a")
    again = client.create_experiment("exp-a")  # get-or-create: the SDK looks it up by name
    assert first.experiment_id == again.experiment_id
    assert client.get_experiment(experiment_name="exp-a").experiment_id == first.experiment_id
    with pytest.raises(ValueError, match="No experiment is found with name nope"):
        client.get_experiment(experiment_name="nope")
    with pytest.raises(kfp_server_api.ApiException) as err:
        client.get_experiment(experiment_id="missing-id")
    assert err.value.status == 404


def test_run_executes_ir_with_secret_from_platform_spec(standin, tmp_path):
    standin.set_secret("standin-secret", {"token": "s3cr3t-value"})
    client = client_for(standin)
    package = sp.compile_to(sp.secret_pipeline, tmp_path / "secret.yaml")
    out = tmp_path / "out.txt"
    result = client.create_run_from_pipeline_package(
        str(package),
        arguments={"out": str(out), "tag": "hello"},
        run_name="job-secret",
        experiment_name="exp-b",
    )
    run = client.get_run(result.run_id)
    assert run.display_name == "job-secret"
    assert run.state in ("PENDING", "RUNNING")
    done = wait_for(
        lambda: client.get_run(result.run_id).state in ("SUCCEEDED", "FAILED"),
        240,
        "the run",
        every=POLL_S,
    )
    assert done
    final = client.get_run(result.run_id)
    assert final.state == "SUCCEEDED", standin.state.run_log(result.run_id)
    # The task got the Secret's value through secretAsEnv, and no AWS secret leaked from here.
    assert out.read_text() == f"hello:{len('s3cr3t-value')}:None"
    states = [h.state for h in final.state_history]
    assert states == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert final.finished_at >= final.created_at
    assert not (standin.state.work_dir / "runs" / result.run_id / "secret_env.json").exists()
    assert "s3cr3t-value" not in standin.state.run_log(result.run_id)


def test_missing_secret_fails_the_run(standin, tmp_path):
    client = client_for(standin)
    package = sp.compile_to(sp.secret_pipeline, tmp_path / "secret.yaml")
    result = client.create_run_from_pipeline_package(
        str(package), arguments={"out": str(tmp_path / "o")}, run_name="no-secret"
    )
    wait_for(lambda: client.get_run(result.run_id).state == "FAILED", 30, "FAILED", every=POLL_S)
    assert "secret 'standin-secret' not found" in client.get_run(result.run_id).error.message


def test_list_runs_filters_by_display_name(standin, tmp_path):
    client = client_for(standin)
    package = sp.compile_to(sp.exit_pipeline, tmp_path / "exit.yaml")
    exp = client.create_experiment("exp-c")
    for name in ("job-1", "job-2"):
        client.create_run_from_pipeline_package(
            str(package),
            arguments={"final_out": str(tmp_path / name)},
            run_name=name,
            experiment_id=exp.experiment_id,
        )
    assert [r.display_name for r in by_name(client, "job-2", exp.experiment_id)] == ["job-2"]
    assert by_name(client, "job-3") == []
    assert client.list_runs(experiment_id=exp.experiment_id).total_size == 2
    with pytest.raises(kfp_server_api.ApiException) as err:
        client.list_runs(filter=json.dumps({"predicates": [{"key": "colour", "op": "EQUALS"}]}))
    assert err.value.status == 400
    assert "colour" in err.value.body
    assert standin.state.wait_idle(240)


def test_failure_runs_exit_handler_and_fails(standin, tmp_path):
    client = client_for(standin)
    package = sp.compile_to(sp.exit_pipeline, tmp_path / "exit.yaml")
    final = tmp_path / "final.txt"
    result = client.create_run_from_pipeline_package(
        str(package), arguments={"final_out": str(final), "fail": True}, run_name="job-fail"
    )
    wait_for(lambda: client.get_run(result.run_id).state == "FAILED", 240, "FAILED", every=POLL_S)
    assert final.read_text() == "FAILED"  # the exit task ran and saw the failure
    assert "sleep-then-fail" in client.get_run(result.run_id).error.message


def _long_run(client: kfp.Client, tmp_path: Path, name: str):
    """A run of the exit pipeline whose task sleeps for 5 minutes."""
    package = sp.compile_to(sp.exit_pipeline, tmp_path / "exit.yaml")
    return client.create_run_from_pipeline_package(
        str(package),
        arguments={"final_out": str(tmp_path / "f"), "seconds": 300.0},
        run_name=name,
    )


def test_terminate_kills_the_execution(standin, tmp_path):
    client = client_for(standin)
    result = _long_run(client, tmp_path, "job-long")
    wait_for(lambda: client.get_run(result.run_id).state == "RUNNING", 60, "RUNNING", every=POLL_S)
    time.sleep(1.0)
    client.terminate_run(result.run_id)
    assert client.get_run(result.run_id).state in ("CANCELING", "CANCELED")
    wait_for(
        lambda: client.get_run(result.run_id).state == "CANCELED", 30, "CANCELED", every=POLL_S
    )
    process = standin.state._executions[result.run_id].process
    assert process is not None and process.poll() is not None
    client.terminate_run(result.run_id)  # terminating twice is fine
    with pytest.raises(kfp_server_api.ApiException) as err:
        client.terminate_run("no-such-run")
    assert err.value.status == 404


def _task(client: kfp.Client, run_id: str, name: str):
    run = client.get_run(run_id)
    return next(t for t in run.run_details.task_details if t.display_name == name)


def test_a_failed_task_reports_its_termination_message_as_its_error(standin, tmp_path):
    """What Kubernetes does with /dev/termination-log: the failed task's error is the message."""
    client = client_for(standin)
    package = sp.compile_to(sp.why_pipeline, tmp_path / "why.yaml")
    why = "S3 refused PUT s3://b/jobs/j/result.json: AccessDenied"
    result = client.create_run_from_pipeline_package(
        str(package), arguments={"why": why}, run_name="job-why"
    )
    terminal = ("SUCCEEDED", "FAILED")
    wait_for(lambda: client.get_run(result.run_id).state in terminal, 120, "end", every=POLL_S)
    assert client.get_run(result.run_id).state == "FAILED"
    task = _task(client, result.run_id, "say-why-and-fail")
    assert (task.state, task.error.message) == ("FAILED", why)


def test_oom_kill_is_reported_as_kubernetes_reports_it(standin, tmp_path):
    client = client_for(standin)
    package = sp.compile_to(sp.exit_pipeline, tmp_path / "exit.yaml")
    result = client.create_run_from_pipeline_package(
        str(package),
        arguments={"final_out": str(tmp_path / "final"), "seconds": 300.0},
        run_name="job-oom",
    )
    standin.state.oom_kill(result.run_id, "exec-sleep-then-fail")
    terminal = ("SUCCEEDED", "FAILED")
    wait_for(lambda: client.get_run(result.run_id).state in terminal, 60, "end", every=POLL_S)
    assert client.get_run(result.run_id).state == "FAILED"
    task = _task(client, result.run_id, "sleep-then-fail")
    assert (task.state, task.error.message) == ("FAILED", "OOMKilled (exit code 137)")
    assert _task(client, result.run_id, "record-final").state == "SUCCEEDED"  # the exit task ran
    assert (tmp_path / "final").read_text() == "FAILED"


def test_bearer_token_checked_and_rotated(standin):
    client = client_for(standin)
    client.list_experiments()
    standin.set_token("token-two")
    with pytest.raises(kfp_server_api.ApiException) as err:
        client.list_experiments()
    assert err.value.status == 401
    assert "Unauthenticated" in err.value.body
    client_for(standin, "token-two").list_experiments()


def test_create_run_rejects_unknown_parameters(standin, tmp_path):
    client = client_for(standin)
    package = sp.compile_to(sp.exit_pipeline, tmp_path / "exit.yaml")
    with pytest.raises(kfp_server_api.ApiException) as err:
        client.create_run_from_pipeline_package(
            str(package), arguments={"final_out": "x", "colour": "red"}, run_name="bad"
        )
    assert err.value.status == 400
    assert "colour" in err.value.body


def test_stop_refuses_connections_then_start_serves_same_state(standin):
    client = client_for(standin)
    exp = client.create_experiment("exp-d")
    url = standin.url
    standin.stop()
    with pytest.raises(Exception):  # noqa: B017 - urllib3 raises MaxRetryError, not ApiException
        client.get_experiment(experiment_id=exp.experiment_id)
    standin.start()
    assert standin.url == url
    assert client.get_experiment(experiment_id=exp.experiment_id).display_name == "exp-d"


def test_an_execution_of_a_deleted_run_starts_nothing(standin, tmp_path):
    """DeleteRun (a racing replica's converging delete) can come before the run's execution
    thread looks the run up: that execution ends quietly, no executor started."""
    client = client_for(standin)
    result = _long_run(client, tmp_path, "job-deleted")
    client.delete_run(result.run_id)
    state = standin.state
    wait_for(lambda: state._executions[result.run_id].done.is_set(), 30, "execution done")
    late = Execution()  # as if the thread had only now reached its lookup
    (tmp_path / "late").mkdir()
    state._execute(result.run_id, {}, {}, {}, tmp_path / "late", late)
    assert late.process is None
    assert result.run_id in state.deleted and state.run_count() == 0
