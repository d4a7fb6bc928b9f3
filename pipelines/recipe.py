"""The torchtune LoRA single-device fine-tuning recipe, driven by a llama-stack style request.

Honours every field of llama-stack's ``TrainingConfig`` and ``LoraFinetuningConfig``: epochs,
steps per epoch, gradient accumulation, validation steps, batch size, shuffle, data format,
train_on_input, optimizer (adam/adamw/sgd, lr, weight decay, warmup), activation checkpointing
and offloading (CUDA only), dtype (bf16 falls back to fp32 where the device lacks it), LoRA
modules/MLP/output, rank, alpha and DoRA. Everything is checked before the first step.

Imports nothing from llama-stack: a training image needs torch, torchtune, torchao and this
project only.
"""

from __future__ import annotations

import logging
import math
import resource
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines import tracing
from pipelines.chat_format import IGNORE_INDEX, tokenize
from pipelines.data import read_dataset
from pipelines.logs import event
from pipelines.models import ModelSpec, lookup
from pipelines.result import RunResult
from pipelines.validation import require_valid

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RecipeConfig:
    """The training knobs of one request, defaults filled in. Build with :meth:`from_request`."""

    job_uuid: str
    model: str
    n_epochs: int
    max_steps_per_epoch: int | None = None  # None: the whole epoch
    gradient_accumulation_steps: int = 1
    max_validation_steps: int | None = None  # None: the whole validation set
    batch_size: int = 1
    shuffle: bool = True
    data_format: str = "instruct"
    train_on_input: bool = False
    optimizer_type: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    num_warmup_steps: int = 0
    activation_checkpointing: bool = False
    activation_offloading: bool = False
    dtype: str = "bf16"
    algorithm: dict[str, Any] = field(default_factory=dict)
    seed: int = 42

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> RecipeConfig:
        """:raises pipelines.validation.RequestError: listing every config problem."""
        require_valid(request)
        tc = request["training_config"]
        data = tc["data_config"]
        opt = tc.get("optimizer_config") or {}
        eff = tc.get("efficiency_config") or {}
        algo = dict(request["algorithm_config"])
        return cls(
            job_uuid=request["job_uuid"],
            model=lookup(request["model"]).name,
            n_epochs=int(tc["n_epochs"]),
            max_steps_per_epoch=tc.get("max_steps_per_epoch"),
            gradient_accumulation_steps=int(tc.get("gradient_accumulation_steps") or 1),
            max_validation_steps=tc.get("max_validation_steps"),
            batch_size=int(data["batch_size"]),
            shuffle=bool(data.get("shuffle", True)),
            data_format=data["data_format"],
            train_on_input=bool(data.get("train_on_input") or False),
            optimizer_type=opt.get("optimizer_type", cls.optimizer_type),
            lr=float(opt.get("lr", cls.lr)),
            weight_decay=float(opt.get("weight_decay", cls.weight_decay)),
            num_warmup_steps=int(opt.get("num_warmup_steps", cls.num_warmup_steps)),
            activation_checkpointing=bool(eff.get("enable_activation_checkpointing") or False),
            activation_offloading=bool(eff.get("enable_activation_offloading") or False),
            dtype=tc.get("dtype") or cls.dtype,
            algorithm=algo,
        )


def pick_device_and_dtype(requested: str) -> tuple[Any, Any, str]:
    """(device, torch dtype, dtype name): CUDA when available, bf16 only where supported."""
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda")
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        device = torch.device("cpu")
        bf16_ok = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    name = requested
    reason = ""
    if requested == "bf16" and not bf16_ok:
        name, reason = "fp32", f"{device.type} has no native bf16"
    elif requested == "fp16":
        # Mixed fp16 needs loss scaling, which a LoRA recipe does not carry; fp32 is exact.
        name, reason = "fp32", "fp16 training without loss scaling is unstable"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    event(
        log,
        "device selected",
        device=device.type,
        dtype=name,
        requested_dtype=requested,
        fallback_reason=reason or None,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )
    return device, dtype, name


