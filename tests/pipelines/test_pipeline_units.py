"""Fast checks of the pipeline's parts: settings, validation, data, staging, storage, results,
the notice and the compiled spec. Real files, real tar archives, a real HTTP receiver and a moto
S3 server; no KFP run here (see test_pipeline_runs.py). The registry, the tiny model, the chat
format and the checkpoint formats have their own test modules."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipelines import storage
from pipelines.data import DatasetError, read_dataset
from pipelines.result import RunResult
from pipelines.settings import PipelineSettings, SettingsError, TrainerSettings
from pipelines.staging import StagingError, archive_kind, resolve_model_uri, stage_model
from pipelines.validation import check_request
from tests.pipelines.pipeline_helpers import make_request, task_events_config, write_rows
from tests.support.loopback import LoopbackHTTPServer, QuietHandler, closed_port_url
from tests.support.s3 import FaultyS3, boto_client

# ---------------------------------------------------------------- settings


def test_settings_from_env_reads_every_field(tmp_path: Path) -> None:
    s = PipelineSettings.from_env(
        {
            "KFP_TRAINER_BASE_IMAGE": "registry.example/trainer:1",
            "KFP_TRAINER_MEMORY_REQUEST": "8Gi",
            "KFP_TRAINER_MEMORY_LIMIT": "16Gi",
            "KFP_TRAINER_CPU_REQUEST": "4",
            "KFP_TRAINER_ACCELERATOR_TYPE": "amd.com/gpu",
            "KFP_TRAINER_ACCELERATOR_COUNT": "2",
            "KFP_TRAINER_CHECKPOINT_FORMAT": "huggingface",
            "KFP_TRAINER_NODE_SELECTOR": '{"pool": "gpu"}',
            "KFP_TRAINER_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
            "KFP_TRAINER_IMAGE_PULL_SECRETS": "a, b",
            "KFP_TRAINER_MODEL_CACHE_PVC": "models",
            "KFP_TRAINER_S3_SECRET": "creds",
            "S3_ENDPOINT_URL": "http://minio:9000",
            "KFP_TRAINER_CACHE_DIR": str(tmp_path),
            "KFP_TRAINER_COMPILE": "true",
            "KFP_TRAINER_MAX_GRAD_NORM": "0.5",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_SERVICE_NAME": "kfp-trainer-handler",  # the handler's own name stays its own
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer x",  # may be a credential
        }
    )
    assert s.base_image == "registry.example/trainer:1"
    assert (s.memory_request, s.memory_limit, s.cpu_request) == ("8Gi", "16Gi", "4")
    assert (s.accelerator_type, s.accelerator_count) == ("amd.com/gpu", 2)
    assert s.checkpoint_format == "huggingface"
    assert s.node_selector == {"pool": "gpu"}
    assert s.tolerations == ({"key": "gpu", "operator": "Exists"},)
    assert s.image_pull_secrets == ("a", "b")
    assert s.model_cache_pvc == "models" and s.task_cache_dir == "/var/cache/kfp-trainer"
    assert PipelineSettings(cache_dir=tmp_path).task_cache_dir == ""  # pods: scratch cache
    assert s.s3_secret_name == "creds" and s.s3_endpoint_url == "http://minio:9000"
    assert s.cache_dir == tmp_path
    assert s.trainer == TrainerSettings(compile=True, max_grad_norm=0.5)
    assert s.telemetry_env == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }


def test_settings_defaults() -> None:
    s = PipelineSettings.from_env({})
    assert (s.accelerator_type, s.accelerator_count) == ("nvidia.com/gpu", 0)
    assert s.checkpoint_format == "meta" and s.s3_secret_name == "kfp-trainer-s3"
    assert s.trainer == TrainerSettings(compile=False, max_grad_norm=1.0)
    assert TrainerSettings.from_env({"KFP_TRAINER_MAX_GRAD_NORM": "none"}).max_grad_norm is None


@pytest.mark.parametrize(
    "trainer",
    [TrainerSettings(), TrainerSettings(compile=True, max_grad_norm=None)],
    ids=["defaults", "compile-no-clipping"],
)
def test_trainer_settings_reach_the_train_task_as_they_were(trainer: TrainerSettings) -> None:
    assert TrainerSettings.from_env(trainer.task_env()) == trainer


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("KFP_TRAINER_CHECKPOINT_FORMAT", "gguf", r"KFP_TRAINER_CHECKPOINT_FORMAT='gguf'"),
        ("KFP_TRAINER_ACCELERATOR_COUNT", "two", r"KFP_TRAINER_ACCELERATOR_COUNT='two' is not"),
        ("KFP_TRAINER_ACCELERATOR_COUNT", "-1", r"must be >= 0"),
        ("KFP_TRAINER_NODE_SELECTOR", "[1]", r"KFP_TRAINER_NODE_SELECTOR=.*expected a JSON dict"),
        ("KFP_TRAINER_NODE_SELECTOR", "{", r"KFP_TRAINER_NODE_SELECTOR=.*not valid JSON"),
        ("KFP_TRAINER_TOLERATIONS", '[{"colour": 1}]', r"TOLERATIONS\[0\] has unknown fields"),
        ("KFP_TRAINER_COMPILE", "maybe", r"^KFP_TRAINER_COMPILE='maybe': expected true or false$"),
        ("KFP_TRAINER_MAX_GRAD_NORM", "0", r"^KFP_TRAINER_MAX_GRAD_NORM='0': expected a number"),
        ("KFP_TRAINER_MAX_GRAD_NORM", "big", r"MAX_GRAD_NORM='big': expected a number > 0, or"),
    ],
)
def test_settings_errors_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        PipelineSettings.from_env({name: value})


# ---------------------------------------------------------------- request validation


@pytest.fixture
def good_request(tmp_path: Path, tiny_model: Path) -> dict:
    data = write_rows(tmp_path / "train.jsonl", 4)
    return make_request("job-v", str(tiny_model), str(data))


def test_good_request_has_no_problems(good_request: dict) -> None:
    assert check_request(good_request) == []


def _with(request: dict, path: str, value: object) -> dict:
    out = json.loads(json.dumps(request))
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("algorithm_config.rank", 0, r"algorithm_config\.rank: 0 must be >= 1"),
        ("algorithm_config.alpha", "8", r"algorithm_config\.alpha: '8' is not an integer"),
        ("algorithm_config.lora_attn_modules", [], r"lora_attn_modules: must be a non-empty"),
        (
            "algorithm_config.lora_attn_modules",
            ["q_proj", "gate"],
            r"lora_attn_modules: unknown module\(s\) 'gate'; known: q_proj",
        ),
        ("algorithm_config.quantize_base", True, r"quantize_base: QLoRA .* not supported"),
        ("algorithm_config.type", "QAT", r"algorithm_config\.type: 'QAT' .* not supported"),
        (
            "algorithm_config.apply_lora_to_output",
            True,
            r"apply_lora_to_output: not supported for llama3\.2-tiny, whose output projection is "
            r"tied",
        ),
        ("model", "gpt-2", r"model: unknown model 'gpt-2'; known models: .*llama3\.2-tiny"),
        (
            "dataset.uri",
            "/nowhere/train.jsonl",
            r"dataset\.uri: file '/nowhere/train\.jsonl' "
            r"does not exist",
        ),
        ("dataset.uri", "ftp://example.com/x.jsonl", r"dataset\.uri: .* unsupported scheme"),
        ("model_artifact.uri", "/nowhere/model", r"model_artifact\.uri: file '/nowhere/model'"),
        ("training_config.n_epochs", 0, r"training_config\.n_epochs: 0 must be >= 1"),
        ("training_config.data_config.batch_size", 0, r"data_config\.batch_size: 0 must be"),
        (
            "training_config.data_config.data_format",
            "chat",
            r"data_config\.data_format: 'chat' is not one of instruct, dialog",
        ),
        ("training_config.data_config.packed", True, r"data_config\.packed: .* not supported"),
        (
            "training_config.optimizer_config.optimizer_type",
            "lion",
            r"optimizer_type: 'lion' is not one of adam, adamw, sgd",
        ),
        ("training_config.optimizer_config.lr", 0, r"optimizer_config\.lr: 0 must be a number > 0"),
        ("training_config.dtype", "int8", r"training_config\.dtype: 'int8' is not one of"),
        ("training_config.data_config", _DELETE, r"training_config\.data_config: is required"),
        ("checkpoint_format", "gguf", r"checkpoint_format: 'gguf' is not one of meta, huggingface"),
    ],
)
def test_each_bad_config_names_its_field(
    good_request: dict, path: str, value: object, message: str
) -> None:
    problems = check_request(_with(good_request, path, value))
    assert any(__import__("re").search(message, p) for p in problems), problems


def test_validation_reports_every_problem_at_once(good_request: dict) -> None:
    bad = _with(_with(good_request, "algorithm_config.rank", 0), "model", "nope")
    problems = check_request(bad)
    assert len(problems) == 2 and problems[0].startswith("model:")


# ---------------------------------------------------------------- dataset rows


def test_instruct_and_dialog_rows_read(tmp_path: Path) -> None:
    rows = read_dataset(write_rows(tmp_path / "i.jsonl", 3, "instruct"), "instruct")
    assert [t.role for t in rows[0]] == ["user", "assistant"]
    assert rows[2][1].content == "2 plus 2 is 4."
    rows = read_dataset(write_rows(tmp_path / "d.jsonl", 2, "dialog"), "dialog")
    assert rows[1][0].content == "What is 1 plus 1?"


@pytest.mark.parametrize(
    ("line", "fmt", "message"),
    [
        (
            {"dialog": "[]"},
            "instruct",
            r"line 2: missing field 'chat_completion_input'; data_format 'instruct' needs "
            r"chat_completion_input and expected_answer \(row has: dialog\)",
        ),
        (
            {"chat_completion_input": "[]", "expected_answer": "x"},
            "dialog",
            r"line 2: missing field 'dialog'",
        ),
        (
            {"chat_completion_input": "not json", "expected_answer": "x"},
            "instruct",
            r"line 2: chat_completion_input is not valid JSON",
        ),
        (
            {
                "chat_completion_input": json.dumps([{"role": "user", "content": "a"}] * 2),
                "expected_answer": "x",
            },
            "instruct",
            r"exactly one user message, got 2",
        ),
        (
            {
                "chat_completion_input": json.dumps([{"role": "user", "content": "a"}]),
                "expected_answer": 3,
            },
            "instruct",
            r"expected_answer must be a string",
        ),
        (
            {
                "dialog": json.dumps(
                    [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
                )
            },
            "dialog",
            r"dialog must start with a user message",
        ),
        (
            {
                "dialog": json.dumps(
                    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
                )
            },
            "dialog",
            r"dialog has no assistant message",
        ),
        (
            {
                "dialog": json.dumps(
                    [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]
                )
            },
            "dialog",
            r"dialog\[1\]: role 'robot' is not one of",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(
    tmp_path: Path, line: dict, fmt: str, message: str
) -> None:
    path = write_rows(tmp_path / "data.jsonl", 1, fmt)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset(path, fmt)
    assert str(info.value).startswith("dataset data.jsonl line 2: ")


def test_empty_dataset_says_zero_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetError, match=r"empty\.jsonl' has 0 rows"):
        read_dataset(path, "instruct")


# ---------------------------------------------------------------- staging


def _hostile(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("model/params.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        member.size = len(data) if member.isreg() else 0
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


HOSTILE = {
    "absolute": (_member("/tmp/evil"), r"member '/tmp/evil' has an absolute path"),
    "dotdot": (_member("../evil"), r"member '\.\./evil' escapes the destination"),
    "nested-dotdot": (_member("model/../../evil"), r"member 'model/\.\./\.\./evil' escapes"),
    "symlink-absolute": (
        _member("model/passwd", tarfile.SYMTYPE, "/etc/passwd"),
        r"member 'model/passwd' is a symlink to absolute path '/etc/passwd'",
    ),
    "symlink-outside": (
        _member("model/up", tarfile.SYMTYPE, "../../outside"),
        r"member 'model/up' is a symlink pointing outside \('\.\./\.\./outside'\)",
    ),
    "hardlink-outside": (
        _member("model/hard", tarfile.LNKTYPE, "../outside"),
        r"member 'model/hard' is a hard link pointing outside",
    ),
    "char-device": (_member("model/null", tarfile.CHRTYPE), r"'model/null' is a device file"),
    "block-device": (_member("model/sda", tarfile.BLKTYPE), r"'model/sda' is a device file"),
    "fifo": (_member("model/pipe", tarfile.FIFOTYPE), r"'model/pipe' is a FIFO"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_member_is_refused(tmp_path: Path, kind: str) -> None:
    member, message = HOSTILE[kind]
    archive = _hostile(tmp_path / f"{kind}.tar.gz", member, b"x")
    cache = tmp_path / "cache"
    with pytest.raises(StagingError, match=message):
        stage_model(archive, cache)
    # Nothing half-extracted stays where a later job would find it.
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".digests")] == []
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_symlink_inside_the_archive_is_fine(tmp_path: Path) -> None:
    archive = _hostile(
        tmp_path / "ok.tar.gz", _member("model/alias.json", tarfile.SYMTYPE, "params.json")
    )
    root = stage_model(archive, tmp_path / "cache")
    assert (root / "alias.json").read_text() == "{}"


@pytest.mark.parametrize("damage", ["truncated", "garbage-gzip", "not-an-archive"])
def test_corrupt_archive_is_refused_by_name(
    tmp_path: Path, model_archives: dict[str, Path], damage: str
) -> None:
    bad = tmp_path / "bad.tar.gz"
    if damage == "truncated":
        data = model_archives["tar.gz"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        message = r"model archive '.*bad\.tar\.gz' (is corrupt or truncated|cannot be read)"
    elif damage == "garbage-gzip":
        bad.write_bytes(b"\x1f\x8b" + b"\x00garbage" * 100)
        message = r"model archive '.*bad\.tar\.gz' (is corrupt or truncated|cannot be read)"
    else:
        bad.write_text("just text, not a tar\n" * 50)
        message = r"'.*bad\.tar\.gz' is neither a directory, a tar nor a tar\.gz archive"
    cache = tmp_path / "cache"
    with pytest.raises(StagingError, match=message):
        stage_model(bad, cache)
    assert not any(p.name.startswith(".tmp-") for p in cache.glob("*")) if cache.exists() else True


def test_archives_are_told_apart_by_content(
    tiny_model: Path, model_archives: dict[str, Path]
) -> None:
    assert archive_kind(tiny_model) == "dir"
    assert archive_kind(model_archives["tar"]) == "tar"
    assert archive_kind(model_archives["tar.gz"]) == "tar.gz"
    assert archive_kind(model_archives["misnamed"]) == "tar"


def test_staging_caches_by_content_digest(
    tmp_path: Path, tiny_model: Path, model_archives: dict[str, Path]
) -> None:
    cache = tmp_path / "cache"
    first = stage_model(model_archives["tar.gz"], cache)
    assert (first / "consolidated.00.pth").read_bytes() == (
        tiny_model / "consolidated.00.pth"
    ).read_bytes()
    (first / "sentinel").write_text("kept")
    again = stage_model(model_archives["tar.gz"], cache)
    assert again == first and (again / "sentinel").read_text() == "kept"
    # Same bytes under another name: the same entry (content, not name, is the key).
    copy = tmp_path / "copy.bin"
    copy.write_bytes(model_archives["tar.gz"].read_bytes())
    assert stage_model(copy, cache) == first
    assert stage_model(tiny_model, cache) == tiny_model  # directories are used in place


def test_resolve_model_uri_in_a_local_store(tmp_path: Path, model_archives: dict) -> None:
    store = tmp_path / "store"
    (store / "llama3.2-tiny").mkdir(parents=True)
    assert resolve_model_uri("llama3.2-tiny", str(store)) == f"{store}/llama3.2-tiny"
    (store / "Llama3.2-1B-Instruct.tar.gz").write_bytes(b"x")
    assert resolve_model_uri("Llama3.2-1B-Instruct", str(store)).endswith(".tar.gz")
    with pytest.raises(
        StagingError,
        match=r"model 'Llama3.1-8B-Instruct' not found in model "
        r"store .*; tried: .*Llama3\.1-8B-Instruct, .*\.tar, .*\.tar\.gz",
    ):
        resolve_model_uri("Llama3.1-8B-Instruct", str(store))


# ---------------------------------------------------------------- storage (moto server)


def test_s3_fetch_publish_round_trip(tmp_path: Path, bucket: str, tiny_model: Path) -> None:
    uri = f"s3://{bucket}/models/llama3.2-tiny"
    assert storage.publish(tiny_model, uri) == uri
    assert storage.exists(uri) == "dir"
    assert storage.exists(uri + "/params.json") == "file"
    assert storage.exists(f"s3://{bucket}/models/none") is None
    got = storage.fetch(uri, tmp_path / "dl")
    assert got == tmp_path / "dl" / "llama3.2-tiny"
    for f in tiny_model.iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes()
    one = storage.fetch(uri + "/params.json", tmp_path / "one")
    assert one.read_bytes() == (tiny_model / "params.json").read_bytes()
    assert storage.fingerprint(uri) == storage.fingerprint(uri)
    storage.put_bytes(b'{"a": 1}', f"s3://{bucket}/x.json")
    assert storage.get_bytes(f"s3://{bucket}/x.json") == b'{"a": 1}'
    with pytest.raises(storage.StorageError, match=r"'s3://.*/nothing-here': no such object"):
        storage.fetch(f"s3://{bucket}/nothing-here", tmp_path / "dl2")


def test_resolve_model_uri_in_an_s3_store(bucket: str, model_archives: dict) -> None:
    storage.publish(model_archives["tar.gz"], f"s3://{bucket}/store/llama3.2-tiny.tar.gz")
    assert (
        resolve_model_uri("llama3.2-tiny", f"s3://{bucket}/store")
        == f"s3://{bucket}/store/llama3.2-tiny.tar.gz"
    )
    with pytest.raises(StagingError, match=r"not found in model store 's3://"):
        resolve_model_uri("Llama3.2-3B-Instruct", f"s3://{bucket}/store")


# S3 answers that mean "not now": the same call may work later.
TRANSIENT_S3 = [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")]


@pytest.mark.parametrize(("status", "code"), TRANSIENT_S3, ids=[c for _, c in TRANSIENT_S3])
def test_s3_not_now_answers_are_storage_unavailable(tmp_path: Path, status: int, code: str) -> None:
    with FaultyS3(status, code) as s3:
        client = boto_client(s3.url)
        calls = {
            "exists": lambda: storage.exists("s3://b/models/m", client),
            "fetch": lambda: storage.fetch("s3://b/models/m.tar", tmp_path / "dl", client),
            "get_bytes": lambda: storage.get_bytes("s3://b/x.json", client),
            "put_bytes": lambda: storage.put_bytes(b"{}", "s3://b/x.json", client),
            "publish": lambda: storage.publish(tmp_path, "s3://b/up", client),
            "fingerprint": lambda: storage.fingerprint("s3://b/models/m", client),
        }
        (tmp_path / "f.txt").write_text("x")
        for name, call in calls.items():
            with pytest.raises(storage.StorageUnavailable, match=r"s3://b/.*retry later") as err:
                call()
            assert isinstance(err.value, ConnectionError), name  # callers can tell, no import
            assert isinstance(err.value, storage.StorageError), name
        assert s3.requests >= len(calls)
    assert list((tmp_path / "dl").iterdir()) == []  # no partial download left behind


def test_unreachable_s3_is_storage_unavailable(tmp_path: Path) -> None:
    client = boto_client(closed_port_url())
    with pytest.raises(storage.StorageUnavailable, match="EndpointConnectionError"):
        storage.exists("s3://b/models/m", client)
    with pytest.raises(storage.StorageUnavailable, match=r"s3://b/m\.tar.*retry later"):
        storage.fetch("s3://b/m.tar", tmp_path, client)


class StalledS3:
    """Accepts connections and never answers: an S3 whose PUT hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_the_train_tasks_s3_client_is_bounded_as_the_handlers_is(monkeypatch) -> None:
    """botocore's defaults (60 s connect, 60 s read, 5 attempts) held a task on a stalled PUT
    for minutes; both clients give up after 5 s connect / 30 s read, 3 attempts."""
    from handler.remote import s3 as handler_s3
    from handler.settings import RemoteSettings

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    task = storage.s3_client({"S3_ENDPOINT_URL": closed_port_url()})._client_config
    handler = handler_s3.s3_client(RemoteSettings(s3_endpoint_url=closed_port_url()))
    for config in (task, handler._client_config):
        assert (config.connect_timeout, config.read_timeout) == (5.0, 30.0)
        assert config.retries["total_max_attempts"] == 3

    stalled = StalledS3()
    try:
        bounds = storage.S3Bounds(connect_timeout_s=1, read_timeout_s=0.5, max_attempts=2)
        client = storage.s3_client({"S3_ENDPOINT_URL": stalled.url}, bounds)
        started = time.monotonic()
        with pytest.raises(storage.StorageUnavailable, match=r"s3://b/x\.json.*ReadTimeout"):
            storage.put_bytes(b"{}", "s3://b/x.json", client)
        assert time.monotonic() - started < 10
        assert len(stalled.accepted) == 2  # the attempts, and no more
    finally:
        stalled.close()


