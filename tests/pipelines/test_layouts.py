"""Both real layouts are told apart by content and checked against the requested model before
any weight is read; every way a model directory can be wrong gets its own message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines import layouts
from pipelines.layouts import ModelDirError, detect
from pipelines.modeling import open_base
from pipelines.models import lookup

TINY = lookup("llama3.2-tiny")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_layouts_are_detected_by_content(
    tmp_path: Path, tiny_model: Path, tiny_hf: Path, tiny_hf_sharded: Path
) -> None:
    assert detect(tiny_model) == layouts.Layout("meta", tiny_model, ("consolidated.00.pth",))
    assert detect(tiny_hf) == layouts.Layout("huggingface", tiny_hf, ("model.safetensors",))
    sharded = detect(tiny_hf_sharded)
    assert sharded.kind == "huggingface" and len(sharded.weight_files) > 1
    assert all(f.startswith("model-0000") for f in sharded.weight_files)
    # A Hugging Face download of the Meta files alone (`--include original/*`).
    only_original = tmp_path / "only-original"
    _copy(tiny_model, only_original / "original")
    assert detect(only_original).kind == "meta"
    assert detect(only_original).root == only_original / "original"


def test_hf_download_with_original_reads_meta_tokenizer_from_it(
    tmp_path: Path, tiny_model: Path, tiny_hf: Path
) -> None:
    full = _copy(tiny_hf, tmp_path / "full")
    _copy(tiny_model, full / "original")
    (full / "tokenizer.json").unlink()  # only original/tokenizer.model can give the ranks now
    base = open_base(full, TINY)
    assert base.layout.kind == "huggingface" and base.layout.original == full / "original"
    assert len(base.ranks) == 320


def test_both_layouts_open_to_the_same_weights(tiny_model: Path, tiny_hf_sharded: Path) -> None:
    meta, hf = open_base(tiny_model, TINY), open_base(tiny_hf_sharded, TINY)
    assert meta.ranks == hf.ranks
    a, b = meta.load_state_dict(), hf.load_state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert meta.dtype == hf.dtype == torch.bfloat16
    assert "output.weight" not in a  # tied: torchtune's model has none


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _mistral(d: Path) -> None:
    _edit_json(d / "config.json", architectures=["MistralForCausalLM"], model_type="mistral")


def _wider(d: Path) -> None:
    _edit_json(d / "config.json", hidden_size=128, num_hidden_layers=4)


def _drop_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    (d / sorted(set(index["weight_map"].values()))[-1]).unlink()


def _drop_index(d: Path) -> None:
    (d / "model.safetensors.index.json").unlink()


def _bin_weights(d: Path) -> None:
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")


def _hidden_dim_params(d: Path) -> None:
    params = json.loads((d / "params.json").read_text())
    for key in ("multiple_of", "ffn_dim_multiplier"):
        del params[key]
    (d / "params.json").write_text(json.dumps({**params, "hidden_dim": 128}))


def _no_output_weight(d: Path) -> None:
    state = torch.load(d / "consolidated.00.pth", weights_only=True)
    del state["output.weight"]
    torch.save(state, d / "consolidated.00.pth")


def _other_vocab(d: Path) -> None:
    lines = (d / "tokenizer.model").read_text().splitlines()
    (d / "tokenizer.model").write_text("\n".join(lines[:-1]) + "\n")


def _no_weights(d: Path) -> None:
    (d / "consolidated.00.pth").unlink()


BROKEN = {
    "other-architecture": (
        "hf",
        _mistral,
        r"config\.json' describes a MistralForCausalLM model, but the request asks for "
        r"llama3\.2-tiny, a LlamaForCausalLM",
    ),
    "other-shapes": (
        "hf",
        _wider,
        r"is a LlamaForCausalLM but not llama3\.2-tiny: hidden_size 128 \(expected 64\), "
        r"num_hidden_layers 4 \(expected 2\)",
    ),
    "missing-shard": ("hf", _drop_shard, r"index\.json' names model-0000\d-of-0000\d\.safe"),
    "no-index": (
        "hf",
        _drop_index,
        r"holds \d safetensors shards but no model\.safetensors\.index",
    ),
    "bin-weights": ("hf", _bin_weights, r"holds pytorch_model\*\.bin weights; only safetensors"),
    "hidden-dim-params": (
        "meta",
        _hidden_dim_params,
        r"params\.json' does not describe llama3\.2-tiny: FFN width None from multiple_of None",
    ),
    "no-output-weight": (
        "meta",
        _no_output_weight,
        r"consolidated\.00\.pth' has no output\.weight; Meta's Llama 3\.2 checkpoints hold",
    ),
    "other-vocab": ("meta", _other_vocab, r"has 319 base tokens; llama3\.2-tiny has 320"),
    "params-without-weights": ("meta", _no_weights, r"has params\.json but no consolidated"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_directories_say_what_is_wrong(
    tmp_path: Path, tiny_model: Path, tiny_hf_sharded: Path, case: str
) -> None:
    layout, damage, message = BROKEN[case]
    d = _copy(tiny_model if layout == "meta" else tiny_hf_sharded, tmp_path / case)
    damage(d)
    with pytest.raises(ModelDirError, match=message):
        open_base(d, TINY).load_state_dict()


def test_a_directory_of_neither_layout_lists_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(
        ModelDirError,
        match=r"is neither a Meta checkpoint \(consolidated\.00\.pth, params\.json, "
        r"tokenizer\.model\) nor a Hugging Face one .*; it holds: README\.md, weights\.gguf$",
    ):
        detect(tmp_path)


def test_a_checkpoint_of_another_registry_model_is_named(tiny_model: Path) -> None:
    with pytest.raises(
        ModelDirError, match=r"does not describe Llama3\.2-1B-Instruct: dim 64 \(expected 2048\)"
    ):
        open_base(tiny_model, lookup("Llama3.2-1B-Instruct"))


def test_an_hf_download_on_s3_stages_and_opens(
    tmp_path: Path, bucket: str, tiny_hf_sharded: Path
) -> None:
    """A directory under an s3:// prefix (what a model registry holds), fetched as the train
    task fetches it, is the same checkpoint."""
    from pipelines import storage
    from pipelines.staging import stage_model

    uri = storage.publish(tiny_hf_sharded, f"s3://{bucket}/models/llama3.2-tiny")
    staged = stage_model(storage.fetch(uri, tmp_path / "dl"), tmp_path / "cache")
    base = open_base(staged, TINY)
    assert base.layout.weight_files == detect(tiny_hf_sharded).weight_files
    assert (
        base.load_state_dict().keys() == open_base(tiny_hf_sharded, TINY).load_state_dict().keys()
    )
