"""What every recipe shares: model and adapter loading, the TrainingArguments mapping, train, save.

A method recipe (sft.py, dpo.py, ...) says only which data it reads and which TRL trainer it builds; this
base runs it like a torchtune recipe: ``setup`` loads the tokenizer, data, model and trainer from the job
spec, ``train`` runs it, ``save`` writes the adapter (and, if asked, the merged model), ``cleanup`` releases
memory. The three seams of the distributed/checkpointing work live here, once: the checkpoint callbacks,
``distributed.trainer_kwargs`` in the TRL config, and ``resume_from_checkpoint``. Metrics leave only through
the :class:`~trainer_worker.events.EventSink`.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, PromptTuningInit
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from tuneforge.v1 import job_pb2

from trainer_worker import checkpointing, distributed, trackers, warm_start
from trainer_worker.errors import Cancelled, TrainingError
from trainer_worker.events import EarlyStopInfo, EventSink
from trainer_worker.recipes.callbacks import DivergenceWatchdog, MetricsCallback, StopCallback
from trainer_worker.recipes.data import read_rows
from trainer_worker.recipes.story import StoryCallback
from trainer_worker.run_config import RunConfig
from trainer_worker.speed import ResolvedSpeed, SpeedHardware, resolve_speed
from trainer_worker.stop import StopSignal
from tuneforge_core.compat import METHOD_FAMILIES, Family
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import greater_is_better, target_modules_for_peft

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
# Model config attributes that hold a dropout probability, by what JobSpec calls them (the first the model's
# config has is set; GPT-2-style configs name them *_pdrop).
DROPOUT_ATTRIBUTES = {
    "hidden_dropout": ("hidden_dropout", "hidden_dropout_prob", "resid_pdrop"),
    "attention_dropout": ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop"),
}
BITSANDBYTES_OPTIMIZERS = {"adamw_bnb_8bit", "paged_adamw_32bit", "paged_adamw_8bit"}
DTYPES = {job_pb2.PRECISION_BF16: torch.bfloat16, job_pb2.PRECISION_FP16: torch.float16}


class BaseRecipe(ABC):
    """One run of one job attempt; subclasses set ``method`` and build the trainer."""

    #: The method's name in messages ("SFT", "DPO", ...).
    method: ClassVar[str]
    #: The TRL trainer the method runs; build_trainer gives it what every method shares.
    # Any TRL trainer class; typed loosely since each takes its own config and extras (peft_config, ...).
    trainer_class: ClassVar[type[Any]]
    #: How the base model loads (and the merged model is rebuilt); a VLM recipe loads image-text-to-text.
    auto_model_class: ClassVar[Any] = AutoModelForCausalLM

    def __init__(self, cfg: RunConfig, spec: job_pb2.JobSpec, sink: EventSink, stop: StopSignal) -> None:
        self.cfg, self.spec, self.sink, self.stop = cfg, spec, sink, stop
        self.hp = spec.hyperparameters
        self.full = spec.adapter == job_pb2.ADAPTER_TYPE_FULL
        self.quantized = spec.adapter == job_pb2.ADAPTER_TYPE_QLORA
        self.cuda = torch.cuda.is_available()
        self.metrics = MetricsCallback(sink)
        self.watchdog = DivergenceWatchdog()
        self.story = StoryCallback(sink)  # timeline events; the kept step and early stop after training
        self.trainer: Trainer | None = None
        self.family = ""  # the data family found in the training file
        self.conversational = False  # whether its rows hold messages that the chat template renders
        # What the result reports beside the outputs (train.py reads them after run()): the step whose
        # weights were kept, why training stopped early, tokens trained, and the evaluation report (the
        # EvaluationReport's JSON mapping; None when no evaluation code ran).
        self.kept_step = 0
        self.early_stop: EarlyStopInfo | None = None
        self.tokens_trained = 0
        self.evaluation_report: dict[str, object] | None = None
        self._speed: ResolvedSpeed | None = None  # JobSpec.speed for this worker: `speed`

    def run(self) -> tuple[Path, Path | None, dict[str, float]]:
        """setup -> train -> save -> evaluate -> cleanup; returns (adapter_dir, merged_dir, final_metrics)."""
        runs = trackers.TrackerRuns(self.spec, self.cfg.job_id, self.cfg.attempt, os.environ)
        succeeded = False
        try:
            trackers.check_installed(self.spec)  # before anything loads
            self.setup()
            if self.spec.integrations and distributed.world().is_main:  # before the first step
                for started in runs.start():
                    self.sink.log(f"Started the {started}.")
            self.train()
            adapter_dir, merged_dir = self.save()
            metrics = self.final_metrics()
            self.evaluate()
            succeeded = True
            return adapter_dir, merged_dir, metrics
        finally:
            runs.finish(succeeded)
            self.cleanup()

    def evaluate(self) -> None:
        """The evaluation after training (JobSpec.evaluation): sets ``evaluation_report``."""
        from trainer_worker.evaluation import evaluate  # it imports this module

        self.evaluation_report = evaluate(self)

    # -- what a method recipe provides ------------------------------------------------------------------

    def prepare(self, rows: list[dict[str, Any]]) -> Dataset:
        """Rows of one split as the method's trainer wants them (by default: as they are)."""
        return Dataset.from_list(rows)

    @abstractmethod
    def trainer_config(self, args: dict[str, Any]) -> TrainingArguments:
        """The method's TRL config: ``args`` (the common TrainingArguments) plus the method's own settings."""

    def trainer_extras(self, train: Dataset) -> dict[str, Any]:
        """Keyword arguments only this method's trainer takes (reward functions, a teacher...)."""
        return {}

    def build_trainer(
        self,
        model: PreTrainedModel,
        args: dict[str, Any],
        train: Dataset,
        validation: Dataset | None,
        callbacks: list[TrainerCallback],
    ) -> Trainer:
        """The method's TRL trainer (``trainer_class``), the same way for every method."""
        return self.trainer_class(
            model=model,
            args=self.trainer_config(args),
            train_dataset=train,
            eval_dataset=validation,
            processing_class=self.tokenizer,
            peft_config=self.peft_config(),
            callbacks=callbacks,
            **self.trainer_extras(train),
        )

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.check_hardware()  # before anything loads: a job this worker cannot honour fails at once
        self.sink.log(self.speed.log_line())
        self.tokenizer = self.load_tokenizer(self.cfg.model_path)
        train, validation = self.load_data()  # before the model: bad data should fail fast
        self.check_early_stopping(has_validation=validation is not None)
        # A warm start (trainer_worker.warm_start): full fine-tuning loads the source model, adapters go on
        # the base model trainable.
        model = warm_start.start_from(self.load_model(warm_start.full_model_path(self.cfg, self.spec)),
                                      self.cfg, self.spec, self.sink.log)
        self._check_stop()
        callbacks: list[TrainerCallback] = [self.metrics, self.watchdog, StopCallback(self.stop)]
        callbacks += checkpointing.callbacks(self.cfg, self.sink)
        args = self.training_args(has_validation=validation is not None)
        self.story.early_stopping = self.early_stopping_callback()
        if self.story.early_stopping is not None:
            callbacks.append(self.story.early_stopping)
        callbacks.append(self.story)  # after EarlyStoppingCallback: it reads whether that one stopped
        device = "cuda" if self.cuda else "cpu"
        self.sink.log(f"Building the {self.method} trainer: {len(train)} training rows on {device}.")
        self.trainer = self.build_trainer(model, args, train, validation, callbacks)
        warm_start.restore_optimizer_state(self.trainer, self.cfg, self.sink.log,
                                           resuming=checkpointing.resume_checkpoint(self.cfg) is not None)
        if len(self.trainer.train_dataset) == 0:  # type: ignore[arg-type]
            raise TrainingError(
                Reason.BAD_TRAINING_DATA, "No training examples were left after tokenization."
            )
        self._check_stop()

    def early_stopping_callback(self) -> EarlyStoppingCallback | None:
        """EarlyStoppingConfig as TRL's callback; None when off (keep_best_model alone keeps the best
        without stopping early)."""
        early = self.hp.early_stopping
        return EarlyStoppingCallback(early.patience, early.min_delta) if early.enabled else None

    def check_hardware(self) -> None:
        """Refuse what this worker cannot train as asked, instead of training something else.

        A job that names a GPU type never trains on a CPU (the agent hands such jobs back before they get
        here; this is the recipe's own line of defence), and fp16/bf16 is never swapped for fp32 on a CPU
        (CreateJob refuses such specs, so one arriving here did not come through it as it is now).
        """
        wanted = self.spec.hardware.gpu_type.strip().lower()
        if wanted not in ("", "cpu") and not self.cuda:
            raise TrainingError(
                Reason.TRAINING_FAILED,
                f"spec.hardware.gpu_type is {wanted}, but this worker has no GPU; the job is not trained on "
                "a CPU instead.",
            )
        self.compute_dtype()
        if self.quantized and self.spec.quantization.compute_dtype:
            self.quantization_compute_dtype()
        _ = self.speed  # a speed option set ON that this worker cannot use fails here, naming it

    @property
    def speed(self) -> ResolvedSpeed:
        """JobSpec.speed resolved for this worker (trainer_worker.speed), once; kept in RunConfig.speed so
        that whoever ran the worker can read back what was used."""
        if self._speed is None:
            self._speed = resolve_speed(self.spec, self.speed_hardware())
            self.cfg.speed = self._speed.to_dict()
        return self._speed

    def speed_hardware(self) -> SpeedHardware:
        """What `resolve_speed` needs to know about this worker and the base model."""
        dtype = self.quantization_compute_dtype() if self.quantized else self.compute_dtype()
        try:
            config = AutoConfig.from_pretrained(self.cfg.model_path, trust_remote_code=False)
        except (OSError, ValueError):
            config = None  # loading the model reports it, as MODEL_NOT_FOUND
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        return SpeedHardware.detect(dtype=name, model_config=config, model_class=self.auto_model_class)

    def check_early_stopping(self, *, has_validation: bool) -> None:
        """Early stopping and keeping the best model watch an evaluation metric; without validation data
        they are refused, not dropped."""
        for field, wanted in (("early_stopping.enabled", self.hp.early_stopping.enabled),
                              ("keep_best_model", self.hp.keep_best_model)):
            if wanted and not has_validation:
                raise TrainingError(
                    Reason.TRAINING_FAILED,
                    f"spec.hyperparameters.{field} needs validation data, and this job has none "
                    "(no validation split and no spec.validation_dataset); it is not trained without it.",
                )

    def load_tokenizer(self, path: str) -> PreTrainedTokenizerBase:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise TrainingError(
                Reason.MODEL_NOT_FOUND, f"Could not load the tokenizer of {path}: {exc}"
            ) from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _check_same_tokenizer(self, path: str, role: str) -> None:
        """A second model the recipe loads (a distillation teacher, a DPO reference model, a GRPO reward
        model) must map text to the base model's token ids, or its scores would be of other words."""
        other = self.load_tokenizer(path)
        if other.get_vocab() != self.tokenizer.get_vocab():
            raise TrainingError(
                Reason.TRAINING_FAILED,
                f"The {role} {path} does not share the base model's tokenizer "
                f"({len(other)} vs {len(self.tokenizer)} tokens, or the same size with different ids); "
                f"{self.method} needs both to map text to the same token ids.",
            )

    def load_frozen_model(self, path: str, role: str) -> PreTrainedModel:
        """Another model than the one trained, loaded like a teacher: frozen, in eval mode, in the training
        dtype, after its tokenizer is checked against the base model's."""
        self._check_same_tokenizer(path, role)
        model = self.load_model(path, trainable=False)
        if isinstance(model, torch.nn.Module):  # the field-mapping tests stand a string in for a model
            model.eval().requires_grad_(False)
        return model

    def load_data(self) -> tuple[Dataset, Dataset | None]:
        families = METHOD_FAMILIES[self.spec.method]
        rows, self.family = read_rows(self.cfg.train_file, families, self.method)
        self.conversational = self.family == Family.CHAT or isinstance(rows[0].get("prompt"), list)
        validation = None
        if self.cfg.validation_file:
            validation_rows, family = read_rows(self.cfg.validation_file, families, self.method)
            if family != self.family:
                raise TrainingError(
                    Reason.BAD_TRAINING_DATA,
                    f"The validation data is {family} data but the training data is {self.family} data.",
                )
            validation = self.prepare(validation_rows)
        if self.conversational and not self.tokenizer.chat_template:
            raise TrainingError(
                Reason.BAD_TRAINING_DATA,
                "The training data is chat-formatted but the base model's tokenizer has no chat template.",
            )
        self.sink.log(
            f"Loaded {len(rows)} training and {len(validation or [])} validation rows ({self.family})."
        )
        return self.prepare(rows), validation

    def load_model(
        self, path: str | None = None, *, trainable: bool = True, model_class: Any = None, **extra: Any
    ) -> PreTrainedModel:
        """The base model (or, with ``path``, another one such as a teacher), from safetensors only;
        ``model_class`` and ``extra`` (such as a reward model's class and num_labels) for another kind."""
        path = path or self.cfg.model_path
        self.sink.log(f"Loading {'the base model' if trainable else 'a frozen model'} from {path}.")
        kwargs: dict[str, Any] = {"dtype": self.model_dtype(), **extra}
        if self.quantized and trainable:
            kwargs["quantization_config"] = self._quantization_config()
        if trainable:
            kwargs.update(self.model_overrides(path))
        try:
            return (model_class or self.auto_model_class).from_pretrained(
                path, trust_remote_code=False, use_safetensors=True, **kwargs
            )
        except (OSError, ValueError) as exc:
            raise TrainingError(Reason.MODEL_NOT_FOUND, f"Could not load the model at {path}: {exc}") from exc

    def model_overrides(self, path: str | None = None) -> dict[str, Any]:
        """What the spec sets at load: the attention kernel (spec.speed.attention, as resolved) and model
        config attributes (hidden_dropout, attention_dropout); a dropout the model's config has no
        attribute for is refused, not dropped."""
        given = {field.name for field, _ in self.hp.ListFields()}
        wanted = {name: getattr(self.hp, name) for name in DROPOUT_ATTRIBUTES if name in given}
        attention = {"attn_implementation": self.speed.attention}
        if not wanted:
            return attention
        path = path or self.cfg.model_path
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise TrainingError(Reason.MODEL_NOT_FOUND,
                                f"Could not load the config of {path}: {exc}") from exc
        overrides: dict[str, Any] = {}
        for name, value in wanted.items():
            attribute = next((a for a in DROPOUT_ATTRIBUTES[name] if hasattr(config, a)), None)
            if attribute is None:
                raise TrainingError(
                    Reason.TRAINING_FAILED,
                    f"spec.hyperparameters.{name} is set, but the model ({type(config).__name__}) has "
                    f"no such dropout (none of {', '.join(DROPOUT_ATTRIBUTES[name])}); leave it unset.",
                )
            overrides[attribute] = value
        return {**attention, **overrides}

    def keeps_dropout(self) -> bool:
        """Whether the spec asks for any dropout (LoRA's, or the model's overrides). TRL's DPO, ORPO and KTO
        configs switch every dropout off by default (disable_dropout), which would drop it silently."""
        lora = self.spec.adapter in (job_pb2.ADAPTER_TYPE_LORA, job_pb2.ADAPTER_TYPE_QLORA)
        return (lora and self.spec.lora.dropout > 0) or any(
            getattr(self.hp, name) > 0 for name in DROPOUT_ATTRIBUTES  # unset reads 0
        )

    def model_dtype(self) -> torch.dtype:
        """Adapters on a GPU train in the compute dtype; full fine-tuning keeps fp32 master weights."""
        if self.quantized:
            return self.quantization_compute_dtype()
        return self.compute_dtype() if self.cuda and not self.full else torch.float32

    def _quantization_config(self) -> BitsAndBytesConfig:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError(Reason.DEPENDENCY_ERROR, "QLoRA needs bitsandbytes on the worker.")
        quant = self.spec.quantization
        if quant.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if quant.type == job_pb2.QUANTIZATION_TYPE_FP4 else "nf4",
            bnb_4bit_use_double_quant=quant.double_quantization,
            bnb_4bit_compute_dtype=self.quantization_compute_dtype(),
        )

    def quantization_compute_dtype(self) -> torch.dtype:
        """QuantizationConfig.compute_dtype, or the training precision when unset."""
        wanted = self.spec.quantization.compute_dtype
        if not wanted:
            return self.compute_dtype()
        return self.compute_dtype(wanted, "spec.quantization.compute_dtype")

    def compute_dtype(
        self, precision: int | None = None, field: str = "spec.hyperparameters.precision"
    ) -> torch.dtype:
        """job.proto's default: bf16 where the hardware has it, else fp16 on a GPU and fp32 on a CPU.

        A precision the spec states is honoured or refused: fp16 or bf16 on a worker without a GPU is a
        TrainingError naming `field`, never fp32 in its place.
        """
        precision = precision or self.hp.precision
        if precision in (job_pb2.PRECISION_FP16, job_pb2.PRECISION_BF16) and not self.cuda:
            name = job_pb2.Precision.Name(job_pb2.Precision.ValueType(precision)).removeprefix("PRECISION_")
            raise TrainingError(
                Reason.TRAINING_FAILED,
                f"{field} is {name}, which needs a GPU, and this worker has none; it is not trained in fp32 "
                "instead.",
            )
        if precision == job_pb2.PRECISION_UNSPECIFIED:
            if self.cuda:
                bf16 = torch.cuda.is_bf16_supported()
                precision = job_pb2.PRECISION_BF16 if bf16 else job_pb2.PRECISION_FP16
            else:
                bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
                precision = job_pb2.PRECISION_BF16 if bf16 else job_pb2.PRECISION_FP32
        return DTYPES.get(job_pb2.Precision.ValueType(precision), torch.float32)

    def peft_config(self) -> PeftConfig | None:
        """LoRA (also on a quantized base for QLoRA), a soft prompt, or None for full fine-tuning."""
        if self.full or warm_start.loads_adapter(self.cfg, self.spec):  # a warm start brings its adapter
            return None
        if self.spec.adapter == job_pb2.ADAPTER_TYPE_PROMPT_TUNING:
            prompt = self.spec.prompt_tuning
            return PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=prompt.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT if prompt.init_text else PromptTuningInit.RANDOM,
                prompt_tuning_init_text=prompt.init_text or None,
                tokenizer_name_or_path=self.cfg.model_path if prompt.init_text else None,
            )
        lora = self.spec.lora
        return LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            # Wildcard patterns ('*.q_proj') become one regular expression PEFT full-matches.
            target_modules=target_modules_for_peft(list(lora.target_modules)),
            use_dora=lora.use_dora,
            task_type="CAUSAL_LM",
        )

    def training_args(self, *, has_validation: bool) -> dict[str, Any]:
        """Every Hyperparameters field as TrainingArguments keywords, shared by all TRL configs."""
        hp = self.hp
        optim = OPTIMIZERS[hp.optimizer]
        if optim in BITSANDBYTES_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError(
                Reason.DEPENDENCY_ERROR, f"The {optim} optimizer needs bitsandbytes on the worker."
            )
        dtype = self.compute_dtype()
        # "0 steps" in the spec means once per epoch, and so does a whole epoch as the fraction. A smaller
        # fraction becomes TrainingArguments' ratio of all steps (a float below 1): fraction / epochs
        # (max_steps is 0 with it, CreateJob checks).
        eval_steps: float | None = hp.eval_steps or None
        if hp.HasField("eval_epoch_fraction") and hp.eval_epoch_fraction < 1.0:
            eval_steps = hp.eval_epoch_fraction / hp.epochs
        eval_strategy = "no" if not has_validation else ("steps" if eval_steps else "epoch")
        save_strategy = "steps" if hp.save_steps else "epoch"
        save_steps: float | None = hp.save_steps or None
        self.check_early_stopping(has_validation=has_validation)
        early_stopping = hp.early_stopping.enabled
        keep_best = early_stopping or hp.keep_best_model
        if keep_best:
            # load_best_model_at_end needs checkpoints exactly where evaluations happen.
            save_strategy, save_steps = eval_strategy, eval_steps
        return {
            "output_dir": str(self.cfg.output_dir / "checkpoints"),
            "num_train_epochs": hp.epochs,
            "max_steps": hp.max_steps or -1,
            "per_device_train_batch_size": hp.batch_size,
            "per_device_eval_batch_size": hp.eval_batch_size,
            "gradient_accumulation_steps": hp.gradient_accumulation_steps,
            "learning_rate": hp.learning_rate,
            "lr_scheduler_type": SCHEDULERS[hp.lr_scheduler],
            "lr_scheduler_kwargs": (
                {"min_lr": hp.min_learning_rate}
                if hp.lr_scheduler == job_pb2.LR_SCHEDULER_COSINE_WITH_MIN_LR
                else None
            ),
            # transformers 5 reads a float below 1 as a ratio of all steps.
            "warmup_steps": hp.warmup_steps if hp.HasField("warmup_steps") else hp.warmup_ratio,
            "optim": optim,
            "adam_beta1": hp.adam_beta1,
            "adam_beta2": hp.adam_beta2,
            "weight_decay": hp.weight_decay,
            "max_grad_norm": hp.max_grad_norm,
            "bf16": dtype == torch.bfloat16,
            "fp16": dtype == torch.float16,
            "use_cpu": not self.cuda,
            "activation_checkpointing": hp.gradient_checkpointing,
            # JobSpec.speed as resolved (trainer_worker.speed); attention is set at load, the rest in the
            # method's config (trainer_config).
            "use_liger_kernel": self.speed.liger_kernels,
            "torch_compile": self.speed.torch_compile,
            "train_sampling_strategy": "group_by_length" if hp.group_by_length else "random",
            "seed": hp.seed,
            "dataloader_num_workers": hp.dataloader_workers,
            "logging_steps": hp.logging_steps,
            "logging_first_step": True,
            "logging_nan_inf_filter": False,
            "include_num_input_tokens_seen": "non_padding",
            "eval_strategy": eval_strategy,
            "eval_steps": eval_steps,
            "save_strategy": save_strategy,
            "save_steps": save_steps,
            "save_total_limit": hp.save_total_limit,
            "load_best_model_at_end": keep_best,
            "metric_for_best_model": hp.metric_for_best_model if keep_best else None,
            "greater_is_better": greater_is_better(hp.metric_for_best_model) if keep_best else None,
            # JobSpec.integrations (trainer_worker.trackers starts the runs these callbacks log to).
            "report_to": trackers.report_to(self.spec),
            "run_name": self.cfg.job_id,
            "disable_tqdm": True,
            **distributed.trainer_kwargs(self.spec),
        }

    # -- train ------------------------------------------------------------------------------------------

    def train(self) -> None:
        assert self.trainer is not None
        length = f"{self.hp.max_steps} steps" if self.hp.max_steps else f"{self.hp.epochs} epochs"
        self.sink.log(f"Training for {length}.")
        self.trainer.train(resume_from_checkpoint=checkpointing.resume_checkpoint(self.cfg))
        if self.watchdog.diverged_at is not None:
            raise TrainingError(
                Reason.LOSS_DIVERGED, f"The loss became NaN or infinite by step {self.watchdog.diverged_at}."
            )
        self._check_stop()
        train_loss = self.metrics.summary.get("train_loss")
        if train_loss is not None and not math.isfinite(train_loss):
            raise TrainingError(Reason.LOSS_DIVERGED, "The average training loss is NaN or infinite.")

    # -- save -------------------------------------------------------------------------------------------

    def save(self) -> tuple[Path, Path | None]:
        """The adapter (or the whole model) and, on request, the adapter merged into dequantized base weights.

        Full and merged models get the chat template's end-of-turn token among their generation config's
        ``eos_token_id``, so a server that reads the model folder stops where training taught it to.
        """
        assert self.trainer is not None
        model = self.trainer.model
        adapter_dir = self.cfg.output_dir / ("model" if self.full else "adapter")
        if self.full and isinstance(model, PreTrainedModel):
            self._stop_at_end_of_turn(model)
        self.trainer.save_model(str(adapter_dir))  # gathers ZeRO-3/FSDP shards; writes on rank 0 only
        if not distributed.world().is_main:
            return adapter_dir, None
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle, not an output
        self.tokenizer.save_pretrained(adapter_dir)
        self.sink.log(f"Saved the {'model' if self.full else 'adapter'} to {adapter_dir}.")
        if not self.spec.output.merge_adapter:
            return adapter_dir, None
        if self.full or self.spec.adapter == job_pb2.ADAPTER_TYPE_PROMPT_TUNING:
            self.sink.log("merge_adapter applies to LoRA and QLoRA only; nothing to merge.", "warning")
            return adapter_dir, None
        # Merge from the saved adapter into a fresh, unquantized base: a 4/8-bit base cannot take the merge,
        # and the trainer's model stays untouched.
        dtype = self.quantization_compute_dtype() if self.quantized else self.model_dtype()
        base = self.auto_model_class.from_pretrained(
            self.cfg.model_path, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        self._stop_at_end_of_turn(merged)
        merged_dir = self.cfg.output_dir / "merged"
        merged.save_pretrained(merged_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(merged_dir)
        self.sink.log(f"Saved the merged model ({str(dtype).removeprefix('torch.')}) to {merged_dir}.")
        return adapter_dir, merged_dir

    def _stop_at_end_of_turn(self, model: PreTrainedModel) -> None:
        token = end_of_turn_token(self.tokenizer)
        if token is None:
            return
        config = model.generation_config
        ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        ids = [i for i in ids if i is not None]
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id not in ids:
            config.eos_token_id = [*ids, token_id] if ids else token_id

    def final_metrics(self) -> dict[str, float]:
        assert self.trainer is not None
        metrics = {k: v for k, v in self.metrics.summary.items() if math.isfinite(v)}
        metrics.update({k: v for k, v in self.metrics.last_eval.items() if k.startswith("eval_")})
        metrics["global_step"] = float(self.trainer.state.global_step)
        metrics["num_input_tokens_seen"] = float(self.trainer.state.num_input_tokens_seen)
        # The final metrics are the kept model's: with load_best_model_at_end, the best step's evaluation.
        self.kept_step = self.story.conclude(self.trainer.state, self.trainer.args, metrics)
        self.early_stop = self.story.early_stop
        self.tokens_trained = int(self.trainer.state.num_input_tokens_seen)
        if metrics.get("train_runtime") and metrics["num_input_tokens_seen"]:
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


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template puts right after an assistant message (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>), or None when the template has none; serving must stop on it."""
    if not tokenizer.chat_template:
        return None
    marker = "TUNEFORGE_END_OF_ANSWER"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = str(rendered).split(marker, 1)[-1].lstrip()
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((token for token in specials if token and after.startswith(token)), None)
