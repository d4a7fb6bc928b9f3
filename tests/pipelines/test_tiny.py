"""The tiny model holds what the real downloads hold, in both layouts: the same file names,
state-dict keys (the tied output.weight included), bf16 weights, Meta's params.json keys and a
Llama 3 tokenizer with its 256 special tokens right after the base vocabulary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.models import TINY, TINY_BASE_VOCAB
from tests.pipelines.loaders import HF_MODEL_FILES, chat_ids

META_KEYS_PER_LAYER = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
    "attention_norm.weight",
    "ffn_norm.weight",
)
HF_KEYS_PER_LAYER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
# The keys of Meta's Llama 3.2 consolidated.00.pth: output.weight is there although it is tied.
META_KEYS = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
    f"layers.{i}.{k}" for i in range(TINY.n_layers) for k in META_KEYS_PER_LAYER
}
# The keys of meta-llama/Llama-3.2-*'s safetensors: no lm_head (tied to embed_tokens).
HF_KEYS = {"model.embed_tokens.weight", "model.norm.weight"} | {
    f"model.layers.{i}.{k}" for i in range(TINY.n_layers) for k in HF_KEYS_PER_LAYER
}
REAL_PARAMS_KEYS = {
    "dim",
    "ffn_dim_multiplier",
    "multiple_of",
    "n_heads",
    "n_kv_heads",
    "n_layers",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "vocab_size",
}


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_meta_layout_is_what_llama_model_download_writes(tmp_path: Path, tiny_model: Path) -> None:
    from pipelines.tiny import write_tiny_model

    assert sorted(p.name for p in tiny_model.iterdir()) == [
        "checklist.chk",
        "consolidated.00.pth",
        "params.json",
        "tokenizer.model",
    ]
    state = torch.load(tiny_model / "consolidated.00.pth", weights_only=True)
    assert set(state) == META_KEYS
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert state["output.weight"].equal(state["tok_embeddings.weight"])
    params = json.loads((tiny_model / "params.json").read_text())
    assert set(params) == REAL_PARAMS_KEYS  # no hidden_dim: Meta's code derives the FFN width
    assert params["vocab_size"] == TINY_BASE_VOCAB + 256 == state["output.weight"].shape[0]
    assert state["layers.0.feed_forward.w1.weight"].shape[0] == TINY.hidden_dim == 256
    again = write_tiny_model(tmp_path / "again")
    for name in ("consolidated.00.pth", "params.json", "tokenizer.model", "checklist.chk"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes()
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in again.iterdir())


def test_the_tokenizer_is_llama3s_with_256_specials_after_the_base(tiny_model: Path) -> None:
    """llama-stack's own tokenizer class reads it and finds the special tokens where real code
    expects them: right after the base vocabulary, 256 of them, filling the vocabulary."""
    from llama_stack.models.llama.llama3.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model / "tokenizer.model")
    assert tok.n_words == TINY.vocab_size == TINY_BASE_VOCAB + 256
    assert tok.special_tokens["<|begin_of_text|>"] == TINY_BASE_VOCAB
    assert tok.special_tokens["<|start_header_id|>"] == TINY_BASE_VOCAB + 6
    assert tok.special_tokens["<|eot_id|>"] == TINY_BASE_VOCAB + 9
    text = "The capital of France is Paris."
    ids = tok.encode(text, bos=True, eos=False)
    assert ids[0] == TINY_BASE_VOCAB and max(ids[1:]) < TINY_BASE_VOCAB
    assert tok.decode(ids[1:]) == text


def test_hf_layout_is_what_huggingface_cli_download_holds(tiny_hf: Path, tiny_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert {p.name for p in tiny_hf.iterdir()} >= HF_MODEL_FILES
    weights = _safetensors(tiny_hf)
    assert set(weights) == HF_KEYS
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    config = AutoConfig.from_pretrained(tiny_hf)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert config.intermediate_size == TINY.hidden_dim and config.vocab_size == TINY.vocab_size
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.convert_tokens_to_ids("<|eot_id|>") == TINY_BASE_VOCAB + 9
    assert len(tok) == TINY.vocab_size
    generation = json.loads((tiny_hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [TINY_BASE_VOCAB + i for i in (1, 8, 9)]
    ids = chat_ids(tok, [{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert ids[0] == TINY_BASE_VOCAB and ids[-3] == TINY_BASE_VOCAB + 7  # ...<|end_header_id|>\n\n
    # Same weights as the Meta layout of the same seed.
    meta = torch.load(tiny_model / "consolidated.00.pth", weights_only=True)
    assert weights["model.embed_tokens.weight"].equal(meta["tok_embeddings.weight"])


def test_sharded_hf_layout_has_an_index_naming_every_shard(tiny_hf_sharded: Path) -> None:
    index = json.loads((tiny_hf_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tiny_hf_sharded / s).is_file() for s in shards)
    assert set(index["weight_map"]) == HF_KEYS == set(_safetensors(tiny_hf_sharded))
    assert not (tiny_hf_sharded / "model.safetensors").exists()


@pytest.mark.parametrize("layout", ["meta", "huggingface"])
def test_tiny_model_cli(tmp_path: Path, layout: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "tiny-model", "--out", str(tmp_path / "m")]
        + ["--format", layout],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer == {"model": "llama3.2-tiny", "format": layout, "path": str(tmp_path / "m")}
    weights = "consolidated.00.pth" if layout == "meta" else "model.safetensors"
    assert (tmp_path / "m" / weights).stat().st_size > 100_000
