"""Our trainer against torchtune's own LoRA recipe, on real model shapes (run by hand, not a test).

One run, one process tree: this script writes a synthetic Llama3.2-1B-Instruct (the real shapes,
vocabulary 128,256, dim 2,048, 16 layers, Meta's real tokenizer, random weights; bench/synthetic.py)
and one synthetic dataset, then alternates two children, ours, theirs, ours, theirs, ...:

- ours: ``pipelines.recipe.run_recipe`` on the dataset's rows, as the train task calls it;
- theirs: ``tune run lora_finetune_single_device --config <generated>.yaml``, torchtune 0.5.0's own
  recipe, fed the very samples our trainer tokenizes from those rows (a dataset component below).

Both get the same model (the Hugging Face layout, as torchtune's configs read it), LoRA settings
(torchtune's llama3_2/1B_lora_single_device.yaml: q, v and output projections plus the MLP,
rank 64, alpha 128), batches (no shuffle), sequence length, batch size, dtype, optimizer (AdamW,
fused on CUDA), schedule, chunked loss, clipping at 1.0 and activation settings, and both save
their merged checkpoint at the end. The one difference in the work: ours hands the output
projection contiguous chunks (``pipelines.recipe.contiguous_output_chunks``); torchtune's
recipe, at a batch of more than one sample, copies the vocabulary matrix for every chunk.

Measured, per run:

- tokens/s: the input tokens of steps 2..N over those steps' time (step 1 warms up). Ours: the
  time between its progress records; theirs: each step's tokens over the tokens/s torchtune
  logs for it (its DiskLogger). Both clocks run from one step's end to the next one's, data
  loading included.
- peak memory: on CUDA, ``max_memory_allocated`` during the steps (ours from the run's epoch
  report, theirs torchtune's own ``peak_memory_alloc``); always the child's peak RSS
  (``wait4``), loading and saving included.

Prints the medians over --repeat runs of each, their spread (min-max) and the ratios against
the goals (ours >= 0.95x their tokens/s, <= 1.05x their peak memory), with the machine's load
averages beside every run (the cores may be shared). Runs unchanged on CUDA
(longer sequences, bigger batches by default).

    .venv/bin/python bench/bench_trainer.py [--repeat 3] [--steps 6] [--seq-len 128]
        [--batch-size 2] [--dtype bf16|fp32] [--activation-checkpointing] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.synthetic import ONE_B, write_synthetic_1b  # noqa: E402

# torchtune's llama3_2/1B_lora_single_device.yaml, in llama-stack's algorithm_config terms.
LORA: Final = {
    "type": "LoRA",
    "lora_attn_modules": ["q_proj", "v_proj", "output_proj"],
    "apply_lora_to_mlp": True,
    "apply_lora_to_output": False,
    "rank": 64,
    "alpha": 128,
}
LR: Final = 3e-4
WEIGHT_DECAY: Final = 0.01
MAX_GRAD_NORM: Final = 1.0
SPEED_GOAL: Final = 0.95  # ours / theirs tokens/s, at least
MEMORY_GOAL: Final = 1.05  # ours / theirs peak memory, at most
IGNORE_INDEX: Final = -100
# Defaults per device: a few short steps where a step of the 1B model takes seconds (CPU).
DEFAULTS: Final = {
    "cpu": {"steps": 6, "seq_len": 128, "batch_size": 2},
    "cuda": {"steps": 20, "seq_len": 2048, "batch_size": 4},
}
_STEP_LINE = re.compile(r"^Step (\d+) \| (.*)$")
_METRIC = re.compile(r"(\w+):([-+0-9.eE]+)(?:\s|$)")


def token_samples(tokenizer: Any, path: str) -> list[dict[str, list[int]]]:
    """torchtune dataset component: the samples our trainer makes of the same rows."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the shared data


def _words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(n)
    )


