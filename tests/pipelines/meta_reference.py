"""Load Meta checkpoints the way llama-stack 0.2.12's meta-reference inference does; print logits.

``Llama3.build`` (llama_stack/models/llama/llama3/generation.py) starts torch.distributed and
fairscale's model parallel state, reads ``params.json`` into ``ModelArgs``, loads the weights
with ``maybe_reshard_state_dict`` and builds ``Transformer`` with ``strict=True``. We take the same
steps, skipping only its assertion that the vocabulary is the bundled 128,256-token tokenizer's
(the tiny model has its own). It runs as a subprocess because that loader sets torch's global
default tensor type. The model is built in fp32 so its logits compare tightly with the others.

    python -m tests.pipelines.meta_reference JOBS.json OUT.pt

JOBS.json: ``[{"checkpoint": DIR, "tokens": [ids...]}, ...]``; OUT.pt: a list of logits.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch


def load(checkpoint: Path) -> torch.nn.Module:
    """llama-stack's ``Transformer`` holding ``checkpoint``, loaded strictly."""
    from llama_stack.models.llama.checkpoint import maybe_reshard_state_dict
    from llama_stack.models.llama.llama3.args import ModelArgs
    from llama_stack.models.llama.llama3.model import Transformer

    params = json.loads((checkpoint / "params.json").read_text())
    args = ModelArgs(max_seq_len=512, max_batch_size=1, **params)
    state = maybe_reshard_state_dict(sorted(checkpoint.glob("*.pth")), n_kv_heads=args.n_kv_heads)
    torch.set_default_dtype(torch.float32)  # undo the loader's BFloat16Tensor default
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(jobs_path: str, out: str) -> int:
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel

    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1
        )
        initialize_model_parallel(1)
        logits = []
        for job in json.loads(Path(jobs_path).read_text()):
            model = load(Path(job["checkpoint"]))
            logits.append(model(torch.tensor([job["tokens"]]), 0).float())
        torch.save(logits, out)
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
