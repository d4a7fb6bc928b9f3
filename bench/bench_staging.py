"""What a fine-tune call costs as the dataset grows (run by hand, not a test).

Through a real ``llama stack run`` (the project's run.yaml, localfs datasetio, the in-process
handler with the ``hold`` backend, so nothing trains and disturbs the timing), for CSV datasets
of 10k, 100k and 1M rows, each way a dataset can reach the trainer, in one run:

  file       ours: a local CSV outside the allowed roots, read here and staged page by page
  datasetio  ours: the same CSV through datasetio ``iterrows`` in growing pages, past the
             ceiling while a call's fixed cost dominates (provider.staging.Pacing; localfs
             re-reads the file per call) (KFP_TRAINER_DATASET_READER=datasetio)
  baseline   llama-stack's own approach: one ``iterrows(limit=-1)`` into memory, then staged
             (KFP_TRAINER_DATASET_READER=datasetio, KFP_TRAINER_PAGE_SIZE=-1)
  by-ref     the CSV inside KFP_TRAINER_DATA_ROOTS: passed by reference, nothing staged (the
             trainer's own read of it, pipelines.data.normalize, is timed in this process)

For each: the call's time, the time from the call until the dataset is ready for training
(staged and job.requested accepted), rows/s, and the provider's peak RSS growth (a fresh server
per measurement; /proc/<pid>/clear_refs resets the peak after a small warm-up job, VmHWM reads
it). Goals: the call < 1 s at every size; file staging of 1M rows <= 10x the time of 100k; at
least the baseline's speed at 1M; peak RSS growth <= 2x the CSV's size.

    .venv/bin/python bench/bench_staging.py [--sizes 10000,100000,1000000] [--ways file,...]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.data import normalize  # noqa: E402
from provider.launcher import StackServer  # noqa: E402
from tests.support.jobs import lora, make_tiny_model, training_config  # noqa: E402

WAYS = {
    "file": {},
    "datasetio": {"KFP_TRAINER_DATASET_READER": "datasetio"},
    "baseline": {"KFP_TRAINER_DATASET_READER": "datasetio", "KFP_TRAINER_PAGE_SIZE": "-1"},
    "by-ref": {},
}
POLL_S = 0.02
TIMEOUT_S = 3600.0


def write_csv(path: Path, rows: int) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["chat_completion_input", "expected_answer"])
        for i in range(rows):
            question = json.dumps([{"role": "user", "content": f"What is {i} plus {i % 97}?"}])
            writer.writerow([question, f"{i + i % 97}"])
    return path


def _status_file(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _client(server: StackServer):
    from provider.client import connect

    return connect(server.url, timeout=TIMEOUT_S)


def _fine_tune(client, job_uuid: str, dataset_id: str) -> float:
    started = time.perf_counter()
    client.with_options(max_retries=0).post_training.supervised_fine_tune(
        job_uuid=job_uuid,
        model="llama3.2-tiny",
        training_config=training_config(dataset_id, steps=1),
        algorithm_config=lora(),
        hyperparam_search_config={},
        logger_config={},
    )
    return time.perf_counter() - started


def _ready(client, job_uuid: str, started: float) -> tuple[float, dict]:
    """Seconds from ``started`` until the job left staging and submitting."""
    while time.perf_counter() - started < TIMEOUT_S:
        status = client.post_training.job.status(job_uuid=job_uuid).to_dict()
        if status["status"] == "failed":
            raise RuntimeError(f"{job_uuid} failed: {status['error']}")
        if status["progress"]["phase"] not in ("staging", "submitting"):
            return time.perf_counter() - started, status
        time.sleep(POLL_S)
    raise TimeoutError(f"{job_uuid} not ready after {TIMEOUT_S} s")


def measure(way: str, rows: int, csv_path: Path, work: Path, models: Path) -> dict:
    """One fresh server, a warm-up job, then the measured job."""
    data_root = work / "data"
    state = work / f"state-{way}-{rows}"
    server = StackServer(
        {
            "KFP_TRAINER_STATE_DIR": str(state),
            "KFP_TRAINER_MODEL_STORE": str(models),
            "KFP_TRAINER_DATA_ROOTS": str(data_root),
            "KFP_TRAINER_BACKEND": "hold",  # accepted, never trained: staging alone is timed
            **WAYS[way],
        },
        work,
    )
    server.start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        client = _client(server)
        warm = write_csv(work / "warm.csv", 50)
        client.datasets.register(
            purpose="post-training/messages",
            source={"type": "uri", "uri": str(warm)},
            dataset_id="warm",
        )
        _fine_tune(client, "warm", "warm")
        _ready(client, "warm", time.perf_counter())
        source = data_root / csv_path.name if way == "by-ref" else csv_path
        if way == "by-ref":
            data_root.mkdir(exist_ok=True)
            shutil.copyfile(csv_path, source)
        client.datasets.register(
            purpose="post-training/messages",
            source={"type": "uri", "uri": str(source)},
            dataset_id="measured",
        )
        time.sleep(0.5)
        reset = _reset_peak(pid)
        before = _status_file(pid)
        started = time.perf_counter()
        call_s = _fine_tune(client, "measured", "measured")
        ready_s, status = _ready(client, "measured", started)
        after = _status_file(pid)
        delivery = status["datasets"]["dataset"]["delivery"]
        if way == "by-ref":
            assert delivery == "by_reference", status
            read_started = time.perf_counter()
            read = normalize(source, "csv", "instruct", work / "read.jsonl", dataset="measured")
            trainer_read_s = time.perf_counter() - read_started
            assert read.rows == rows
        else:
            assert delivery == "staged" and status["dataset_rows"] == rows, status
            trainer_read_s = None
        return {
            "way": way,
            "rows": rows,
            "csv_bytes": csv_path.stat().st_size,
            "call_s": call_s,
            "ready_s": ready_s,
            "rows_per_s": rows / ready_s,
            "rss_growth": max(0, after["VmHWM"] - before["VmRSS"]) if reset else None,
            "trainer_read_s": trainer_read_s,
        }
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--ways", default=",".join(WAYS))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ways = args.ways.split(",")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-staging-") as tmp:
        work = Path(tmp)
        models = work / "models"
        make_tiny_model(models / "llama3.2-tiny")
        for rows in sizes:
            path = write_csv(work / f"rows-{rows}.csv", rows)
            for way in ways:
                result = measure(way, rows, path, work, models)
                results.append(result)
                print(json.dumps(result), flush=True)
            path.unlink()

    print()
    print(
        "| rows | CSV MB | way | call s | ready s | rows/s | peak RSS growth MB | RSS/CSV | "
        "trainer read s |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = "n/a" if r["rss_growth"] is None else f"{r['rss_growth'] / r['csv_bytes']:.2f}"
        read = "" if r["trainer_read_s"] is None else f"{r['trainer_read_s']:.2f}"
        print(
            f"| {r['rows']:,} | {_mb(r['csv_bytes'])} | {r['way']} | {r['call_s']:.3f} | "
            f"{r['ready_s']:.2f} | {r['rows_per_s']:,.0f} | {_mb(r['rss_growth'])} | {ratio} | "
            f"{read} |"
        )

    by = {(r["way"], r["rows"]): r for r in results}
    print()
    calls = [r["call_s"] for r in results]
    print(f"call < 1 s at every size: {max(calls) < 1.0} (slowest {max(calls):.3f} s)")
    if ("file", 100_000) in by and ("file", 1_000_000) in by:
        ratio = by["file", 1_000_000]["ready_s"] / by["file", 100_000]["ready_s"]
        print(f"file staging 1M / 100k time: {ratio:.1f}x (goal <= 10x)")
        for way in ("datasetio", "baseline"):
            if (way, 100_000) in by and (way, 1_000_000) in by:
                ratio = by[way, 1_000_000]["ready_s"] / by[way, 100_000]["ready_s"]
                print(f"{way} 1M / 100k time: {ratio:.1f}x")
    if ("file", 1_000_000) in by and ("baseline", 1_000_000) in by:
        ours, base = by["file", 1_000_000], by["baseline", 1_000_000]
        print(
            f"1M rows: file {ours['rows_per_s']:,.0f} rows/s vs baseline "
            f"{base['rows_per_s']:,.0f} rows/s ({ours['rows_per_s'] / base['rows_per_s']:.1f}x)"
        )
    if ("datasetio", 1_000_000) in by and ("baseline", 1_000_000) in by:
        ours, base = by["datasetio", 1_000_000], by["baseline", 1_000_000]
        print(
            f"1M rows: datasetio paging {ours['ready_s']:.1f} s vs baseline "
            f"{base['ready_s']:.1f} s "
            f"({base['ready_s'] / ours['ready_s']:.2f}x the baseline's speed)"
        )
    for r in results:
        if r["way"] == "file" and r["rss_growth"] is not None:
            ok = r["rss_growth"] <= 2 * r["csv_bytes"]
            print(f"file {r['rows']:,} rows: peak RSS growth <= 2x CSV: {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