def _dialog(rng: random.Random, words: int) -> list[dict[str, str]]:
    question = _words(rng, max(1, words // 4))
    answer = _words(rng, words)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_dataset(path: Path, rows: int, seq_len: int, tokenizer: Any) -> None:
    """``rows`` dialog rows, each the longest that stays within ``seq_len`` tokens."""
    from pipelines.chat_format import encode
    from pipelines.data import Turn

    def length(dialog: list[dict[str, str]]) -> int:
        turns = [Turn(m["role"], m["content"]) for m in dialog]
        return len(encode(turns, tokenizer, train_on_input=True)[0])

    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            low, high = 1, seq_len  # answer words: one word is at least one token
            while low < high:
                mid = (low + high + 1) // 2
                if length(_dialog(random.Random(i), mid)) <= seq_len:
                    low = mid
                else:
                    high = mid - 1
            f.write(json.dumps({"dialog": json.dumps(_dialog(random.Random(i), low))}) + "\n")


def tokenized(dataset: Path, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Our trainer's samples of ``dataset``, made by its own reader and tokenizer."""
    from pipelines.chat_format import tokenize
    from pipelines.data import read_dataset

    return tokenize(read_dataset(dataset, "dialog"), tokenizer, train_on_input=True).samples


def step_tokens(samples: list[dict], batch_size: int, steps: int, pad_id: int) -> list[dict]:
    """Per optimizer step (no accumulation, no shuffle): input tokens and torchtune's count
    (unmasked labels before the shift), as both trainers batch the samples."""
    out = []
    for step in range(steps):
        batch = samples[step * batch_size : (step + 1) * batch_size]
        out.append(
            {
                "inputs": sum(sum(t != pad_id for t in s["tokens"]) for s in batch),
                "labels": sum(sum(t != IGNORE_INDEX for t in s["labels"]) for s in batch),
            }
        )
    return out


# ---------------------------------------------------------------- the two trainers


def _request(args: argparse.Namespace, model_dir: Path, dataset: Path) -> dict[str, Any]:
    request: dict[str, Any] = {
        "job_uuid": "bench-trainer",
        "model": ONE_B,
        "model_artifact": {"uri": str(model_dir)},
        "dataset": {"uri": str(dataset)},
        "training_config": {
            "n_epochs": 1,
            "max_steps_per_epoch": args.steps,
            "gradient_accumulation_steps": 1,
            "data_config": {
                "dataset_id": "synthetic",
                "batch_size": args.batch_size,
                "shuffle": False,
                "data_format": "dialog",
                "train_on_input": True,
            },
            "optimizer_config": {
                "optimizer_type": "adamw",
                "lr": LR,
                "weight_decay": WEIGHT_DECAY,
                "num_warmup_steps": 0,
            },
            "dtype": args.dtype,
        },
        "algorithm_config": LORA,
    }
    if args.activation_checkpointing:
        request["training_config"]["efficiency_config"] = {"enable_activation_checkpointing": True}
    return request


def ours_child(spec_json: str) -> dict[str, Any]:
    """Our trainer, in this (fresh) interpreter; step times from its progress records."""
    from pipelines.progress import ProgressReporter
    from pipelines.recipe import run_recipe
    from pipelines.settings import TrainerSettings

    spec = json.loads(spec_json)
    reporter = ProgressReporter(None)
    ends: list[float] = []

    def progress(record: dict[str, Any]) -> None:
        ends.append(time.perf_counter())
        reporter(record)

    result = run_recipe(
        spec["request"],
        model_dir=Path(spec["model_dir"]),
        dataset_path=Path(spec["dataset"]),
        validation_path=None,
        output_dir=Path(spec["out"]),
        checkpoint_format="huggingface",
        progress=progress,
        settings=TrainerSettings(compile=spec["compile"], max_grad_norm=MAX_GRAD_NORM),
    )
    epoch = result.metrics[0]
    return {
        "step_seconds": [b - a for a, b in zip(ends, ends[1:], strict=False)],  # steps 2..N
        "device_peak_bytes": epoch["peak_memory_bytes"]
        if epoch["peak_memory"] == "cuda_max_memory_allocated"
        else None,
        "settings": epoch["settings"],
    }


def tune_config(
    args: argparse.Namespace, device: str, model: dict[str, Path], samples: Path, out: Path
) -> dict[str, Any]:
    """torchtune's own config for the same run: its 1B LoRA config with our data and sizes."""
    return {
        "output_dir": str(out),
        "model": {
            "_component_": "torchtune.models.llama3_2.lora_llama3_2_1b",
            "lora_attn_modules": LORA["lora_attn_modules"],
            "apply_lora_to_mlp": LORA["apply_lora_to_mlp"],
            "apply_lora_to_output": LORA["apply_lora_to_output"],
            "lora_rank": LORA["rank"],
            "lora_alpha": LORA["alpha"],
            "lora_dropout": 0.0,
        },
        "tokenizer": {
            "_component_": "torchtune.models.llama3.llama3_tokenizer",
            "path": str(model["meta"] / "tokenizer.model"),  # Meta's, as in the HF repo's original/
            "max_seq_len": None,
        },
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(model["huggingface"]),
            "checkpoint_files": ["model.safetensors"],
            "recipe_checkpoint": None,
            "output_dir": str(out),
            "model_type": "LLAMA3_2",
        },
        "resume_from_checkpoint": False,
        "save_adapter_weights_only": False,
        "dataset": {"_component_": "bench.bench_trainer.token_samples", "path": str(samples)},
        "seed": 42,
        "shuffle": False,
        "batch_size": args.batch_size,
        "optimizer": {
            "_component_": "torch.optim.AdamW",
            "fused": device == "cuda",
            "weight_decay": WEIGHT_DECAY,
            "lr": LR,
        },
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": 0,
        },
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": 1,
        "max_steps_per_epoch": args.steps,
        "gradient_accumulation_steps": 1,
        "clip_grad_norm": MAX_GRAD_NORM,
        "compile": args.compile,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger",
            "log_dir": str(out),
            "filename": "metrics.txt",
        },
        "log_every_n_steps": 1,
        "log_peak_memory_stats": device == "cuda",
        "device": device,
        "dtype": args.dtype,
        "enable_activation_checkpointing": args.activation_checkpointing,
        "enable_activation_offloading": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }


def theirs_metrics(metrics_file: Path, steps: list[dict]) -> dict[str, Any]:
    """Step times (steps 2..N) and the CUDA peak from torchtune's DiskLogger lines."""
    logged: dict[int, dict[str, float]] = {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        match = _STEP_LINE.match(line)
        if match:
            logged[int(match[1])] = {k: float(v) for k, v in _METRIC.findall(match[2])}
    if sorted(logged) != list(range(1, len(steps) + 1)):
        raise RuntimeError(f"torchtune logged steps {sorted(logged)}, expected 1..{len(steps)}")
    seconds = [
        steps[i - 1]["labels"] / logged[i]["tokens_per_second_per_gpu"]
        for i in range(2, len(steps) + 1)
    ]
    peaks = [m["peak_memory_alloc"] for m in logged.values() if "peak_memory_alloc" in m]
    return {
        "step_seconds": seconds,
        "device_peak_bytes": int(max(peaks) * 2**30) if peaks else None,
    }


def _run(cmd: list[str], log: Path) -> tuple[str, int, float]:
    """(stdout, the child's peak RSS in bytes, wall seconds); the child's output goes to ``log``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
        stdout = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} failed ({proc.returncode}); see {log}:\n"
            + log.read_text()[-3000:]
        )
    return stdout, usage.ru_maxrss * 1024, time.perf_counter() - started


# ---------------------------------------------------------------- the comparison


def _summary(runs: list[dict[str, Any]], tokens: list[int]) -> dict[str, Any]:
    speeds = [sum(tokens) / sum(r["step_seconds"]) for r in runs]
    rss = [r["peak_rss_bytes"] for r in runs]
    device = [r["device_peak_bytes"] for r in runs if r["device_peak_bytes"] is not None]
    return {
        "tokens_per_second": statistics.median(speeds),
        "tokens_per_second_runs": speeds,
        "peak_rss_bytes": statistics.median(rss),
        "peak_rss_runs": rss,
        "device_peak_bytes": statistics.median(device) if device else None,
        "device_peak_runs": device,
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
    }


def _load() -> str:
    """The machine's load averages, printed with every figure (neighbours share the cores)."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _spread(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(min(values) / scale)}-{fmt.format(max(values) / scale)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternated")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default per device)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample, at most")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 where native")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile, both trainers")
    parser.add_argument(
        "--keep",
        type=Path,
        help="write the model and runs here and keep them (a model there is reused)",
    )
    parser.add_argument("--ours-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_child:
        print(json.dumps(ours_child(args.ours_child)))
        return 0

    import torch

    from pipelines.recipe import native_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in DEFAULTS[device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is not timed)")
    native = native_bf16(torch.device(device))
    if args.dtype is None:
        args.dtype = "bf16" if native else "fp32"
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        capabilities = torch.cpu.get_capabilities()
        where = f"{capabilities.get('cpu_name', 'cpu')}, {torch.get_num_threads()} threads"
    print(
        f"device: {device} ({where}); native bf16: {native}; dtype: {args.dtype}; "
        f"sequence <= {args.seq_len}, batch {args.batch_size}, {args.steps} steps, "
        f"activation checkpointing {args.activation_checkpointing}, compile {args.compile}; "
        f"{_load()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as name:
        tmp = args.keep or Path(name)
        tmp.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        model = {"meta": tmp / "model" / "1b-meta", "huggingface": tmp / "model" / "1b-hf"}
        if not (model["huggingface"] / "config.json").is_file():  # --keep: written before
            model = write_synthetic_1b(tmp / "model")
        model_dir = model["huggingface"]
        from pipelines.modeling import open_base
        from pipelines.models import lookup

        spec = lookup(ONE_B)
        tokenizer = open_base(model_dir, spec).tokenizer(spec.max_seq_len)
        dataset = tmp / "train.jsonl"
        write_dataset(dataset, args.steps * args.batch_size, args.seq_len, tokenizer)
        samples = tokenized(dataset, tokenizer)  # what our trainer will train on
        samples_file = tmp / "samples.json"
        samples_file.write_text(json.dumps(samples))
        steps = step_tokens(samples, args.batch_size, args.steps, tokenizer.pad_id)
        timed_tokens = [s["inputs"] for s in steps[1:]]
        print(
            f"model and data written in {time.perf_counter() - started:.0f} s; "
            f"{sum(s['inputs'] for s in steps)} tokens in {len(samples)} samples",
            flush=True,
        )

        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        for i in range(args.repeat):  # alternated: drift and neighbours hit both alike
            out = tmp / f"ours-{i}"
            shutil.rmtree(out, ignore_errors=True)
            spec_json = json.dumps(
                {
                    "request": _request(args, model_dir, dataset),
                    "model_dir": str(model_dir),
                    "dataset": str(dataset),
                    "out": str(out),
                    "compile": args.compile,
                }
            )
            stdout, rss, wall = _run(
                [sys.executable, __file__, "--ours-child", spec_json], tmp / f"ours-{i}.log"
            )
            run = json.loads(stdout.strip().splitlines()[-1])
            shutil.rmtree(out)  # its checkpoint: 2.5 GB a run
            ours.append({**run, "peak_rss_bytes": rss, "wall_seconds": wall})
            print(
                f"ours   {i + 1}: {sum(timed_tokens) / sum(run['step_seconds']):8.1f} tok/s, "
                f"peak RSS {rss / 2**30:.2f} GiB, {wall:.0f} s, {_load()}",
                flush=True,
            )

            out = tmp / f"theirs-{i}"
            shutil.rmtree(out, ignore_errors=True)
            config = tmp / f"theirs-{i}.yaml"
            config.write_text(yaml.safe_dump(tune_config(args, device, model, samples_file, out)))
            tune = str(Path(sys.executable).with_name("tune"))
            _, rss, wall = _run(
                [tune, "run", "lora_finetune_single_device", "--config", str(config)],
                tmp / f"theirs-{i}.log",
            )
            run = theirs_metrics(out / "metrics.txt", steps)
            shutil.copy(out / "metrics.txt", tmp / f"theirs-{i}.metrics.txt")
            shutil.rmtree(out)
            theirs.append({**run, "peak_rss_bytes": rss, "wall_seconds": wall})
            print(
                f"theirs {i + 1}: {sum(timed_tokens) / sum(run['step_seconds']):8.1f} tok/s, "
                f"peak RSS {rss / 2**30:.2f} GiB, {wall:.0f} s, {_load()}",
                flush=True,
            )

    a, b = _summary(ours, timed_tokens), _summary(theirs, timed_tokens)
    speed = a["tokens_per_second"] / b["tokens_per_second"]
    rss = a["peak_rss_bytes"] / b["peak_rss_bytes"]
    print()
    print(
        f"| {device}, {args.dtype}, seq <= {args.seq_len}, batch {args.batch_size}, "
        f"{args.steps} steps, {args.repeat} runs each | ours | torchtune | ratio | goal |"
    )
    print("| --- | ---: | ---: | ---: | --- |")
    print(
        f"| tokens/s, median (spread) | {a['tokens_per_second']:.1f} "
        f"({_spread(a['tokens_per_second_runs'])}) | {b['tokens_per_second']:.1f} "
        f"({_spread(b['tokens_per_second_runs'])}) | {speed:.3f} | >= {SPEED_GOAL} "
        f"{'met' if speed >= SPEED_GOAL else 'MISSED'} |"
    )
    print(
        f"| peak RSS GiB, median (spread) | {a['peak_rss_bytes'] / 2**30:.2f} "
        f"({_spread(a['peak_rss_runs'], 2**30, '{:.2f}')}) | {b['peak_rss_bytes'] / 2**30:.2f} "
        f"({_spread(b['peak_rss_runs'], 2**30, '{:.2f}')}) | {rss:.3f} | <= {MEMORY_GOAL} "
        f"{'met' if rss <= MEMORY_GOAL else 'MISSED'} |"
    )
    if a["device_peak_bytes"] and b["device_peak_bytes"]:
        mem = a["device_peak_bytes"] / b["device_peak_bytes"]
        print(
            f"| CUDA max allocated GiB, median | {a['device_peak_bytes'] / 2**30:.2f} | "
            f"{b['device_peak_bytes'] / 2**30:.2f} | {mem:.3f} | <= {MEMORY_GOAL} "
            f"{'met' if mem <= MEMORY_GOAL else 'MISSED'} |"
        )
    print(
        f"| wall s per run (load, train, save), median | {a['wall_seconds']:.0f} | "
        f"{b['wall_seconds']:.0f} | {a['wall_seconds'] / b['wall_seconds']:.2f} | |"
    )
    print(f"\nour settings: {json.dumps(ours[0]['settings'], sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