@pytest.mark.parametrize(("status", "code"), [(403, "AccessDenied"), (403, "InvalidAccessKeyId")])
def test_s3_refusals_are_permanent_storage_errors(status: int, code: str) -> None:
    with FaultyS3(status, code) as s3:
        client = boto_client(s3.url)
        with pytest.raises(storage.StorageError) as err:
            storage.get_bytes("s3://b/x.json", client)
        assert not isinstance(err.value, storage.StorageUnavailable | ConnectionError)
        assert f"cannot read 's3://b/x.json': {code}" in str(err.value)
        assert s3.requests == 1  # not retried: asking again changes nothing


def test_resolve_model_uri_tells_not_now_from_no(
    monkeypatch: pytest.MonkeyPatch, s3_env: dict, bucket: str
) -> None:
    """A store that does not answer is transient (StorageUnavailable); a missing bucket is not."""
    with pytest.raises(
        StagingError,
        match=r"cannot look up model 'llama3\.2-tiny' in model store 's3://no-such-bucket-x/m': "
        r"cannot list .*NoSuchBucket",
    ):
        resolve_model_uri("llama3.2-tiny", "s3://no-such-bucket-x/m")
    with FaultyS3(503, "SlowDown") as s3:
        monkeypatch.setenv("S3_ENDPOINT_URL", s3.url)
        with pytest.raises(
            storage.StorageUnavailable,
            match=r"cannot look up model 'llama3\.2-tiny' in model store 's3://b/m': .*503",
        ):
            resolve_model_uri("llama3.2-tiny", "s3://b/m")
    monkeypatch.setenv("S3_ENDPOINT_URL", closed_port_url())
    with pytest.raises(ConnectionError, match="retry later"):
        resolve_model_uri("llama3.2-tiny", "s3://b/m")


