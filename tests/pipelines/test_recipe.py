"""The recipe's training loop on the tiny model (fp32, so the tolerances are tight): the chunked
loss is the full loss, clipping bounds the gradient norm, activation checkpointing and
torch.compile change nothing but speed and memory, the device is read once per optimizer step,
and each epoch reports its speed, peak memory and the settings that shaped them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.chat_format import IGNORE_INDEX
from pipelines.models import MODELS
from pipelines.progress import ProgressReporter
from pipelines.recipe import LOSS_CHUNKS, RecipeConfig, Trainer, run_recipe
from pipelines.settings import TrainerSettings
from tests.pipelines.pipeline_helpers import make_request, write_rows


def _request(
    tmp: Path, model_dir: Path, model: str = "llama3.2-tiny", **training: Any
) -> dict[str, Any]:
    data = write_rows(tmp / "train.jsonl", 24)
    request = make_request("job-recipe", str(model_dir), str(data), model=model)
    defaults = {"n_epochs": 1, "max_steps_per_epoch": 3, "gradient_accumulation_steps": 1}
    request["training_config"].update(dtype="fp32", **{**defaults, **training})
    return request


def _trainer(tmp: Path, request: dict[str, Any], **config: Any) -> Trainer:
    cfg = dataclasses.replace(RecipeConfig.from_request(request), **config)
    return Trainer(
        cfg,
        model_dir=Path(request["model_artifact"]["uri"]),
        dataset_path=Path(request["dataset"]["uri"]),
        validation_path=None,
        output_dir=tmp / "out",
        checkpoint_format="meta",
    )


def _step_losses(trainer: Trainer) -> list[float]:
    records: list[dict[str, Any]] = []
    trainer.progress = records.append
    trainer.train()
    return [r["loss"] for r in records]


def test_chunked_loss_equals_the_full_loss(tmp_path: Path, tiny_fp32: dict[str, Path]) -> None:
    trainer = _trainer(tmp_path, _request(tmp_path, tiny_fp32["meta"]))
    batch = next(iter(trainer.train_loader))
    assert trainer.loss_fn.num_output_chunks == LOSS_CHUNKS
    assert len(trainer.model(batch["tokens"])) == LOSS_CHUNKS  # the output really is chunked
    with torch.no_grad():
        chunked, n_labels, _ = trainer._loss_sum(batch)
        trainer.model.set_num_output_chunks(0)  # the whole logits tensor, as the recipe had it
        logits = trainer.model(batch["tokens"])
    labels = torch.hstack(
        [batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)]
    )
    full = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    assert n_labels == int((labels != IGNORE_INDEX).sum()) > 0
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0)


class _Ops(TorchDispatchMode):
    """Records the aten ops that run, with their tensor arguments' shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((str(func.overloadpacket.__name__), shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_output_projection_is_one_matrix_product_per_chunk(
    tmp_path: Path, tiny_fp32: dict[str, Path], batch_size: int
) -> None:
    # The sequence chunks are strided views (at one sample too, though torch calls that one
    # contiguous); projecting one as it is runs bmm against the vocabulary matrix copied per
    # sample (35 s of a 37 s step of the 1B model on CPU). The recipe hands the projection a
    # row-major copy of each chunk instead.
    request = _request(tmp_path, tiny_fp32["meta"])
    request["training_config"]["data_config"]["batch_size"] = batch_size
    trainer = _trainer(tmp_path, request)
    batch = next(iter(trainer.train_loader))
    assert batch["tokens"].shape[0] == batch_size
    vocab = MODELS["llama3.2-tiny"].arch.vocab_size
    with _Ops() as recorded:
        loss, n_labels, _ = trainer._loss_sum(batch)
        loss.backward()
    assert not [op for op in recorded.ops if op[0] == "bmm"]
    projections = [s for op, s in recorded.ops if op == "mm" and s[-1][-1] == vocab]
    assert len(projections) == LOSS_CHUNKS  # one 2-D product per chunk
    # The same numbers as the strided projection.
    plain = _trainer(tmp_path / "plain", request)
    plain_hooks = plain.model.output.linear._forward_pre_hooks
    assert len(plain_hooks) == 1
    plain_hooks.clear()
    with torch.no_grad():
        strided, _, _ = plain._loss_sum(next(iter(plain.train_loader)))
    torch.testing.assert_close(loss.detach(), strided, rtol=1e-6, atol=0)


