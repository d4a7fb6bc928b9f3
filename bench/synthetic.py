"""A synthetic Llama3.2-1B-Instruct for the benches, written on the fly and never committed.

The real shapes (vocabulary 128,256, dim 2,048, 16 layers) and Meta's real 128,000-token
tokenizer.model (the one llama-stack ships), with random bf16 weights from a seeded generator.
Needs the dev extras (llama-stack), as the benches do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ONE_B = "Llama3.2-1B-Instruct"


def write_synthetic_1b(root: Path) -> dict[str, Path]:
    """Llama3.2-1B-Instruct's shapes with random bf16 weights, in both layouts."""
    import llama_stack.models.llama.llama3 as llama3
    import torch
    from torchtune.models.convert_weights import tune_to_meta

    from pipelines import hf_tokenizer, layouts
    from pipelines.checkpoints import write_huggingface
    from pipelines.modeling import BaseCheckpoint, build_model, open_base
    from pipelines.models import lookup

    spec = lookup(ONE_B)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(spec).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {
        k: (
            torch.ones(shape, dtype=torch.bfloat16)
            if "norm" in k
            else torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        )
        for k, shape in shapes.items()
    }
    meta_dir = root / "1b-meta"
    meta_dir.mkdir(parents=True)
    meta = tune_to_meta(state)
    meta["output.weight"] = meta["tok_embeddings.weight"]
    torch.save(meta, meta_dir / layouts.META_WEIGHTS)
    (meta_dir / layouts.PARAMS).write_text(json.dumps(spec.arch.params_json()))
    shutil.copy(Path(llama3.__file__).parent / "tokenizer.model", meta_dir / "tokenizer.model")
    del meta
    base: BaseCheckpoint = open_base(meta_dir, spec)
    base.dtype = torch.bfloat16
    hf_dir = root / "1b-hf"
    hf_dir.mkdir()
    write_huggingface(state, base, hf_dir)
    assert hf_tokenizer.ranks_from_tokenizer_json(hf_dir / "tokenizer.json") == base.ranks
    return {"meta": meta_dir, "huggingface": hf_dir}


__all__ = ["ONE_B", "write_synthetic_1b"]
