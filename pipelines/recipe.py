"""The torchtune LoRA single-device fine-tuning recipe, driven by a llama-stack style request.

Honours every field of llama-stack's ``TrainingConfig`` and ``LoraFinetuningConfig``: epochs,
steps per epoch, gradient accumulation, validation steps, batch size, shuffle, data format,
train_on_input, optimizer (adam/adamw/sgd, lr, weight decay, warmup), activation checkpointing
and offloading (CUDA only; a request that does not say gets torchtune's default for the model),
dtype (bf16 falls back to fp32 where the device has no native bf16), LoRA modules/MLP/output,
rank, alpha and DoRA. Everything is checked before the first step.

The loop is torchtune's ``lora_finetune_single_device`` in its parts: the output is chunked into
``CEWithChunkedOutputLoss`` (the fp32 upcast of a 128k-vocabulary logit tensor is never whole),
gradients are normalised by the step's label tokens (``training.scale_grads``) and clipped
(``TrainerSettings.max_grad_norm``, 1.0 as llama-stack's recipe), and ``torch.compile`` of the
layers and the loss is a setting. The device is read once per optimizer step, not per batch.
Each output chunk reaches the projection as a fresh row-major copy
(:func:`contiguous_output_chunks`): as torchtune's model hands it, a chunk (a strided view of
the sequence) makes every chunk copy the whole vocabulary matrix.

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
from typing import Any, Final

from pipelines import tracing
from pipelines.chat_format import IGNORE_INDEX, tokenize
from pipelines.data import read_dataset
from pipelines.logs import event
from pipelines.models import ModelSpec, lookup
from pipelines.result import RunResult
from pipelines.settings import TrainerSettings
from pipelines.validation import require_valid

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]

# CEWithChunkedOutputLoss's default, which torchtune's LoRA configs use.
LOSS_CHUNKS: Final = 8


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
    max_grad_norm: float | None = 1.0  # None: no clipping
    compile: bool = False
    loss_chunks: int = LOSS_CHUNKS

    @classmethod
    def from_request(
        cls, request: Mapping[str, Any], settings: TrainerSettings | None = None
    ) -> RecipeConfig:
        """The request's knobs, the deployment's ``settings`` and the model's defaults.

        :raises pipelines.validation.RequestError: listing every config problem.
        """
        require_valid(request)
        settings = settings or TrainerSettings()
        spec = lookup(request["model"])
        tc = request["training_config"]
        data = tc["data_config"]
        opt = tc.get("optimizer_config") or {}
        eff = tc.get("efficiency_config") or {}
        algo = dict(request["algorithm_config"])
        checkpointing = eff.get("enable_activation_checkpointing")
        offloading = eff.get("enable_activation_offloading")
        return cls(
            job_uuid=request["job_uuid"],
            model=spec.name,
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
            activation_checkpointing=spec.activation_checkpointing
            if checkpointing is None
            else bool(checkpointing),
            activation_offloading=spec.activation_offloading
            if offloading is None
            else bool(offloading),
            dtype=tc.get("dtype") or cls.dtype,
            algorithm=algo,
            max_grad_norm=settings.max_grad_norm,
            compile=settings.compile,
        )


# CPU features that compute in bf16 (x86: AVX512-BF16, AMX; Arm: BF16, SVE-BF16), as
# torch.cpu.get_capabilities() names them.
_CPU_BF16_FEATURES: Final = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def native_bf16(device: Any) -> bool:
    """Whether ``device`` computes in bf16 itself; elsewhere bf16 is emulated, slower than fp32."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(feature) for feature in _CPU_BF16_FEATURES)


def pick_device_and_dtype(requested: str) -> tuple[Any, Any, str]:
    """(device, torch dtype, dtype name): CUDA when available, bf16 only where it is native."""
    import torch
    from torchtune import training

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = requested
    reason = ""
    if requested == "bf16" and not native_bf16(device):
        name, reason = "fp32", f"{device.type} has no native bf16"
    elif requested == "fp16":
        # Mixed fp16 needs loss scaling, which a LoRA recipe does not carry; fp32 is exact.
        name, reason = "fp32", "fp16 training without loss scaling is unstable"
    dtype = training.get_dtype(name, device=device)
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


def peak_memory_kind(device: Any) -> str:
    """What :func:`peak_memory` measures on ``device``."""
    return "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"