def _norms_at_step(trainer: Trainer) -> list[float]:
    """The trainable parameters' gradient norm as the optimizer sees it, at every step."""
    norms: list[float] = []

    def record(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
        grads = [p.grad for p in trainer.trainable if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer.optimizer.register_step_pre_hook(record)
    return norms


def test_clipping_bounds_the_gradient_norm(tmp_path: Path, tiny_fp32: dict[str, Path]) -> None:
    request = _request(tmp_path, tiny_fp32["meta"])
    assert RecipeConfig.from_request(request).max_grad_norm == 1.0  # llama-stack's default
    limit = 0.05  # the tiny model's natural norm is ~0.4: every step is clipped
    clipped = _trainer(tmp_path / "a", request, max_grad_norm=limit)
    seen = _norms_at_step(clipped)
    records: list[dict[str, Any]] = []
    clipped.progress = records.append
    clipped.train()
    before = [r["grad_norm"] for r in records]
    assert len(seen) == len(before) == 3
    assert all(norm > limit for norm in before)  # the norm before clipping, as recorded
    assert all(norm <= limit * (1 + 1e-5) for norm in seen)
    assert seen == pytest.approx([limit] * 3, rel=1e-5)

    free = _trainer(tmp_path / "b", request, max_grad_norm=None)
    unclipped = _norms_at_step(free)
    free.train()
    assert unclipped[0] == pytest.approx(before[0], rel=1e-5)  # same first step, not clipped
    assert unclipped[0] > limit


def test_activation_checkpointing_gives_the_same_losses(
    tmp_path: Path, tiny_fp32: dict[str, Path]
) -> None:
    request = _request(tmp_path, tiny_fp32["meta"])
    plain = _trainer(tmp_path / "off", request, activation_checkpointing=False)
    checkpointed = _trainer(tmp_path / "on", request, activation_checkpointing=True)

    def wrapped(trainer: Trainer) -> int:
        return sum("checkpoint_wrapped" in name for name, _ in trainer.model.named_modules())

    assert wrapped(plain) == 0 and wrapped(checkpointed) > 0  # the setting took effect
    off, on = _step_losses(plain), _step_losses(checkpointed)
    assert len(off) == len(on) == 3
    assert on == pytest.approx(off, rel=1e-6)


def test_compile_gives_the_same_losses(tmp_path: Path, tiny_fp32: dict[str, Path]) -> None:
    request = _request(tmp_path, tiny_fp32["meta"], max_steps_per_epoch=2)
    eager = _step_losses(_trainer(tmp_path / "eager", request))
    compiled = _trainer(tmp_path / "compiled", request, compile=True)
    assert compiled.settings["compile"] is True
    assert _step_losses(compiled) == pytest.approx(eager, rel=1e-5)


class _CountedReads(torch.Tensor):
    """A loss tensor that counts how often its value (or one derived from it) reaches Python."""

    reads = 0
    _READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in cls._READS:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_loss_is_read_once_per_optimizer_step(
    tmp_path: Path, tiny_fp32: dict[str, Path]
) -> None:
    request = _request(
        tmp_path, tiny_fp32["meta"], gradient_accumulation_steps=4, max_steps_per_epoch=2
    )
    trainer = _trainer(tmp_path, request)
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda logits, labels: loss_fn(logits, labels).as_subclass(_CountedReads)
    _CountedReads.reads = 0
    losses = _step_losses(trainer)
    assert len(losses) == 2  # 8 micro-batches, 2 optimizer steps
    assert _CountedReads.reads == 2


def test_each_epoch_reports_speed_memory_and_settings(
    tmp_path: Path, tiny_fp32: dict[str, Path]
) -> None:
    request = _request(
        tmp_path,
        tiny_fp32["meta"],
        n_epochs=2,
        gradient_accumulation_steps=2,
        max_steps_per_epoch=2,
    )
    reporter = ProgressReporter(tmp_path / "progress.json")
    records: list[dict[str, Any]] = []

    def progress(record: dict[str, Any]) -> None:
        records.append(record)
        reporter(record)

    result = run_recipe(
        request,
        model_dir=tiny_fp32["meta"],
        dataset_path=Path(request["dataset"]["uri"]),
        validation_path=None,
        output_dir=tmp_path / "out",
        progress=progress,
        settings=TrainerSettings(max_grad_norm=0.5),
    )
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # From an epoch's last step on, every record carries every finished epoch's report.
    assert [len(r.get("epochs", ())) for r in records] == [0, 1, 1, 2]
    assert records[2]["epochs"] == records[1]["epochs"] == records[3]["epochs"][:1]
    reports = records[3]["epochs"]
    assert [(r["epoch"], r["steps"]) for r in reports] == [(0, 2), (1, 2)]
    want_settings = {
        "device": "cpu",
        "dtype": "fp32",
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_seq_len": 256,
        "activation_checkpointing": False,
        "activation_offloading": False,
        "compile": False,
        "loss_chunks": LOSS_CHUNKS,
        "max_grad_norm": 0.5,
        "lora_rank": 4,
    }
    for metrics, report in zip(result.metrics, reports, strict=True):
        assert metrics["tokens"] > 0 and metrics["seconds"] > 0
        assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens"] / metrics["seconds"])
        assert metrics["peak_memory"] == "process_peak_rss"
        assert metrics["peak_memory_bytes"] > 100 * 2**20  # torch alone takes more
        assert want_settings.items() <= metrics["settings"].items()
        assert metrics["settings"]["trainable_params"] > 0
        for key in ("tokens", "seconds", "tokens_per_second", "peak_memory_bytes", "settings"):
            assert report[key] == metrics[key], key
    resources = result.resources_allocated
    assert resources["peak_memory_bytes"] == max(m["peak_memory_bytes"] for m in result.metrics)
    assert resources["settings"] == result.metrics[0]["settings"]
    # The progress file holds the last step's record, the epoch reports in it.
    written = json.loads((tmp_path / "progress.json").read_text())
    assert written["step"] == 4 and written["epochs"] == reports
    assert written["epochs"][1]["settings"]["max_grad_norm"] == 0.5
    assert written["grad_norm"] > 0 and written["lr"] == records[3]["lr"]


# The torchtune 0.5.0 config each registry model's defaults come from.
_TORCHTUNE_CONFIGS = {
    "Llama3.2-1B-Instruct": "llama3_2/1B_lora_single_device.yaml",
    "Llama3.2-3B-Instruct": "llama3_2/3B_lora_single_device.yaml",
    "Llama3.1-8B-Instruct": "llama3_1/8B_lora_single_device.yaml",
}


@pytest.mark.parametrize("model", sorted(_TORCHTUNE_CONFIGS))
def test_efficiency_defaults_are_torchtunes(tmp_path: Path, model: str) -> None:
    # torchtune installs its recipes and configs as `recipes/`, which refuses to be imported.
    spec = importlib.util.find_spec("recipes")
    assert spec is not None and spec.submodule_search_locations
    configs = Path(spec.submodule_search_locations[0]) / "configs"
    config = yaml.safe_load((configs / _TORCHTUNE_CONFIGS[model]).read_text())
    request = _request(tmp_path, tmp_path, model=model)
    del request["training_config"]["efficiency_config"]
    cfg = RecipeConfig.from_request(request)
    assert cfg.activation_checkpointing is config["enable_activation_checkpointing"]
    assert cfg.activation_offloading is config["enable_activation_offloading"]
    assert cfg.compile is config["compile"]
    assert (MODELS[model].activation_checkpointing, cfg.loss_chunks) == (
        config["enable_activation_checkpointing"],
        LOSS_CHUNKS,
    )
    assert config["loss"]["_component_"] == "torchtune.modules.loss.CEWithChunkedOutputLoss"
    # What a request says wins over the model's default.
    request["training_config"]["efficiency_config"] = {
        "enable_activation_checkpointing": not config["enable_activation_checkpointing"],
        "enable_activation_offloading": None,
    }
    cfg = RecipeConfig.from_request(request)
    assert cfg.activation_checkpointing is not config["enable_activation_checkpointing"]
    assert cfg.activation_offloading is config["enable_activation_offloading"]