def test_local_fetch_is_in_place_and_publish_copies(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("a")
    assert storage.fetch(str(f), tmp_path / "x") == f
    assert storage.fetch(f"file://{f}", tmp_path / "x") == f
    storage.publish(f, str(tmp_path / "b" / "b.txt"))
    assert (tmp_path / "b" / "b.txt").read_text() == "a"


# ---------------------------------------------------------------- result


def test_run_result_round_trip(tmp_path: Path) -> None:
    r = RunResult(
        job_uuid="j",
        status="completed",
        checkpoints=[{"identifier": "c"}],
        metrics=[{"epoch": 0}],
        resources_allocated={"device": "cpu"},
        dataset_rows=3,
    )
    assert RunResult.read(r.write(tmp_path / "r.json")) == r
    with pytest.raises(ValueError, match="unknown RunResult fields: extra"):
        RunResult.from_dict({**r.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="status 'done'"):
        RunResult(job_uuid="j", status="done")  # type: ignore[arg-type]


# ---------------------------------------------------------------- notify


class _Receiver(QuietHandler):
    got: list = []
    status = 202
    first: list = []  # statuses to answer before ``status``, in order

    def do_POST(self) -> None:  # noqa: N802
        body = self.read_body()
        cls = type(self)
        cls.got.append((dict(self.headers), json.loads(body)))
        self.send_response(cls.first.pop(0) if cls.first else cls.status)
        self.end_headers()


@pytest.fixture
def receiver():
    class Handler(_Receiver):
        got: list = []
        first: list = []

    with LoopbackHTTPServer(Handler) as server:
        yield f"{server.url}/notify", Handler


def test_notice_is_a_binary_cloudevent(receiver) -> None:
    from pipelines.notify import post_run_finished

    url, handler = receiver
    assert post_run_finished(url, "io.example.run.finished", "job-9", "run-1", "FAILED", "boom")
    headers, body = handler.got[0]
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["ce-type"] == "io.example.run.finished"
    assert lower["ce-id"] == "job-9/run.finished"
    assert lower["ce-subject"] == "job-9" and lower["ce-source"] == "kfp-pipeline"
    assert lower["ce-specversion"] == "1.0"
    assert body == {"job_uuid": "job-9", "run_id": "run-1", "state": "FAILED", "error": "boom"}


def test_notice_gives_up_quietly_when_nobody_listens() -> None:
    from pipelines.notify import post_run_finished

    started = time.monotonic()
    assert not post_run_finished(
        "http://127.0.0.1:9/none", "t", "j", "", "SUCCEEDED", None, window_s=1, timeout_s=1
    )
    assert time.monotonic() - started < 5
    assert not post_run_finished("", "t", "j", "", "SUCCEEDED", None)


def test_notice_is_retried_until_the_receiver_takes_it(receiver) -> None:
    """A handler being replaced answers 503 (or nothing) for a while: the notice waits it out."""
    from pipelines.notify import post_run_finished

    url, handler = receiver
    handler.first = [503, 404]
    assert post_run_finished(url, "t", "job-r", "run-1", "SUCCEEDED", None, window_s=30)
    assert len(handler.got) == 3


def test_notice_refused_for_good_is_not_retried(receiver) -> None:
    from pipelines.notify import post_run_finished

    url, handler = receiver
    handler.status = 400
    started = time.monotonic()
    assert not post_run_finished(url, "t", "job-r", "run-1", "SUCCEEDED", None, window_s=30)
    assert len(handler.got) == 1 and time.monotonic() - started < 5


# ---------------------------------------------------------------- compiled spec


def test_compiled_spec_carries_the_settings(tmp_path: Path) -> None:
    from pipelines.pipeline import compile_pipeline

    settings = PipelineSettings(
        base_image="registry.example/trainer:7",
        memory_request="8Gi",
        memory_limit="16Gi",
        cpu_request="2",
        accelerator_type="nvidia.com/gpu",
        accelerator_count=1,
        node_selector={"pool": "gpu"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        image_pull_secrets=("pull",),
        model_cache_pvc="model-cache",
        s3_secret_name="s3-creds",
        s3_endpoint_url="http://minio:9000",
        trainer=TrainerSettings(compile=True, max_grad_norm=2.0),
        telemetry_env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
    )
    docs = list(yaml.safe_load_all(compile_pipeline(settings, tmp_path / "p.yaml").read_text()))
    spec, platform = docs[0], docs[1]
    assert spec["pipelineInfo"]["name"] == "llama-stack-lora-finetune"
    tasks = spec["root"]["dag"]["tasks"]
    assert "notify" in tasks and tasks["notify"]["triggerPolicy"]["strategy"] == (
        "ALL_UPSTREAM_TASKS_COMPLETED"
    )
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert "train" in inner
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in (
        "job_uuid",
        "request_json",
        "model_uri",
        "dataset_uri",
        "validation_dataset_uri",
        "checkpoint_format",
        "progress_path",
        "result_uri",
        "notify_url",
        "notify_event_type",
        "notify_window_s",
    ):
        assert name in params, name
    assert params["notify_window_s"]["defaultValue"] == 300.0
    assert params["cache_dir"]["defaultValue"] == "/var/cache/kfp-trainer"
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.example/trainer:7"
    assert "pip install" not in " ".join(train["command"])
    res = train["resources"]
    assert res["resourceMemoryRequest"] == "8Gi" and res["resourceMemoryLimit"] == "16Gi"
    assert res["resourceCpuRequest"] == "2"
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert res["accelerator"]["resourceCount"] == "1"
    assert {"name": "S3_ENDPOINT_URL", "value": "http://minio:9000"} in train["env"]
    assert {"name": "KFP_TRAINER_COMPILE", "value": "true"} in train["env"]
    assert {"name": "KFP_TRAINER_MAX_GRAD_NORM", "value": "2.0"} in train["env"]
    notify = spec["deploymentSpec"]["executors"]["exec-notify"]["container"]
    for container in (train, notify):  # both tasks' spans go where the handler's go
        assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4318"} in (
            container["env"]
        )
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["secretAsEnv"][0]["secretName"] == "s3-creds"
    assert {e["envVar"] for e in k8s["secretAsEnv"][0]["keyToEnv"]} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    assert k8s["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["pvcMount"][0]["mountPath"] == "/var/cache/kfp-trainer"
    assert k8s["imagePullSecret"][0]["secretName"] == "pull"


def test_pipeline_arguments_carry_uris_not_rows(tmp_path: Path, tiny_model: Path) -> None:
    from pipelines.pipeline import pipeline_arguments

    data = write_rows(tmp_path / "train.jsonl", 50)
    request = make_request(
        "job-a",
        str(tiny_model),
        str(data),
        validation_dataset={"uri": str(data)},
        checkpoint_format="huggingface",
    )
    args = pipeline_arguments(
        request,
        result_uri="s3://b/jobs/job-a/",
        notify_url="http://x",
        notify_event_type="t",
        notify_window_s=60,
    )
    assert args["notify_window_s"] == 60.0
    assert args["dataset_uri"] == str(data) and args["validation_dataset_uri"] == str(data)
    assert args["model_uri"] == str(tiny_model) and args["checkpoint_format"] == "huggingface"
    assert "plus" not in json.dumps(args)  # no row content anywhere in the parameters
    config = json.loads(args["request_json"])
    assert config["dataset"] == {} and "uri" not in config["model_artifact"]
    assert config["algorithm_config"] == request["algorithm_config"]
    with pytest.raises(ValueError, match="no model_artifact.uri"):
        pipeline_arguments({**request, "model_artifact": {}})


# ---------------------------------------------------------------- the train task's checks


def _train_task(tmp_path: Path, request: dict, **kw: str) -> dict:
    from pipelines.component_impl import run_train
    from pipelines.pipeline import pipeline_arguments

    args = pipeline_arguments(request, result_uri=str(tmp_path / "result"))
    return run_train(
        job_uuid=args["job_uuid"],
        request_json=args["request_json"],
        model_uri=args["model_uri"],
        dataset_uri=args["dataset_uri"],
        validation_dataset_uri=args["validation_dataset_uri"],
        result_uri=args["result_uri"],
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def test_train_task_refuses_a_uri_outside_its_roots_before_opening_it(
    tmp_path: Path, tiny_model: Path
) -> None:
    import os

    from pipelines.component_impl import TrainingFailed
    from pipelines.roots import Roots

    fifo = tmp_path / "outside" / "train.jsonl"  # opening a FIFO would hang this test
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    request = make_request("job-roots", str(tiny_model), str(fifo))
    roots = Roots.of([str(tmp_path / "state"), str(tiny_model.parent)])
    with pytest.raises(
        TrainingFailed, match=r"^dataset\.uri: '.*/outside/train\.jsonl' is outside"
    ):
        _train_task(tmp_path, request, allowed_roots=roots.to_json())


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (
            {"rows": 7},
            r"^dataset\.rows: the request says 7 rows, dataset 'train\.jsonl' \(/.*/train\.jsonl\) "
            r"has 5$",
        ),
        (
            {"sha256": "0" * 64, "dataset_id": "my-set"},
            r"^dataset\.sha256: dataset 'my-set' \(/.*/train\.jsonl\) has sha256 [0-9a-f]{64}, "
            r"the request says 0{64}$",
        ),
    ],
)
def test_train_task_checks_the_dataset_against_the_request(
    tmp_path: Path, tiny_model: Path, ref: dict, message: str
) -> None:
    from pipelines.component_impl import TrainingFailed

    data = write_rows(tmp_path / "train.jsonl", 5)
    request = make_request("job-ref", str(tiny_model), str(data), dataset={"uri": str(data), **ref})
    with pytest.raises(TrainingFailed, match=message):
        _train_task(tmp_path, request)
    failed = RunResult.read(tmp_path / "result" / "result.json")
    assert (
        failed.status == "failed" and failed.error and __import__("re").match(message, failed.error)
    )


def test_train_task_checks_the_model_archive_digest(
    tmp_path: Path, model_archives: dict[str, Path]
) -> None:
    import hashlib

    from pipelines.component_impl import TrainingFailed

    archive = model_archives["tar.gz"]
    data = write_rows(tmp_path / "train.jsonl", 5)
    bad = make_request(
        "job-sha", str(archive), str(data), model_artifact={"uri": str(archive), "sha256": "f" * 64}
    )
    with pytest.raises(
        TrainingFailed,
        match=r"model_artifact\.sha256: .*tiny\.tar\.gz' has "
        r"sha256 [0-9a-f]{64}, the request says f{64}",
    ):
        _train_task(tmp_path, bad)
    good_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    ok = make_request(
        "job-sha",
        str(archive),
        str(data),
        model_artifact={"uri": str(archive), "sha256": good_sha},
        dataset={"uri": str(data), "rows": 5},
    )
    ok["training_config"].update(n_epochs=1, max_steps_per_epoch=1)
    assert _train_task(tmp_path, ok)["status"] == "completed"


# ---------------------------------------------------------------- recipe options (in-process)


@pytest.mark.parametrize(
    ("algo", "training", "fmt", "dtype"),
    [
        (
            {
                "use_dora": True,
                "apply_lora_to_mlp": True,
                "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
            },
            {"optimizer_type": "adam"},
            "instruct",
            "bf16",
        ),
        ({"apply_lora_to_mlp": False}, {"optimizer_type": "sgd", "lr": 0.05}, "dialog", "fp16"),
    ],
)
def test_recipe_options_train(
    tmp_path: Path, tiny_model: Path, algo: dict, training: dict, fmt: str, dtype: str
) -> None:
    import math

    from pipelines.recipe import run_recipe

    data = write_rows(tmp_path / "d.jsonl", 10, fmt)
    request = make_request("job-opt", str(tiny_model), str(data))
    request["algorithm_config"].update(algo)
    request["training_config"]["optimizer_config"].update(training)
    request["training_config"]["data_config"].update(data_format=fmt, train_on_input=True)
    request["training_config"].update(
        dtype=dtype, n_epochs=1, gradient_accumulation_steps=1, max_steps_per_epoch=None
    )
    request["training_config"]["efficiency_config"] = {"enable_activation_checkpointing": True}
    progress: list[dict] = []
    result = run_recipe(
        request,
        model_dir=tiny_model,
        dataset_path=data,
        validation_path=None,
        output_dir=tmp_path / "out",
        checkpoint_format="huggingface",
        progress=progress.append,
    )
    assert result.status == "completed" and result.dataset_rows == 10
    assert [p["step"] for p in progress] == [1, 2, 3]  # ceil(10 rows / batch 4)
    assert all(math.isfinite(p["loss"]) for p in progress)
    # fp16 is not trained as such (no loss scaling), nor bf16 on a CPU without native bf16
    # (no AVX512-BF16 or AMX): the run says what it used instead.
    import torch

    caps = torch.cpu.get_capabilities()
    bf16_here = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    used = dtype if dtype == "bf16" and bf16_here else "fp32"
    assert result.resources_allocated["dtype"] == used
    assert result.resources_allocated["requested_dtype"] == dtype
    adapter = json.loads(
        (tmp_path / "out" / "llama3.2-tiny-sft-0" / "adapter" / "adapter_config.json").read_text()
    )
    assert adapter["use_dora"] is bool(algo.get("use_dora"))
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0


def test_task_events_are_throttled_the_last_step_is_sent_and_ids_follow_the_contract(tmp_path):
    """The train task's own events (remote): job.started once, job.progress at most once per
    interval with the newest step winning, the last step sent on close, progress.json kept."""
    from handler import contract
    from pipelines.task_events import TaskEvents, TaskEventsConfig
    from tests.support.sink import Sink

    with Sink() as sink:
        config = task_events_config(
            sink.url, "te-1", interval_s=0.5, progress_uri=str(tmp_path / "progress.json")
        )
        events = TaskEvents(TaskEventsConfig.from_json(config.to_json()), "te-1", "run-1")
        events.started()
        began = time.monotonic()
        for step in range(1, 41):
            events.progress({"step": step, "total_steps": 40, "epoch": 0, "loss": 1.0 / step})
            time.sleep(0.02)
        elapsed = time.monotonic() - began
        events.close()
    types = [e["type"] for e in sink.events]
    assert types[0] == contract.JOB_STARTED and types.count(contract.JOB_STARTED) == 1
    progress = [e for e in sink.events if e["type"] == contract.JOB_PROGRESS]
    # one per 0.5 s over the loop (0.8 s at least, longer on a loaded machine), the first at
    # once and the last on close
    most = int(elapsed / 0.5) + 2
    assert 2 <= len(progress) <= most, ([e["id"] for e in progress], elapsed)
    assert progress[-1]["id"] == contract.event_id("te-1", contract.JOB_PROGRESS, 40)
    for event in sink.events:
        contract.validate_data(event["type"], event["data"])
        assert event["source"] == "/kfp-trainer/handler" and event["data"]["run_id"] == "run-1"
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 40
    assert TaskEventsConfig.from_json("") is None
    with pytest.raises(ValueError, match="task_events parameter is not a TaskEventsConfig"):
        TaskEventsConfig.from_json('{"url": "x"}')
