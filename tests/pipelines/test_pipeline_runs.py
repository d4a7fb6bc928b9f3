"""Real KFP local runs (SubprocessRunner, use_venv=False) of the real pipeline on llama3.2-tiny.

Each test runs the whole pipeline (importers, train, exit-handler notify) in its own workdir
and pipeline root; the `run` command is exercised as a subprocess, exactly as the handler
spawns it. Timings are not asserted here (see bench/bench_pipeline.py).
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path

import pytest
import torch

from pipelines import storage
from pipelines.models import TINY
from pipelines.result import RunResult
from pipelines.settings import PipelineSettings
from tests.pipelines.loaders import HF_MODEL_FILES, chat_ids, meta_reference_logits, peft_model
from tests.pipelines.pipeline_helpers import (
    RUNNER,
    make_request,
    make_tar,
    pod_env,
    run_cli,
    write_rows,
)
from tests.pipelines.test_pipeline_units import receiver  # noqa: F401  (fixture)

# The trainer image's name need not contain "python"; kfp.local warns about that.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning"),
    # kfp.local's importer warns about s3:// URIs; the train task fetches them itself.
    pytest.mark.filterwarnings("ignore:It looks like you're using the remote file:UserWarning"),
]


def _adapter(checkpoint: Path) -> dict:
    """The PEFT adapter weights of a checkpoint directory."""
    from safetensors.torch import load_file

    return load_file(checkpoint / "adapter" / "adapter_model.safetensors")


def _run_local(request: dict, workdir: Path, cache: Path, **arguments: str) -> None:
    """The pipeline function called under kfp.local, as local.run_request does, with extras."""
    from kfp import local

    from pipelines.pipeline import build_pipeline, pipeline_arguments

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "pipeline_root"),
        raise_on_error=False,
    )
    pipeline = build_pipeline(PipelineSettings(cache_dir=cache))
    pipeline(**pipeline_arguments(request, **arguments), cache_dir=str(cache))


def test_run_trains_checkpoints_and_notifies(
    tmp_path: Path,
    tiny_model: Path,
    tiny_hf: Path,
    receiver,  # noqa: F811
) -> None:
    url, handler = receiver
    train = write_rows(tmp_path / "train.jsonl", 40)
    val = write_rows(tmp_path / "val.jsonl", 8, offset=100)
    request = make_request(
        "job-main", str(tiny_model), str(train), validation_dataset={"uri": str(val)}
    )
    request["training_config"]["dtype"] = "fp32"
    request["training_config"]["efficiency_config"] = {
        "enable_activation_checkpointing": True,
        "enable_activation_offloading": True,
    }
    result_dir = tmp_path / "result"
    progress = tmp_path / "progress.json"
    _run_local(
        request,
        tmp_path / "work",
        tmp_path / "cache",
        result_uri=str(result_dir),
        progress_path=str(progress),
        notify_url=url,
        notify_event_type="io.llamastack.posttraining.run.finished",
    )

    result = RunResult.read(result_dir / "result.json")
    assert result.status == "completed" and result.error is None
    assert result.dataset_rows == 40
    assert [c["epoch"] for c in result.checkpoints] == [0, 1]
    for ckpt in result.checkpoints:
        assert ckpt["identifier"] == f"llama3.2-tiny-sft-{ckpt['epoch']}"
        assert ckpt["post_training_job_id"] == "job-main" and ckpt["created_at"]
        m = ckpt["training_metrics"]
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["validation_loss"])
        assert m["perplexity"] == pytest.approx(math.exp(m["validation_loss"]))
    assert result.resources_allocated["device"] == "cpu"
    assert result.resources_allocated["dtype"] == "fp32"
    assert result.resources_allocated["peak_memory_bytes"] > 0
    assert [m["steps"] for m in result.metrics] == [3, 3]
    assert all(m["tokens_per_second"] > 0 for m in result.metrics)
    record = json.loads(progress.read_text())
    assert (record["step"], record["total_steps"], record["epoch"]) == (6, 6, 1)
    assert math.isfinite(record["loss"])

    # Adapter weights changed: LoRA B starts at zero and differs between epochs.
    first = _adapter(Path(result.checkpoints[0]["path"]))
    last = _adapter(Path(result.checkpoints[1]["path"]))
    b_keys = [k for k in last if "lora_B" in k]
    assert b_keys and all(last[k].abs().sum() > 0 for k in b_keys)
    assert any(not first[k].equal(last[k]) for k in last)

    # Checkpoint.path is the merged Meta model itself, as `llama model download` lays it out,
    # bf16 like its base although training ran in fp32; llama-stack's meta-reference loads it.
    path = Path(result.checkpoints[1]["path"])
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter",
        "consolidated.00.pth",
        "params.json",
        "tokenizer.model",
    ]
    merged = torch.load(path / "consolidated.00.pth", weights_only=True)
    assert "output.weight" in merged and {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((path / "params.json").read_text()) == TINY.params_json()
    (meta_logits,) = meta_reference_logits([(path, list(range(1, 30)))], tmp_path)
    assert torch.isfinite(meta_logits).all()
    # The adapter is PEFT's, named for the Hugging Face modules, and loads onto the HF base.
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    _, missing, unexpected = peft_model(tiny_hf, path / "adapter")
    assert missing == [] and unexpected == []

    # The exit handler posted the notice.
    headers, body = handler.got[-1]
    assert {k.lower(): v for k, v in headers.items()}["ce-id"] == "job-main/run.finished"
    assert body["state"] == "SUCCEEDED" and body["job_uuid"] == "job-main" and body["run_id"]


def test_hf_sharded_archive_gives_a_model_transformers_and_peft_load(
    tmp_path: Path, tiny_hf_sharded: Path, tiny_hf: Path
) -> None:
    """A .tar.gz of a sharded Hugging Face download in, a complete HF model directory out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    archive = make_tar(tiny_hf_sharded, tmp_path / "hf.tar.gz", gzip=True)
    data = write_rows(tmp_path / "train.jsonl", 12, "dialog")
    request = make_request("job-hf", str(archive), str(data), checkpoint_format="huggingface")
    request["training_config"].update(n_epochs=1, dtype="fp32")
    request["training_config"]["data_config"]["data_format"] = "dialog"
    _run_local(request, tmp_path / "work", tmp_path / "cache", result_uri=str(tmp_path / "r"))

    result = RunResult.read(tmp_path / "r" / "result.json")
    assert result.status == "completed", result.error
    assert result.rows_without_trainable_tokens == 0
    path = Path(result.checkpoints[0]["path"])
    assert HF_MODEL_FILES | {"adapter"} <= {p.name for p in path.iterdir()}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in path.rglob("*") if p.is_file())
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16  # the base's dtype, although training ran in fp32
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is 2 plus 2?"}]
    ids = chat_ids(tok, messages, add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(ids) + 3
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "llama3.2-tiny"  # no Hub repo: the registry name
    _, missing, unexpected = peft_model(tiny_hf, path / "adapter")
    assert missing == [] and unexpected == []


def _too_long_rows(path: Path, long: int, short: int) -> Path:
    with path.open("w") as f:
        for i in range(long + short):
            question = "word " * (400 if i < long else 3) + "?"
            row = {
                "chat_completion_input": json.dumps([{"role": "user", "content": question}]),
                "expected_answer": f"answer {i}",
            }
            f.write(json.dumps(row) + "\n")
    return path


def test_truncation_never_trains_on_nothing_in_silence(tmp_path: Path, tiny_model: Path) -> None:
    mixed = _too_long_rows(tmp_path / "mixed.jsonl", 3, 5)
    request = make_request("job-mixed", str(tiny_model), str(mixed))
    request["training_config"].update(n_epochs=1, max_steps_per_epoch=1)
    proc, out = run_cli(request, tmp_path / "mixed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["status"] == "completed" and result["dataset_rows"] == 8
    assert result["rows_without_trainable_tokens"] == 3

    every = _too_long_rows(tmp_path / "long.jsonl", 4, 0)
    proc, out = run_cli(make_request("job-long", str(tiny_model), str(every)), tmp_path / "long")
    assert proc.returncode == 1
    result = json.loads(out.read_text())
    assert result["status"] == "failed" and not result["checkpoints"]
    assert result["error"].startswith(
        "dataset: no row left to train on: all 4 rows lose every answer token when cut to the "
        "sequence limit of 256 tokens"
    )


def test_failed_run_notifies_and_records_the_error(
    tmp_path: Path,
    tiny_model: Path,
    receiver,  # noqa: F811
) -> None:
    url, handler = receiver
    dialog_rows = write_rows(tmp_path / "train.jsonl", 5, "dialog")
    request = make_request("job-badrows", str(tiny_model), str(dialog_rows))
    _run_local(
        request,
        tmp_path / "work",
        tmp_path / "cache",
        result_uri=str(tmp_path / "result"),
        notify_url=url,
        notify_event_type="t",
    )
    result = RunResult.read(tmp_path / "result" / "result.json")
    assert result.status == "failed" and not result.checkpoints
    assert result.error.startswith(
        "dataset 'train.jsonl' row 0: missing field 'chat_completion_input'"
    )
    assert not (tmp_path / "result" / "checkpoints").exists()
    assert handler.got[-1][1]["state"] == "FAILED"


def test_run_command_5000_rows_arrive_in_full(tmp_path: Path, tiny_model: Path) -> None:
    data = write_rows(tmp_path / "big.jsonl", 5000, "dialog")
    request = make_request("job-5000", str(tiny_model), str(data))
    request["training_config"].update(n_epochs=1, max_steps_per_epoch=1)
    request["training_config"]["data_config"]["data_format"] = "dialog"
    proc, out = run_cli(request, tmp_path, "--progress", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # stdout holds the result JSON and nothing else
    assert printed == json.loads(out.read_text())
    assert printed["status"] == "completed" and printed["dataset_rows"] == 5000
    assert json.loads((tmp_path / "p.json").read_text())["total_steps"] == 1


def _adapters(result: dict) -> dict:
    return _adapter(Path(result["checkpoints"][-1]["path"]))


def test_dir_tar_and_tar_gz_give_the_same_result_and_the_cache_hits(
    tmp_path: Path, tiny_model: Path, model_archives: dict[str, Path]
) -> None:
    data = write_rows(tmp_path / "train.jsonl", 24)
    env = {"KFP_TRAINER_CACHE_DIR": str(tmp_path / "cache")}
    results, logs = {}, {}
    for kind, uri in (
        ("dir", tiny_model),
        ("tar", model_archives["tar"]),
        ("tar.gz", model_archives["tar.gz"]),
        ("tar.gz-again", model_archives["tar.gz"]),
    ):
        request = make_request(f"job-{kind.replace('.', '-')}", str(uri), str(data))
        proc, out = run_cli(request, tmp_path / kind, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[kind] = json.loads(out.read_text())
        logs[kind] = [
            json.loads(line.strip())
            for line in proc.stderr.splitlines()
            if '"model staged"' in line
        ]
        if kind == "tar.gz":  # mark the cache entry: a re-extraction would lose this
            staged = Path(logs[kind][0]["dir"])
            (staged / "sentinel").write_text("x")

    losses = {k: [m["train_loss"] for m in r["metrics"]] for k, r in results.items()}
    assert losses["dir"] == losses["tar"] == losses["tar.gz"] == losses["tar.gz-again"]
    ref = _adapters(results["dir"])
    for kind in ("tar", "tar.gz"):
        got = _adapters(results[kind])
        assert got.keys() == ref.keys() and all(got[k].equal(ref[k]) for k in ref)

    assert [e["cache"] for e in logs["dir"]] == ["none"]
    assert [e["cache"] for e in logs["tar"]] == ["miss"]
    assert [e["cache"] for e in logs["tar.gz"]] == ["miss"]
    assert [e["cache"] for e in logs["tar.gz-again"]] == ["hit"]
    assert logs["tar.gz-again"][0]["dir"] == logs["tar.gz"][0]["dir"]
    assert (Path(logs["tar.gz-again"][0]["dir"]) / "sentinel").read_text() == "x"


def test_hostile_tarball_fails_the_run_before_training(tmp_path: Path, tiny_model: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_model, arcname="llama3.2-tiny")
        link = tarfile.TarInfo("llama3.2-tiny/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../etc"
        tar.addfile(link)
    data = write_rows(tmp_path / "train.jsonl", 8)
    env = {"KFP_TRAINER_CACHE_DIR": str(tmp_path / "cache")}
    proc, out = run_cli(make_request("job-evil", str(archive), str(data)), tmp_path, env=env)
    assert proc.returncode == 1
    result = json.loads(out.read_text())
    assert result["status"] == "failed"
    assert "member 'llama3.2-tiny/escape' is a symlink pointing outside" in result["error"]
    assert str(archive) in result["error"]
    assert '"progress"' not in proc.stderr  # no training step ran
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".digests"]


def test_bad_config_is_refused_before_any_run(tmp_path: Path, tiny_model: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", 8)
    request = make_request("job-rank0", str(tiny_model), str(data))
    request["algorithm_config"].update(rank=0, lora_attn_modules=["q_proj", "attn"])
    proc, out = run_cli(request, tmp_path)
    assert proc.returncode == 1
    error = json.loads(out.read_text())["error"]
    assert "algorithm_config.rank: 0 must be >= 1" in error
    assert "unknown module(s) 'attn'" in error
    assert not (tmp_path / "work").exists()  # no pipeline was started


def test_run_command_resolves_the_model_from_a_store(tmp_path: Path, tiny_model: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_tar(tiny_model, store / "llama3.2-tiny.tar.gz", gzip=True)
    data = write_rows(tmp_path / "train.jsonl", 8)
    request = make_request("job-store", "x", str(data))
    del request["model_artifact"]
    request["training_config"].update(n_epochs=1, max_steps_per_epoch=1)
    request_missing = {**request, "model": "Llama3.2-1B-Instruct"}
    proc, out = run_cli(request_missing, tmp_path / "missing", "--model-store", str(store))
    assert proc.returncode == 1
    assert (
        "model 'Llama3.2-1B-Instruct' not found in model store"
        in json.loads(out.read_text())["error"]
    )
    env = {"KFP_TRAINER_CACHE_DIR": str(tmp_path / "cache")}
    proc, out = run_cli(request, tmp_path / "ok", "--model-store", str(store), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["status"] == "completed"


def test_compiled_package_runs_with_s3_artifacts_and_publishes_to_s3(
    tmp_path: Path, bucket: str, model_archives: dict[str, Path]
) -> None:
    """The compiled IR (what a KFP server gets), run by kfp.local on s3:// URIs: the train task
    fetches them itself and publishes checkpoints and result.json under result_uri."""
    import yaml
    from google.protobuf import json_format
    from kfp import local
    from kfp.local import pipeline_orchestrator
    from kfp.pipeline_spec import pipeline_spec_pb2

    from pipelines.pipeline import compile_pipeline, pipeline_arguments

    model_uri = storage.publish(
        model_archives["tar.gz"], f"s3://{bucket}/models/llama3.2-tiny.tar.gz"
    )
    data_uri = storage.publish(
        write_rows(tmp_path / "train.jsonl", 12), f"s3://{bucket}/datasets/job-s3/train.jsonl"
    )
    val_uri = storage.publish(
        write_rows(tmp_path / "val.jsonl", 4, offset=50), f"s3://{bucket}/datasets/job-s3/val.jsonl"
    )
    request = make_request(
        "job-s3",
        model_uri,
        data_uri,
        validation_dataset={"uri": val_uri},
        checkpoint_format="huggingface",
    )
    request["training_config"]["n_epochs"] = 1
    result_uri = f"s3://{bucket}/jobs/job-s3/"
    settings = PipelineSettings(
        cache_dir=tmp_path / "cache", s3_endpoint_url=os.environ["S3_ENDPOINT_URL"]
    )
    package = compile_pipeline(settings, tmp_path / "pipeline.yaml")
    spec = json_format.ParseDict(
        next(yaml.safe_load_all(package.read_text())), pipeline_spec_pb2.PipelineSpec()
    )
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    pipeline_orchestrator.run_local_pipeline(
        spec, pipeline_arguments(request, result_uri=result_uri)
    )

    result = RunResult.from_dict(json.loads(storage.get_bytes(result_uri + "result.json")))
    assert result.status == "completed" and result.dataset_rows == 12
    (ckpt,) = result.checkpoints
    assert ckpt["path"] == f"s3://{bucket}/jobs/job-s3/checkpoints/llama3.2-tiny-sft-0"
    assert math.isfinite(ckpt["training_metrics"]["validation_loss"])
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert storage.exists(f"{ckpt['path']}/{name}") == "file", name
    config = json.loads(storage.get_bytes(f"{ckpt['path']}/config.json"))
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == TINY.vocab_size


def test_the_exit_task_presents_its_token_to_a_handler_checking_callers(
    tmp_path: Path, tiny_model: Path, monkeypatch
) -> None:
    """A local run whose notice goes to the handler under gunicorn with KFP_TRAINER_AUTH=true:
    the exit task gets its pod's token for the handler's audience (TokenRequest) and the
    handler, having the Kubernetes API vouch for it, takes the notice as the runner's."""
    from handler import contract
    from tests.k8s_standin import KubeApiStandin
    from tests.support.gunicorn import Gunicorn
    from tests.support.http_client import ce_headers, curl, header_args

    audience = "kfp-trainer-handler"
    runner = f"system:serviceaccount:{RUNNER[0]}:{RUNNER[1]}"
    requester = ("kfp-trainer", "kfp-trainer-job-requested-oidc-eventing.knative.dev-trigger")
    train = write_rows(tmp_path / "train.jsonl", 8)
    request = make_request("job-auth", str(tiny_model), str(train))
    request["training_config"].update(n_epochs=1, max_steps_per_epoch=1)
    with KubeApiStandin(tmp_path / "api") as api:
        api.grant_token_review("system:serviceaccount:kfp-trainer:kfp-trainer-handler")
        api.grant_token_request(runner, *RUNNER)
        handler_token = tmp_path / "handler-token"
        handler_token.write_text(api.service_account_token("kfp-trainer", "kfp-trainer-handler"))
        handler = Gunicorn(
            {
                "KFP_TRAINER_STATE_DIR": str(tmp_path / "state"),
                "KFP_TRAINER_BACKEND": "hold",  # the job stays queued: this run is the test's
                "KFP_TRAINER_DATA_ROOTS": f"{tmp_path},{tiny_model.parent}",
                "KFP_TRAINER_AUTH": "true",
                "KFP_TRAINER_AUTH_API_URL": api.url,
                "KFP_TRAINER_AUTH_TOKEN_PATH": str(handler_token),
                "KFP_TRAINER_AUTH_CA_PATH": str(api.ca_file),
                "KFP_TRAINER_AUTH_REQUESTERS": "system:serviceaccount:{}:{}".format(*requester),
                "KFP_TRAINER_AUTH_NOTIFIERS": runner,
            },
            tmp_path / "gunicorn.log",
            workers=1,
        )
        try:
            handler.wait_ready()
            hdrs = {
                **ce_headers(contract.JOB_REQUESTED, "r-1", source="/test"),
                "Authorization": "Bearer " + api.service_account_token(*requester, [audience]),
            }
            status, _, body = curl(
                "-X",
                "POST",
                handler.url + "/",
                *header_args(hdrs),
                "--data-binary",
                json.dumps(request),
            )
            assert status == 200, body
            for name, value in pod_env(api, tmp_path / "sa").items():
                monkeypatch.setenv(name, value)  # what the pod's downward API and mounts give
            _run_local(
                request,
                tmp_path / "work",
                tmp_path / "cache",
                result_uri=str(tmp_path / "result"),
                notify_url=handler.url + "/",
                notify_event_type=contract.RUN_FINISHED,
                token_audience=audience,
            )
        finally:
            handler.stop()
    assert RunResult.read(tmp_path / "result" / "result.json").status == "completed"
    (asked,) = api.token_requests
    assert (asked["name"], asked["spec"]["audiences"]) == (RUNNER[1], [audience])
    notice_token = api.reviews[-1]["token"]
    assert api.issuer.verify(notice_token, [audience]).name == RUNNER[1]
    answers = [
        r["status"]
        for r in handler.log_lines()
        if r.get("method") == "POST" and r.get("path") == "/"
    ]
    assert answers == [200, 202], "the notice was admitted (202), not refused (401/403)"
