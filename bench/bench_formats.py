"""What reading and writing each checkpoint format costs (run by hand, not a test).

Two models, both written on the fly into a temporary directory and deleted afterwards:

- ``llama3.2-tiny`` in both layouts (pipelines.tiny);
- a synthetic model with Llama3.2-1B-Instruct's real shapes: random bf16 weights, Meta's real
  128,000-token tokenizer.model (the one llama-stack ships), the Meta layout and the Hugging Face
  layout our own writer produces (never committed).

Each operation runs in a fresh process, so its time and memory are its own:

- ``load meta`` / ``load hf``: what the trainer does to a base checkpoint, ``open_base`` (layout,
  checks, tokenizer) then ``load_state_dict`` (torchtune's checkpointer, key conversion), every
  tensor touched. Baseline: ``torch.load`` / ``safetensors.load_file`` of the same files, every
  tensor touched (the bytes in, no checks, no conversion).
- ``save meta`` / ``save hf``: ``save_checkpoint`` of a LoRA model held in fp32 (as CPU
  training holds it) over that base: merge, cast to the base dtype, convert, write, adapter,
  tokenizer files. Baseline: ``torch.save`` / ``save_file`` of the base state dict (the bytes
  out).
- ``tokenizer.json``: our tiktoken -> tokenizer.json conversion; baseline: transformers'
  ``TikTokenConverter`` on the same file.

Memory: the process's peak RSS during the operation (VmHWM reset just before it) and how much
that is above its RSS when the operation started (imports done). Medians of --repeat runs,
ours and the baseline interleaved; ratios are to the baseline of the same run.

    .venv/bin/python bench/bench_formats.py [--skip-1b] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.synthetic import ONE_B, write_synthetic_1b  # noqa: E402

TINY = "llama3.2-tiny"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _touch(state: dict[str, Any]) -> None:
    """Read every page of every tensor (mmap'd loads are lazy) without copying any."""
    for t in state.values():
        t.reshape(-1)[::1024].sum()


def _lora_model(base: Any) -> Any:
    import torch
    from torchtune import training

    from pipelines.modeling import build_lora_model, load_base_weights

    algo = {"lora_attn_modules": ["q_proj", "v_proj"], "rank": 8, "alpha": 16}
    state = base.load_state_dict()
    with training.set_default_dtype(torch.float32):
        model = build_lora_model(base.spec, algo)
    load_base_weights(model, state, base.root)
    del state
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(0, 0.01)
    return model, algo


def child(op: str, model: str, model_dir: Path, out: Path) -> dict[str, Any]:
    """One measured operation; runs in its own interpreter (see ``main``)."""
    import safetensors.torch  # noqa: F401  (imports are not what is measured)
    import torch
    import torchtune.training.checkpointing  # noqa: F401

    from pipelines.checkpoints import save_checkpoint
    from pipelines.modeling import open_base
    from pipelines.models import lookup

    spec = lookup(model)
    out.mkdir(parents=True, exist_ok=True)
    prepared: Any = None
    if op in ("save-meta", "save-hf"):
        base = open_base(model_dir, spec)
        prepared = _lora_model(base)
    elif op in ("save-raw-meta", "save-raw-hf"):
        prepared = open_base(model_dir, spec).load_state_dict()
    import gc

    gc.collect()
    rss = _status_kb("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    if op == "load":
        base = open_base(model_dir, spec)
        _touch(base.load_state_dict())
    elif op == "load-raw":
        from safetensors.torch import load_file

        files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.pth"))
        for f in files:
            if f.suffix == ".pth":
                _touch(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            else:
                _touch(load_file(f))
    elif op in ("save-meta", "save-hf"):
        lora, algo = prepared
        save_checkpoint(
            lora,
            base=base,
            algo=algo,
            root=out,
            identifier="c",
            checkpoint_format="meta" if op == "save-meta" else "huggingface",
        )
    elif op == "save-raw-meta":
        torch.save(prepared, out / "raw.pth")
    elif op == "save-raw-hf":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in prepared.items()}, out / "raw.safetensors")
    elif op == "tokenizer":
        from pipelines.bpe import read_ranks
        from pipelines.hf_tokenizer import build_tokenizer_json

        build_tokenizer_json(read_ranks(model_dir / "tokenizer.model")).save(
            str(out / "tokenizer.json")
        )
    elif op == "tokenizer-raw":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        TikTokenConverter(vocab_file=str(model_dir / "tokenizer.model")).converted().save(
            str(out / "tokenizer.json")
        )
    else:
        raise ValueError(op)
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM")
    return {"seconds": seconds, "peak_mib": peak / 1024, "added_mib": (peak - rss) / 1024}


def _run_child(op: str, model: str, model_dir: Path, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", op, model, str(model_dir), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{op} on {model_dir}: {proc.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


ROWS = (
    # (label, op, layout of the input, baseline op)
    ("load meta", "load", "meta", "load-raw"),
    ("load hf", "load", "huggingface", "load-raw"),
    ("save meta (meta base)", "save-meta", "meta", "save-raw-meta"),
    ("save hf (meta base)", "save-hf", "meta", "save-raw-hf"),
    ("save hf (hf base)", "save-hf", "huggingface", "save-raw-hf"),
    ("save meta (hf base)", "save-meta", "huggingface", "save-raw-meta"),
    ("tokenizer.json", "tokenizer", "meta", "tokenizer-raw"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-1b", action="store_true", help="only the tiny model")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; medians shown")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        op, model, model_dir, out = args.child
        print(json.dumps(child(op, model, Path(model_dir), Path(out))))
        return 0

    from pipelines.tiny import write_tiny_model

    print("| model | operation | s | baseline s | ratio | peak RSS MiB | added MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as name:
        tmp = Path(name)
        models = {
            TINY: {
                layout: write_tiny_model(tmp / f"tiny-{layout}", layout=layout)
                for layout in ("meta", "huggingface")
            }
        }
        if not args.skip_1b:
            models[ONE_B] = write_synthetic_1b(tmp)
        for model, dirs in models.items():
            for label, op, layout, baseline in ROWS:
                ours, base = [], []
                for _ in range(args.repeat):  # interleaved: drift hits both alike
                    ours.append(_run_child(op, model, dirs[layout], tmp / "out"))
                    base.append(_run_child(baseline, model, dirs[layout], tmp / "out"))
                s_ours = statistics.median(r["seconds"] for r in ours)
                s_base = statistics.median(r["seconds"] for r in base)
                peak = statistics.median(r["peak_mib"] for r in ours)
                added = statistics.median(r["added_mib"] for r in ours)
                print(
                    f"| {model} | {label} | {s_ours:.2f} | {s_base:.2f} | {s_ours / s_base:.2f} "
                    f"| {peak:.0f} | {added:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