def _peak_memory(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _optimizer(cfg: RecipeConfig, params: list[Any]) -> Any:
    import torch

    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    return kinds[cfg.optimizer_type](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """One run of the recipe; construct (checks everything, loads model and data), then train."""

    def __init__(
        self,
        cfg: RecipeConfig,
        *,
        model_dir: Path,
        dataset_path: Path,
        validation_path: Path | None,
        output_dir: Path,
        checkpoint_format: str,
        progress: ProgressFn | None = None,
    ) -> None:
        import torch
        from torchtune import training
        from torchtune.modules import TransformerSelfAttentionLayer

        # torchtune's RMSNorm normalises in fp32 against bf16 weights on purpose.
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        from torchtune.modules.peft import get_adapter_params, set_trainable_params

        from pipelines import modeling

        self.cfg = cfg
        self.spec: ModelSpec = lookup(cfg.model)
        self.model_dir = Path(model_dir)
        self.output_dir = Path(output_dir)
        self.checkpoint_format = checkpoint_format
        self.progress = progress or (lambda _record: None)

        # Data and model files first: the cheap checks fail before any weights load.
        self.train_rows = read_dataset(dataset_path, cfg.data_format, label="dataset")
        self.val_rows = (
            read_dataset(validation_path, cfg.data_format, label="validation_dataset")
            if validation_path
            else None
        )
        self.base = modeling.open_base(self.model_dir, self.spec)
        tokenizer = self.base.tokenizer(self.spec.max_seq_len)
        train = tokenize(self.train_rows, tokenizer, cfg.train_on_input, label="dataset")
        val = (
            tokenize(self.val_rows, tokenizer, cfg.train_on_input, label="validation_dataset")
            if self.val_rows
            else None
        )
        self.rows_without_trainable_tokens = train.without_trainable_tokens
        if train.without_trainable_tokens:
            event(
                log,
                "rows skipped: cut to the sequence limit, they keep no token to learn from",
                level=logging.WARNING,
                rows=train.without_trainable_tokens,
                of=len(self.train_rows),
                max_seq_len=self.spec.max_seq_len,
            )
        base = self.base.load_state_dict()

        self.device, self.dtype, self.dtype_name = pick_device_and_dtype(cfg.dtype)
        training.set_seed(cfg.seed)
        with training.set_default_dtype(self.dtype), self.device:
            model = modeling.build_lora_model(self.spec, cfg.algorithm)
        modeling.load_base_weights(model, base, self.model_dir, self.spec.name)
        del base
        for module in model.modules():
            if hasattr(module, "initialize_dora_magnitude"):
                module.initialize_dora_magnitude()
        set_trainable_params(model, get_adapter_params(model))
        if cfg.activation_checkpointing:
            training.set_activation_checkpointing(
                model, auto_wrap_policy={TransformerSelfAttentionLayer}
            )
        self.offload = cfg.activation_offloading and self.device.type == "cuda"
        if cfg.activation_offloading and not self.offload:
            event(
                log, "activation offloading needs CUDA; running without it", device=self.device.type
            )
        self.act_ctx = training.get_act_offloading_ctx_manager(model, self.offload)
        self.model = model
        self.tokenizer = tokenizer
        self.train_samples = train.samples
        self.val_samples = val.samples if val else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.train_loader = self._loader(self.train_samples, shuffle=cfg.shuffle)
        batches = len(self.train_loader)
        accum = cfg.gradient_accumulation_steps
        self.steps_per_epoch = max(1, math.ceil(batches / accum))
        if cfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * cfg.n_epochs
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable = trainable
        self.optimizer = _optimizer(cfg, trainable)
        self.scheduler = training.get_cosine_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=cfg.num_warmup_steps,
            num_training_steps=self.total_steps,
        )
        event(
            log,
            "recipe ready",
            model=self.spec.name,
            rows=len(self.train_rows),
            validation_rows=len(self.val_rows or []),
            rows_without_trainable_tokens=self.rows_without_trainable_tokens,
            base_layout=self.base.layout.kind,
            base_dtype=str(self.base.dtype).removeprefix("torch."),
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            trainable_params=sum(p.numel() for p in trainable),
            checkpoint_format=checkpoint_format,
            activation_checkpointing=cfg.activation_checkpointing,
            activation_offloading=self.offload,
        )

    def _loader(self, samples: list[dict], shuffle: bool) -> Any:
        from functools import partial

        from torch.utils.data import DataLoader
        from torchtune.data import padded_collate_sft

        return DataLoader(
            samples,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=self.generator,
            collate_fn=partial(
                padded_collate_sft, padding_idx=self.tokenizer.pad_id, ignore_idx=IGNORE_INDEX
            ),
        )

    def _loss_sum(self, batch: dict[str, Any]) -> tuple[Any, int, int]:
        """(summed token loss, label tokens, input tokens) for one batch."""
        import torch
        import torch.nn.functional as F

        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        with self.act_ctx:
            logits = self.model(tokens)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        n_labels = int((labels != IGNORE_INDEX).sum())
        n_inputs = int((tokens != self.tokenizer.pad_id).sum())
        return loss, n_labels, n_inputs

    def _validate(self) -> tuple[float | None, float | None]:
        import torch

        if not self.val_samples or self.cfg.max_validation_steps == 0:
            return None, None
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i, batch in enumerate(self._loader(self.val_samples, shuffle=False)):
                if self.cfg.max_validation_steps is not None and i >= self.cfg.max_validation_steps:
                    break
                loss, n, _ = self._loss_sum(batch)
                total += float(loss)
                count += n
        self.model.train()
        mean = total / max(count, 1)
        return mean, math.exp(min(mean, 80.0))

    def train(self) -> RunResult:
        """Run every epoch, checkpointing each; return the completed result."""
        from pipelines.checkpoints import save_checkpoint

        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        step = 0
        checkpoints: list[dict[str, Any]] = []
        metrics: list[dict[str, Any]] = []
        self.model.train()
        for epoch in range(cfg.n_epochs):
            started = time.perf_counter()
            epoch_span = tracing.start("pipelines", "epoch", attributes={"epoch": epoch})
            epoch_loss, epoch_labels, epoch_inputs, epoch_steps = 0.0, 0, 0, 0
            group_loss, group_labels, in_group = 0.0, 0, 0
            batches = iter(self.train_loader)
            while epoch_steps < self.steps_per_epoch:
                batch = next(batches, None)
                if batch is not None:
                    loss, n_labels, n_inputs = self._loss_sum(batch)
                    loss.backward()
                    group_loss += float(loss.detach())
                    group_labels += n_labels
                    epoch_inputs += n_inputs
                    in_group += 1
                if in_group and (in_group == accum or batch is None):
                    scale = 1.0 / max(group_labels, 1)
                    for param in self.trainable:
                        if param.grad is not None:
                            param.grad.mul_(scale)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    step += 1
                    epoch_steps += 1
                    step_loss = group_loss / max(group_labels, 1)
                    if not math.isfinite(step_loss):
                        raise FloatingPointError(
                            f"training loss became {step_loss} at step "
                            f"{step}; try a lower optimizer_config.lr"
                        )
                    epoch_loss += group_loss
                    epoch_labels += group_labels
                    group_loss, group_labels, in_group = 0.0, 0, 0
                    record = {
                        "step": step,
                        "total_steps": self.total_steps,
                        "epoch": epoch,
                        "loss": step_loss,
                        "lr": self.scheduler.get_last_lr()[0],
                    }
                    self.progress(record)
                if batch is None:
                    break
            seconds = time.perf_counter() - started
            train_loss = epoch_loss / max(epoch_labels, 1)
            val_loss, perplexity = self._validate()
            identifier = f"{self.spec.name}-sft-{epoch}"
            path = save_checkpoint(
                self.model,
                base=self.base,
                algo=cfg.algorithm,
                root=self.output_dir,
                identifier=identifier,
                checkpoint_format=self.checkpoint_format,
            )
            training_metrics = {
                "epoch": epoch,
                "train_loss": train_loss,
                "validation_loss": val_loss,
                "perplexity": perplexity,
            }
            checkpoints.append(
                {
                    "identifier": identifier,
                    "created_at": datetime.now(UTC).isoformat(),
                    "epoch": epoch,
                    "post_training_job_id": cfg.job_uuid,
                    "path": str(path),
                    "training_metrics": training_metrics,
                }
            )
            metrics.append(
                {
                    **training_metrics,
                    "steps": epoch_steps,
                    "tokens": epoch_inputs,
                    "seconds": seconds,
                    "tokens_per_second": epoch_inputs / seconds if seconds else None,
                }
            )
            event(log, "epoch finished", **metrics[-1], checkpoint=str(path))
            tracing.end(*epoch_span, attributes={**metrics[-1], "loss": train_loss})
        peak = _peak_memory(self.device)
        import torch

        resources = {
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else "cpu",
            "dtype": self.dtype_name,
            "requested_dtype": cfg.dtype,
            "peak_memory_bytes": peak,
            "peak_memory_gb": round(peak / 2**30, 3),
        }
        return RunResult(
            job_uuid=cfg.job_uuid,
            status="completed",
            checkpoints=checkpoints,
            metrics=metrics,
            resources_allocated=resources,
            dataset_rows=len(self.train_rows),
            rows_without_trainable_tokens=self.rows_without_trainable_tokens,
        )


def run_recipe(
    request: Mapping[str, Any],
    *,
    model_dir: Path,
    dataset_path: Path,
    validation_path: Path | None,
    output_dir: Path,
    checkpoint_format: str = "meta",
    progress: ProgressFn | None = None,
) -> RunResult:
    """Check, load, train, checkpoint. Raises (naming the field or file) on any bad input."""
    cfg = RecipeConfig.from_request(request)
    trainer = Trainer(
        cfg,
        model_dir=model_dir,
        dataset_path=dataset_path,
        validation_path=validation_path,
        output_dir=output_dir,
        checkpoint_format=checkpoint_format,
        progress=progress,
    )
    return trainer.train()


__all__ = ["RecipeConfig", "Trainer", "pick_device_and_dtype", "run_recipe"]
