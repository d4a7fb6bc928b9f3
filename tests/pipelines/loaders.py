"""The loaders users load our checkpoints with, as the tests call them.

transformers' ``AutoModelForCausalLM``/``AutoTokenizer``, PEFT's ``PeftModel`` and llama-stack's
meta-reference model (in a subprocess: see tests/pipelines/meta_reference.py). Every one is the
real library, never a re-implementation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from tests.support import REPO

# What a Hugging Face model directory holds (meta-llama/Llama-3.2-1B-Instruct, ours).
HF_MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def logits(model: Any, tokens: list[int]) -> torch.Tensor:
    """Logits of one sequence from a torchtune or transformers model, as fp32.

    A torchtune model set to chunk its output (as the trainer sets it) gives a list of chunks
    along the sequence; they are joined.
    """
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    if isinstance(out, list):
        out = torch.cat(out, dim=1)
    return getattr(out, "logits", out).float()


def hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_model(base: Path, adapter: Path) -> tuple[Any, list[str], list[str]]:
    """``PeftModel.from_pretrained(base model, adapter)``: (model, missing, unexpected) keys.

    Missing keys count only the adapter's own (the base weights are not in an adapter file);
    PEFT's warnings about keys are failures too.
    """
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(hf_model(base), adapter)
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message)]
    again = model.load_adapter(adapter, adapter_name="reloaded")
    model.set_adapter("default")
    return model, list(again.missing_keys) + key_warnings, list(again.unexpected_keys)


def meta_reference_logits(jobs: list[tuple[Path, list[int]]], tmp: Path) -> list[torch.Tensor]:
    """llama-stack's meta-reference ``Transformer`` (strict load) on each (checkpoint, tokens)."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "meta-reference-jobs.json"
    spec.write_text(json.dumps([{"checkpoint": str(c), "tokens": t} for c, t in jobs]))
    out = tmp / "meta-reference-logits.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.pipelines.meta_reference", str(spec), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    """``apply_chat_template`` token ids (transformers 5 returns a BatchEncoding by default)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return list(ids)
