"""A checkpoint is what users load it with: on the same tokens the trainer's own model (base +
adapter), the merged Hugging Face model, PEFT on the Hugging Face base and llama-stack's
meta-reference model on the merged Meta file give the same logits (fp32), from either input
layout. The merged weights keep the base's dtype, files are 0644, and none of this needs
transformers or PEFT in the trainer."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from pipelines.checkpoints import save_checkpoint
from pipelines.models import lookup
from pipelines.recipe import RecipeConfig, Trainer
from tests.pipelines.loaders import hf_model, logits, meta_reference_logits, peft_model
from tests.pipelines.pipeline_helpers import make_request, write_rows
from tests.support import REPO

# fp32 all the way: the differences left are float rounding, so the tolerance is tight.
# llama-stack 0.2.12's meta-reference hard-codes Llama 3.1's RoPE scale factor (8) where Llama
# 3.2 uses 32; on these short sequences that moves its logits by ~5e-6 (with 32: ~2e-7).
ATOL = 1e-5

CASES = {
    "meta-input-lora": ("meta", {}),
    "hf-input-lora": ("huggingface", {}),
    "meta-input-dora": ("meta", {"use_dora": True}),  # DoRA's magnitude also needs HF's q/k order
}


def _train(tmp: Path, model_dir: Path, algo: dict, checkpoint_format: str) -> Trainer:
    data = write_rows(tmp / "train.jsonl", 12)
    request = make_request("job-logits", str(model_dir), str(data))
    request["algorithm_config"].update(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        **algo,
    )
    request["training_config"].update(dtype="fp32", n_epochs=1, max_steps_per_epoch=3)
    request["training_config"]["optimizer_config"]["lr"] = 0.01
    trainer = Trainer(
        RecipeConfig.from_request(request),
        model_dir=model_dir,
        dataset_path=data,
        validation_path=None,
        output_dir=tmp / "checkpoints",
        checkpoint_format=checkpoint_format,
    )
    trainer.result = trainer.train()
    return trainer


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_logits_everywhere(tmp_path: Path, tiny_fp32: dict[str, Path], case: str) -> None:
    layout, algo = CASES[case]
    trainer = _train(tmp_path, tiny_fp32[layout], algo, "huggingface")
    hf_checkpoint = Path(trainer.result.checkpoints[0]["path"])
    meta_checkpoint = save_checkpoint(
        trainer.model,
        base=trainer.base,
        algo=trainer.cfg.algorithm,
        root=tmp_path / "checkpoints",
        identifier="as-meta",
        checkpoint_format="meta",
    )
    tokens = trainer.train_samples[0]["tokens"]
    ours = logits(trainer.model, tokens)
    hf_base = tiny_fp32["huggingface"]
    assert (ours - logits(hf_model(hf_base), tokens)).abs().max() > 1e-3, "adapter did nothing"

    peft, missing, unexpected = peft_model(hf_base, hf_checkpoint / "adapter")
    assert missing == [] and unexpected == []
    (meta_reference,) = meta_reference_logits([(meta_checkpoint, tokens)], tmp_path)
    for name, got in {
        "merged Hugging Face model": logits(hf_model(hf_checkpoint), tokens),
        "PEFT on the Hugging Face base": logits(peft, tokens),
        "llama-stack meta-reference": meta_reference,
    }.items():
        torch.testing.assert_close(got, ours, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def _lora_model(base_dir: Path, dtype: torch.dtype):
    """A LoRA model held in ``dtype`` over a base of another dtype, with a non-zero adapter."""
    from torchtune import training

    from pipelines.modeling import build_lora_model, load_base_weights, open_base

    spec = lookup("llama3.2-tiny")
    algo = {"lora_attn_modules": ["q_proj", "v_proj"], "rank": 4, "alpha": 8}
    base = open_base(base_dir, spec)
    state = base.load_state_dict()
    with training.set_default_dtype(dtype):
        model = build_lora_model(spec, algo)
    load_base_weights(model, state, base_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(0, 0.01)
    return model, base, algo


@pytest.mark.parametrize(
    ("base_dtype", "train_dtype", "checkpoint_format"),
    [
        ("bf16", torch.float32, "meta"),
        ("fp32", torch.bfloat16, "huggingface"),
        ("bf16", torch.float32, "huggingface"),
    ],
)
def test_merged_model_keeps_the_base_dtype_and_is_shareable(
    tmp_path: Path,
    tiny_model: Path,
    tiny_fp32: dict[str, Path],
    base_dtype: str,
    train_dtype: torch.dtype,
    checkpoint_format: str,
) -> None:
    from safetensors.torch import load_file

    base_dir = tiny_model if base_dtype == "bf16" else tiny_fp32["meta"]
    want = {"bf16": torch.bfloat16, "fp32": torch.float32}[base_dtype]
    model, base, algo = _lora_model(base_dir, train_dtype)
    path = save_checkpoint(
        model,
        base=base,
        algo=algo,
        root=tmp_path,
        identifier="c",
        checkpoint_format=checkpoint_format,
    )
    if checkpoint_format == "meta":
        merged = torch.load(path / "consolidated.00.pth", weights_only=True)
    else:
        merged = load_file(path / "model.safetensors")
        config = json.loads((path / "config.json").read_text())
        assert config["torch_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[base_dtype]
    assert {t.dtype for t in merged.values()} == {want}
    assert oct(path.stat().st_mode & 0o777) == "0o755"
    for p in path.rglob("*"):
        assert oct(p.stat().st_mode & 0o777) == ("0o755" if p.is_dir() else "0o644"), p


def test_unknown_checkpoint_format_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    model, base, algo = _lora_model(tiny_model, torch.float32)
    with pytest.raises(ValueError, match="checkpoint_format 'gguf'"):
        save_checkpoint(
            model, base=base, algo=algo, root=tmp_path, identifier="c", checkpoint_format="gguf"
        )


_NO_HF_LIBRARIES = """
import json, sys
for name in ("transformers", "peft", "fairscale", "llama_stack"):
    sys.modules[name] = None  # any import of them now fails
from pipelines.recipe import run_recipe
request, model_dir, data, out = json.loads(sys.argv[1])
result = run_recipe(request, model_dir=model_dir, dataset_path=data, validation_path=None,
                    output_dir=out, checkpoint_format="huggingface")
print(json.dumps(result.to_dict()))
"""


@pytest.mark.parametrize("layout", ["meta", "huggingface"])
def test_training_needs_no_transformers_peft_fairscale_or_llama_stack(
    tmp_path: Path, tiny_model: Path, tiny_hf_sharded: Path, layout: str
) -> None:
    """The trainer image has none of them: training and writing every file must not import
    them (the Hugging Face tokenizer files of a Meta input included)."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["train"]
    assert not [
        r for r in extra if r.startswith(("transformers", "peft", "fairscale", "llama-stack"))
    ]
    model_dir = tiny_model if layout == "meta" else tiny_hf_sharded
    data = write_rows(tmp_path / "train.jsonl", 4)
    request = make_request("job-nohf", str(model_dir), str(data))
    request["training_config"].update(n_epochs=1, max_steps_per_epoch=1)
    args = json.dumps([request, str(model_dir), str(data), str(tmp_path / "out")])
    proc = subprocess.run(
        [sys.executable, "-c", _NO_HF_LIBRARIES, args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    path = Path(result["checkpoints"][0]["path"])
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {
        p.name for p in path.iterdir()
    }
