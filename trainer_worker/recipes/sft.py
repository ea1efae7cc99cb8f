"""Supervised fine-tuning recipe: LoRA (or full fine-tuning) with TRL's SFTTrainer.

Reads like a torchtune recipe: ``setup`` loads the model, data and trainer from the job spec, ``train``
runs it, ``save`` writes the adapter (and, if asked, the merged model), ``cleanup`` releases memory. Metrics
leave only through the :class:`~trainer_worker.events.EventSink`.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback, PreTrainedModel
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template
from tuneforge.v1 import job_pb2

from trainer_worker import checkpointing, distributed
from trainer_worker.errors import Cancelled, TrainingError
from trainer_worker.events import EventSink
from trainer_worker.recipes.callbacks import DivergenceWatchdog, MetricsCallback, StopCallback
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import StopSignal

SCHEDULERS = {
    job_pb2.LR_SCHEDULER_COSINE: "cosine",
    job_pb2.LR_SCHEDULER_LINEAR: "linear",
    job_pb2.LR_SCHEDULER_CONSTANT: "constant",
    job_pb2.LR_SCHEDULER_POLYNOMIAL: "polynomial",
    job_pb2.LR_SCHEDULER_COSINE_WITH_MIN_LR: "cosine_with_min_lr",
    job_pb2.LR_SCHEDULER_CONSTANT_WITH_WARMUP: "constant_with_warmup",
}
OPTIMIZERS = {
    job_pb2.OPTIMIZER_ADAMW: "adamw_torch",
    job_pb2.OPTIMIZER_SGD: "sgd",
    job_pb2.OPTIMIZER_ADAFACTOR: "adafactor",
    job_pb2.OPTIMIZER_ADAMW_8BIT: "adamw_bnb_8bit",
    job_pb2.OPTIMIZER_PAGED_ADAMW: "paged_adamw_32bit",
    job_pb2.OPTIMIZER_PAGED_ADAMW_8BIT: "paged_adamw_8bit",
}
BITSANDBYTES_OPTIMIZERS = {"adamw_bnb_8bit", "paged_adamw_32bit", "paged_adamw_8bit"}


class SFTRecipe:
    """One SFT run of one job attempt."""

    def __init__(self, cfg: RunConfig, spec: job_pb2.JobSpec, sink: EventSink, stop: StopSignal) -> None:
        self.cfg, self.spec, self.sink, self.stop = cfg, spec, sink, stop
        self.hp = spec.hyperparameters
        self.full = spec.adapter == job_pb2.ADAPTER_TYPE_FULL
        self.cuda = torch.cuda.is_available()
        self.metrics = MetricsCallback(sink)
        self.watchdog = DivergenceWatchdog()
        self.trainer: SFTTrainer | None = None
        # Whether TRL masks non-assistant tokens itself; decided by the data in _load_data.
        self.assistant_only_loss = False

    def run(self) -> tuple[Path, Path | None, dict[str, float]]:
        """setup -> train -> save -> cleanup; returns (adapter_dir, merged_dir, final_metrics)."""
        try:
            self.setup()
            self.train()
            adapter_dir, merged_dir = self.save()
            return adapter_dir, merged_dir, self.final_metrics()
        finally:
            self.cleanup()

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.tokenizer = self._load_tokenizer()
        train, validation = self._load_data()  # before the model: bad data should fail fast
        model = self._load_model()
        self._check_stop()
        callbacks = [self.metrics, self.watchdog, StopCallback(self.stop)]
        callbacks += checkpointing.callbacks(self.cfg, self.sink)
        args = self._training_args(has_validation=validation is not None)
        if args.load_best_model_at_end:
            early = self.hp.early_stopping
            callbacks.append(EarlyStoppingCallback(early.patience, early.min_delta))
        device = "cuda" if self.cuda else "cpu"
        wanted = self.spec.hardware.gpu_type
        if wanted and wanted != "cpu" and not self.cuda:
            self.sink.log(
                f"The job asked for {wanted} but this worker has no GPU; training on CPU.", "warning"
            )
        self.sink.log(f"Building the trainer: {len(train)} training rows on {device}.")
        self.trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            processing_class=self.tokenizer,
            peft_config=None if self.full else self._lora_config(),
            callbacks=callbacks,
        )
        if len(self.trainer.train_dataset) == 0:
            raise TrainingError("BAD_TRAINING_DATA", "No training examples were left after tokenization.")
        self._check_stop()

    def _load_tokenizer(self) -> Any:
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.cfg.model_path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise TrainingError(
                "MODEL_NOT_FOUND", f"Could not load the tokenizer of the base model: {exc}"
            ) from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_model(self) -> PreTrainedModel:
        self.sink.log(f"Loading the base model from {self.cfg.model_path}.")
        # Adapters on a GPU train in the compute dtype; full fine-tuning keeps fp32 master weights.
        dtype = self._compute_dtype() if self.cuda and not self.full else torch.float32
        try:
            return AutoModelForCausalLM.from_pretrained(
                self.cfg.model_path, dtype=dtype, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise TrainingError("MODEL_NOT_FOUND", f"Could not load the base model: {exc}") from exc

    def _load_data(self) -> tuple[Dataset, Dataset | None]:
        train = self._read_jsonl(self.cfg.train_file)
        validation = self._read_jsonl(self.cfg.validation_file) if self.cfg.validation_file else None
        conversational = "messages" in train.column_names
        if conversational and not self.tokenizer.chat_template:
            raise TrainingError(
                "BAD_TRAINING_DATA",
                "The training data is chat-formatted but the base model's tokenizer has no chat template.",
            )
        self.assistant_only_loss = self.hp.assistant_only_loss and conversational
        if self.hp.assistant_only_loss and not conversational:
            self.sink.log(
                "assistant_only_loss applies to chat data only; training on every token.", "warning"
            )
        self.sink.log(f"Loaded {len(train)} training and {len(validation or [])} validation rows.")
        if conversational and _has_zero_weights(train, validation):
            if not self.assistant_only_loss:
                self.sink.log("Message weights need assistant_only_loss; training on every token.", "warning")
                return train, validation
            train = self._tokenize_weighted(train)
            validation = self._tokenize_weighted(validation) if validation is not None else None
            self.assistant_only_loss = False  # the mask now travels in the data, as TRL's assistant_masks
        return train, validation

    def _tokenize_weighted(self, data: Dataset) -> Dataset:
        """Honour ``"weight": 0`` on assistant messages (the OpenAI fine-tuning format), which TRL ignores.

        Each assistant message renders as one run of the chat template's assistant mask, in order; the runs of
        weight-0 messages are cleared, and TRL builds the labels from the mask that remains.
        """
        template = get_training_chat_template(self.tokenizer)  # None: the model's own template has markers

        def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
            out = self.tokenizer.apply_chat_template(
                row["messages"],
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            mask = list(out["assistant_masks"])
            weights = [m.get("weight") for m in row["messages"] if m["role"] == "assistant"]
            runs = _runs_of_ones(mask)
            if len(runs) != len(weights):
                raise TrainingError(
                    "BAD_TRAINING_DATA",
                    "Per-message weights cannot be applied: the base model's chat template does not mark "
                    "each assistant message separately.",
                )
            for (start, end), weight in zip(runs, weights, strict=True):
                if weight == 0:
                    mask[start:end] = [0] * (end - start)
            return {"input_ids": list(out["input_ids"]), "assistant_masks": mask}

        return data.map(tokenize, remove_columns=data.column_names)

    @staticmethod
    def _read_jsonl(path: Path) -> Dataset:
        """Read chat, prompt/completion or text rows, naming the first bad line instead of a parser trace."""
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainingError(
                        "BAD_TRAINING_DATA", f"{path.name} line {number} is not JSON: {exc}."
                    ) from exc
                if not isinstance(row, dict) or not (
                    "messages" in row or {"prompt", "completion"} <= row.keys() or "text" in row
                ):
                    raise TrainingError(
                        "BAD_TRAINING_DATA",
                        f"{path.name} line {number} has none of 'messages', 'prompt'+'completion' or 'text'.",
                    )
                rows.append(row)
        if not rows:
            raise TrainingError("BAD_TRAINING_DATA", f"{path.name} holds no examples.")
        return Dataset.from_list(rows)

    def _lora_config(self) -> LoraConfig:
        lora = self.spec.lora
        targets = list(lora.target_modules)
        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            use_dora=lora.use_dora,
            task_type="CAUSAL_LM",
        )

    def _compute_dtype(self) -> torch.dtype:
        """job.proto's default: bf16 where the hardware has it, else fp16 on a GPU and fp32 on a CPU."""
        precision = self.hp.precision
        if precision == job_pb2.PRECISION_UNSPECIFIED:
            if self.cuda:
                bf16 = torch.cuda.is_bf16_supported()
                precision = job_pb2.PRECISION_BF16 if bf16 else job_pb2.PRECISION_FP16
            else:
                bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
                precision = job_pb2.PRECISION_BF16 if bf16 else job_pb2.PRECISION_FP32
        if precision == job_pb2.PRECISION_FP16 and not self.cuda:
            self.sink.log("fp16 needs a GPU; training in fp32 on this CPU worker.", "warning")
            precision = job_pb2.PRECISION_FP32
        return {job_pb2.PRECISION_BF16: torch.bfloat16, job_pb2.PRECISION_FP16: torch.float16}.get(
            precision, torch.float32
        )

    def _training_args(self, *, has_validation: bool) -> SFTConfig:
        hp = self.hp
        optim = OPTIMIZERS[hp.optimizer]
        if optim in BITSANDBYTES_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError(
                "DEPENDENCY_ERROR", f"The {optim} optimizer needs bitsandbytes on the worker."
            )
        dtype = self._compute_dtype()
        # "0 steps" in the spec means once per epoch.
        eval_strategy = "no" if not has_validation else ("steps" if hp.eval_steps else "epoch")
        save_strategy = "steps" if hp.save_steps else "epoch"
        save_steps = hp.save_steps or None
        early_stopping = has_validation and hp.early_stopping.enabled
        if hp.early_stopping.enabled and not has_validation:
            self.sink.log("Early stopping needs validation data; training without it.", "warning")
        if early_stopping:
            # load_best_model_at_end needs checkpoints exactly where evaluations happen.
            save_strategy, save_steps = eval_strategy, hp.eval_steps or None
        return SFTConfig(
            output_dir=str(self.cfg.output_dir / "checkpoints"),
            num_train_epochs=hp.epochs,
            max_steps=hp.max_steps or -1,
            per_device_train_batch_size=hp.batch_size,
            per_device_eval_batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            learning_rate=hp.learning_rate,
            lr_scheduler_type=SCHEDULERS[hp.lr_scheduler],
            lr_scheduler_kwargs=(
                {"min_lr": hp.min_learning_rate}
                if hp.lr_scheduler == job_pb2.LR_SCHEDULER_COSINE_WITH_MIN_LR
                else None
            ),
            # transformers 5 reads a float below 1 as a ratio of all steps.
            warmup_steps=hp.warmup_steps if hp.HasField("warmup_steps") else hp.warmup_ratio,
            optim=optim,
            adam_beta1=hp.adam_beta1,
            adam_beta2=hp.adam_beta2,
            weight_decay=hp.weight_decay,
            max_grad_norm=hp.max_grad_norm,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu=not self.cuda,
            activation_checkpointing=hp.gradient_checkpointing,
            packing=hp.packing,
            train_sampling_strategy="group_by_length" if hp.group_by_length else "random",
            max_length=hp.max_seq_length,
            assistant_only_loss=self.assistant_only_loss,
            seed=hp.seed,
            dataloader_num_workers=hp.dataloader_workers,
            logging_steps=hp.logging_steps,
            logging_first_step=True,
            logging_nan_inf_filter=False,
            include_num_input_tokens_seen="non_padding",
            eval_strategy=eval_strategy,
            eval_steps=hp.eval_steps or None,
            save_strategy=save_strategy,
            save_steps=save_steps,
            save_total_limit=hp.save_total_limit,
            load_best_model_at_end=early_stopping,
            metric_for_best_model="eval_loss" if early_stopping else None,
            greater_is_better=False if early_stopping else None,
            report_to="none",
            disable_tqdm=True,
            **distributed.trainer_kwargs(self.spec),
        )

    # -- train ------------------------------------------------------------------------------------------

    def train(self) -> None:
        assert self.trainer is not None
        length = f"{self.hp.max_steps} steps" if self.hp.max_steps else f"{self.hp.epochs} epochs"
        self.sink.log(f"Training for {length}.")
        self.trainer.train(resume_from_checkpoint=checkpointing.resume_checkpoint(self.cfg))
        if self.watchdog.diverged_at is not None:
            raise TrainingError(
                "LOSS_DIVERGED", f"The loss became NaN or infinite by step {self.watchdog.diverged_at}."
            )
        self._check_stop()
        train_loss = self.metrics.summary.get("train_loss")
        if train_loss is not None and not math.isfinite(train_loss):
            raise TrainingError("LOSS_DIVERGED", "The average training loss is NaN or infinite.")

    # -- save -------------------------------------------------------------------------------------------

    def save(self) -> tuple[Path, Path | None]:
        assert self.trainer is not None
        model = self.trainer.model
        adapter_dir = self.cfg.output_dir / ("model" if self.full else "adapter")
        model.save_pretrained(adapter_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(adapter_dir)
        self.sink.log(f"Saved the {'model' if self.full else 'adapter'} to {adapter_dir}.")
        if not self.spec.output.merge_adapter:
            return adapter_dir, None
        if self.full:
            self.sink.log(
                "merge_adapter does not apply to full fine-tuning; the model is already whole.", "warning"
            )
            return adapter_dir, None
        assert isinstance(model, PeftModel)
        merged_dir = self.cfg.output_dir / "merged"
        model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(merged_dir)
        self.sink.log(f"Saved the merged model to {merged_dir}.")
        return adapter_dir, merged_dir

    def final_metrics(self) -> dict[str, float]:
        assert self.trainer is not None
        metrics = {k: v for k, v in self.metrics.summary.items() if math.isfinite(v)}
        metrics.update({k: v for k, v in self.metrics.last_eval.items() if k.startswith("eval_")})
        metrics["global_step"] = float(self.trainer.state.global_step)
        metrics["num_input_tokens_seen"] = float(self.trainer.state.num_input_tokens_seen)
        if metrics.get("train_runtime"):
            metrics["train_tokens_per_second"] = metrics["num_input_tokens_seen"] / metrics["train_runtime"]
        return metrics

    # -- cleanup ----------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.trainer = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _check_stop(self) -> None:
        if self.stop.requested:
            raise Cancelled(self.stop.reason)


def _has_zero_weights(*datasets: Dataset | None) -> bool:
    return any(
        message.get("weight") == 0
        for data in datasets
        if data is not None
        for row in data["messages"]
        for message in row
    )


def _runs_of_ones(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of 1s."""
    runs: list[tuple[int, int]] = []
    for i, bit in enumerate(mask):
        if bit and (i == 0 or not mask[i - 1]):
            runs.append((i, i + 1))
        elif bit:
            runs[-1] = (runs[-1][0], i + 1)
    return runs
