"""Generate ``llama3.2-tiny``: a random-weight Llama 3.2 checkpoint in the Meta layout.

Nothing is downloaded: the tokenizer is the project's own small BPE (pipelines/bpe.py) and the
weights are drawn from a seeded generator, so the same seed gives byte-identical files. The
directory looks like what ``llama download`` writes: consolidated.00.pth, params.json,
tokenizer.model and checklist.chk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final

from pipelines.bpe import write_tiktoken_file
from pipelines.models import TINY_BASE_VOCAB, TINY_DIMS, lookup
from pipelines.publish import staged_dir

NAME: Final = "llama3.2-tiny"


def params_json() -> dict[str, object]:
    """params.json in Meta's key names (plus the explicit hidden_dim the tiny size uses)."""
    d = TINY_DIMS
    return {
        "dim": d["embed_dim"],
        "n_layers": d["num_layers"],
        "n_heads": d["num_heads"],
        "n_kv_heads": d["num_kv_heads"],
        "vocab_size": d["vocab_size"],
        "hidden_dim": d["intermediate_dim"],
        "norm_eps": d["norm_eps"],
        "rope_theta": float(d["rope_base"]),
        "use_scaled_rope": True,
        "max_seq_len": d["max_seq_len"],
        "model": NAME,
    }


def write_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into ``out`` (created; replaced atomically if present)."""
    import torch
    from torchtune.models.convert_weights import tune_to_meta

    from pipelines.modeling import build_model

    out = Path(out)
    with staged_dir(out) as tmp:
        n_base = write_tiktoken_file(tmp / "tokenizer.model", TINY_BASE_VOCAB - 256)
        if n_base != TINY_BASE_VOCAB:
            raise RuntimeError(f"tiny tokenizer has {n_base} tokens, expected {TINY_BASE_VOCAB}")
        torch.manual_seed(seed)
        model = build_model(lookup(NAME))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
        state = {k: v.contiguous() for k, v in tune_to_meta(model.state_dict()).items()}
        torch.save(state, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps(params_json(), indent=2) + "\n")
        sums = [
            f"{hashlib.md5((tmp / f).read_bytes()).hexdigest()}  {f}"
            for f in ("consolidated.00.pth", "params.json", "tokenizer.model")
        ]
        (tmp / "checklist.chk").write_text("\n".join(sums) + "\n")
    return out


__all__ = ["NAME", "params_json", "write_tiny_model"]