def reset_peak_memory(device: Any) -> None:
    """Start a new CUDA peak; a process's peak RSS cannot be reset, so on CPU it accumulates."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> int:
    """Bytes: CUDA's max_memory_allocated since the last reset, or the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def contiguous_output_chunks(model: Any) -> Any:
    """Hand the output projection each chunk of the sequence in a fresh row-major copy; returns
    the hook.

    ``TransformerDecoder.chunked_output`` cuts the hidden state along the sequence, so a chunk
    is a view whose strides still span the whole sequence (even at one sample, where torch
    calls it contiguous). ``F.linear`` of such an input, with a gradient to carry, cannot fold
    it into one matrix product: it runs ``bmm`` against the weight expanded per sample, a copy
    of the whole vocabulary matrix (128,256 x 2,048 for Llama 3.2) for every chunk. With 2 of
    the 1B model's layers and its real vocabulary on CPU (bf16) the forward takes 34.6 s
    instead of 0.37 at batch 2 x 128 tokens, 16.8 s instead of 0.31 at 1 x 256. Copying the
    chunk itself (batch x seq/8 x dim) costs nothing in comparison; the numbers stay the same.
    """
    import torch
    from torch import nn

    output = model.output
    # Tied embeddings (Llama 3.2): TiedLinear is no module, its F.linear wrapper is.
    target = output if isinstance(output, nn.Module) else output.linear
    return target.register_forward_pre_hook(
        lambda _module, args: (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
    )


def _optimizer(cfg: RecipeConfig, params: list[Any], device: Any) -> Any:
    import torch

    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    # One kernel for every parameter on CUDA, as torchtune's LoRA configs ask (fused: True).
    fused = {"fused": True} if device.type == "cuda" and cfg.optimizer_type != "sgd" else {}
    return kinds[cfg.optimizer_type](params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


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
        from torchtune.modules.loss import CEWithChunkedOutputLoss

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
        # As torchtune's recipe: compile, then checkpointing, then the output chunked for the loss.
        self.loss_fn = CEWithChunkedOutputLoss(
            num_output_chunks=cfg.loss_chunks, ignore_index=IGNORE_INDEX
        )
        if cfg.compile:
            training.compile_model(model, verbose=False)
            self.loss_fn = training.compile_loss(self.loss_fn, verbose=False)
        model.set_num_output_chunks(self.loss_fn.num_output_chunks)
        contiguous_output_chunks(model)
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
        self.optimizer = _optimizer(cfg, trainable, self.device)
        self.scheduler = training.get_cosine_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=cfg.num_warmup_steps,
            num_training_steps=self.total_steps,
        )
        # What shaped each epoch's speed and memory, reported next to them.
        self.settings = {
            "device": self.device.type,
            "dtype": self.dtype_name,
            "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": accum,
            "max_seq_len": self.spec.max_seq_len,
            "activation_checkpointing": cfg.activation_checkpointing,
            "activation_offloading": self.offload,
            "compile": cfg.compile,
            "loss_chunks": cfg.loss_chunks,
            "max_grad_norm": cfg.max_grad_norm,
            "lora_rank": int(cfg.algorithm.get("rank") or 0),
            "trainable_params": sum(p.numel() for p in trainable),
        }
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
            checkpoint_format=checkpoint_format,
            **self.settings,
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
        """(summed token loss on the device, label tokens, input tokens) for one batch.

        The counts come from the batch while it is still on the host: no device sync.
        """
        import torch

        tokens = batch["tokens"]
        labels = batch["labels"]
        # Shift left by one: position i predicts token i + 1 (the last predicts nothing).
        labels = torch.hstack([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)])
        n_labels = int((labels != IGNORE_INDEX).sum())
        n_inputs = int((tokens != self.tokenizer.pad_id).sum())
        tokens = tokens.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.act_ctx:
            logits = self.model(tokens)  # a list of LOSS_CHUNKS chunks along the sequence
        loss = self.loss_fn(logits, labels) * n_labels  # the loss is a mean over label tokens
        del logits  # as torchtune's recipe: otherwise they stay alive through backward
        return loss, n_labels, n_inputs

    def _validate(self) -> tuple[float | None, float | None]:
        import torch

        if not self.val_samples or self.cfg.max_validation_steps == 0:
            return None, None
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        with torch.no_grad():
            for i, batch in enumerate(self._loader(self.val_samples, shuffle=False)):
                if self.cfg.max_validation_steps is not None and i >= self.cfg.max_validation_steps:
                    break
                loss, n, _ = self._loss_sum(batch)
                total += loss
                count += n
        self.model.train()
        mean = float(total) / max(count, 1)  # the one device read of the validation
        return mean, math.exp(min(mean, 80.0))

    def _optimizer_step(self, n_labels: int) -> Any:
        """Normalise the accumulated gradients by the step's label tokens, clip, step.

        Returns the gradient norm before clipping (a device tensor), or None without clipping.
        """
        import torch
        from torchtune import training

        # Filled on the device (no host-to-device copy, so no sync).
        scale = torch.full((), 1.0 / max(n_labels, 1), device=self.device)
        training.scale_grads(self.model, scale)
        norm = None
        if self.cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm=self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _epoch_report(self, started: float, tokens: int) -> dict[str, Any]:
        """The epoch's speed and peak memory so far, and the settings that shaped them."""
        seconds = time.perf_counter() - started
        return {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds else None,
            "peak_memory_bytes": peak_memory(self.device),
            "peak_memory": peak_memory_kind(self.device),
            "settings": self.settings,
        }

    def train(self) -> RunResult:
        """Run every epoch, checkpointing each; return the completed result."""
        import torch

        from pipelines.checkpoints import save_checkpoint

        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        step = 0
        checkpoints: list[dict[str, Any]] = []
        metrics: list[dict[str, Any]] = []
        peaks: list[int] = []
        reports: list[dict[str, Any]] = []  # each finished epoch's speed, memory and settings
        self.model.train()
        for epoch in range(cfg.n_epochs):
            reset_peak_memory(self.device)
            started = time.perf_counter()
            epoch_span = tracing.start("pipelines", "epoch", attributes={"epoch": epoch})
            epoch_loss, epoch_labels, epoch_inputs, epoch_steps = 0.0, 0, 0, 0
            group_loss: Any = None  # the summed loss of the batches so far, on the device
            group_labels, in_group = 0, 0
            report: dict[str, Any] = {}
            batches = iter(self.train_loader)
            while epoch_steps < self.steps_per_epoch:
                batch = next(batches, None)
                if batch is not None:
                    loss, n_labels, n_inputs = self._loss_sum(batch)
                    loss.backward()
                    loss = loss.detach()
                    group_loss = loss if group_loss is None else group_loss + loss
                    group_labels += n_labels
                    epoch_inputs += n_inputs
                    in_group += 1
                if in_group and (in_group == accum or batch is None):
                    norm = self._optimizer_step(group_labels)
                    step += 1
                    epoch_steps += 1
                    # The one device read of the step: its loss (and gradient norm).
                    read = torch.stack(
                        [group_loss.float()] + ([norm.float()] if norm is not None else [])
                    ).tolist()
                    step_loss = read[0] / max(group_labels, 1)
                    if not math.isfinite(step_loss):
                        raise FloatingPointError(
                            f"training loss became {step_loss} at step "
                            f"{step}; try a lower optimizer_config.lr"
                        )
                    epoch_loss += read[0]
                    epoch_labels += group_labels
                    group_loss, group_labels, in_group = None, 0, 0
                    record = {
                        "step": step,
                        "total_steps": self.total_steps,
                        "epoch": epoch,
                        "loss": step_loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": read[1] if norm is not None else None,
                    }
                    if epoch_steps == self.steps_per_epoch:  # the epoch's last: its report
                        report = self._epoch_report(started, epoch_inputs)
                        reports.append({"epoch": epoch, "steps": epoch_steps, **report})
                    if reports:  # every record carries them: a throttled record loses none
                        record["epochs"] = list(reports)
                    self.progress(record)
                if batch is None:
                    break
            peaks.append(report["peak_memory_bytes"])
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
            metrics.append({**training_metrics, "steps": epoch_steps, **report})
            event(log, "epoch finished", **metrics[-1], checkpoint=str(path))
            tracing.end(*epoch_span, attributes={**metrics[-1], "loss": train_loss})
        peak = max(peaks)
        resources = {
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else "cpu",
            "dtype": self.dtype_name,
            "requested_dtype": cfg.dtype,
            "peak_memory_bytes": peak,
            "peak_memory_gb": round(peak / 2**30, 3),
            "peak_memory": peak_memory_kind(self.device),
            "settings": self.settings,
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
    settings: TrainerSettings | None = None,
) -> RunResult:
    """Check, load, train, checkpoint. Raises (naming the field or file) on any bad input."""
    cfg = RecipeConfig.from_request(request, settings)
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


__all__ = [
    "LOSS_CHUNKS",
    "RecipeConfig",
    "Trainer",
    "contiguous_output_chunks",
    "native_bf16",
    "peak_memory",
    "peak_memory_kind",
    "pick_device_and_dtype",
    "reset_peak_memory",
    "run_recipe",
]
