"""The evaluation after training: the base model and the tuned one on the dataset's test split.

It runs in the training process, after ``save``, with the trained model still in memory, on the first
``spec.evaluation.max_examples`` rows of the test split, tokenized the way training tokenized its data:

- SFT and distillation: the mean token loss over the tokens training's loss counts (the assistant or
  completion tokens with ``assistant_only_loss`` / prompt-completion data, every token otherwise; the
  recipe's own SFTTrainer prepares the rows) and its perplexity, ``exp(loss)``. Primary metric ``loss``;
  improved when the tuned loss is lower.
- DPO, ORPO, KTO: the tuned model's implicit reward of an answer with the base model as the reference,
  ``r = beta * (log p_tuned(answer | prompt) - log p_base(answer | prompt))`` (log-probabilities summed over
  the answer's tokens, ``beta`` the method's). DPO/ORPO: ``reward_accuracy`` is the share of pairs with
  ``r(chosen) > r(rejected)``, ``reward_margin`` the mean of ``r(chosen) - r(rejected)``. KTO: accuracy is
  the share of desirable rows with ``r > 0`` and undesirable rows with ``r < 0``, and the margin is the mean
  reward of the desirable rows minus that of the undesirable ones. The base model is its own reference, so
  its metrics are 0.5 and 0 by definition; improved when the tuned accuracy is above 0.5.
- GRPO: one greedy completion per held-out prompt (up to ``grpo.max_completion_length`` tokens) from each
  model, scored by the job's reward functions and summed as GRPO sums them; ``mean_reward`` (and each
  function's mean as ``reward_<name>``). Improved when the tuned mean is higher.

Then ``num_samples`` prompts are answered by both models (greedy, ``max_new_tokens``, stopping at the chat
template's end-of-turn token). Adapters measure the base with PEFT's ``disable_adapter()`` (no second copy);
full fine-tuning loads the base weights from ``cfg.model_path`` beside the tuned model.

The evaluation never fails the job: an error becomes a FAILED report with one sentence (and a log line); a
stop request still cancels. Under distributed training only the main rank evaluates, with its own replica
of the weights (DDP, ZeRO-1/2); with parameters sharded across ranks (ZeRO-3, FSDP on GPUs) no rank holds
the whole model once training has ended, so the report says SKIPPED.
"""

from __future__ import annotations

import gc
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from trl.data_utils import maybe_apply_chat_template
from tuneforge.v1 import evaluation_pb2, job_pb2

from trainer_worker import distributed
from trainer_worker.errors import Cancelled
from trainer_worker.evaluation_report import (
    DISABLED,
    NO_TEST_SPLIT,
    SPLIT,
    failed,
    skipped,
    timestamp,
    to_dict,
)
from trainer_worker.recipes import rewards
from trainer_worker.recipes.data import read_rows
from trainer_worker.stop import StopSignal
from tuneforge_core.compat import METHOD_FAMILIES, Family

if TYPE_CHECKING:
    from trainer_worker.recipes.base import BaseRecipe

log = logging.getLogger(__name__)
M = job_pb2.TrainingMethod
LOSS_METHODS = (M.TRAINING_METHOD_SFT, M.TRAINING_METHOD_DISTILLATION)
PREFERENCE_METHODS = (M.TRAINING_METHOD_DPO, M.TRAINING_METHOD_ORPO, M.TRAINING_METHOD_KTO)
D = job_pb2.DistributedStrategy
# Strategies whose ranks each hold a shard of the weights (FSDP only on GPUs: on CPUs it runs as DDP).
SHARDED = (D.DISTRIBUTED_STRATEGY_ZERO3, D.DISTRIBUTED_STRATEGY_ZERO3_OFFLOAD)
Messages = list[dict[str, Any]]


def evaluate(recipe: BaseRecipe, kind: type[Evaluation] | None = None) -> dict[str, object] | None:
    """The EvaluationReport (its JSON mapping) of the recipe's trained model; None on ranks other than the
    main one. Raises only :class:`Cancelled`. `kind` replaces :class:`Evaluation` (vision-language data).

    Every rank prepares the test data (the SFTTrainer's preparation synchronizes the ranks); then the
    others leave and the main rank scores alone, on its own replica of the weights.
    """
    spec, sink = recipe.spec, recipe.sink
    me = distributed.world()
    strategy = distributed.strategy(spec)
    fsdp = strategy == D.DISTRIBUTED_STRATEGY_FSDP and torch.cuda.is_available()
    why = ""
    if not spec.evaluation.enabled:
        why = DISABLED
    elif recipe.cfg.test_file is None:
        why = NO_TEST_SPLIT
    elif me.world_size > 1 and (strategy in SHARDED or fsdp):
        why = (
            "not supported with sharded training: the weights are sharded across ranks (ZeRO-3 or FSDP), so "
            "no rank can run the model alone"
        )
    if why:
        sink.log(f"No evaluation after training: {why}.")  # written by the main rank only
        return to_dict(skipped(why)) if me.is_main else None
    started = time.time()
    sink.phase("evaluating")
    sink.timeline("EVALUATION_STARTED", "Evaluating the base and the tuned model on the test split.")
    evaluation: Evaluation | None = None
    preparing: Exception | None = None
    try:
        evaluation = (kind or Evaluation)(recipe)
        evaluation.prepare()
    except Exception as exc:  # raised again on the main rank, reported there
        preparing = exc
    if not me.is_main:
        return None
    try:
        if preparing is not None:
            raise preparing
        assert evaluation is not None
        report = evaluation.run(started)
    except Exception as exc:  # Cancelled is a BaseException and passes
        recipe._check_stop()  # a failure while stopping is a cancellation
        log.warning("the evaluation after training failed", exc_info=True)
        sink.log(f"The evaluation after training failed:\n{traceback.format_exc()}", "warning")
        reason = str(exc).strip().rstrip(".") or "no message"
        report = failed(f"The evaluation failed ({type(exc).__name__}: {reason[:300]}).", started)
    duration = time.time() - started
    primary = report.primary_metric
    metrics: dict[str, float] = {}
    if report.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED:
        metrics = {
            f"base_{primary}": report.base_metrics[primary],
            f"tuned_{primary}": report.tuned_metrics[primary],
        }
        message = (
            f"Evaluated {report.example_count} test examples: {primary} {metrics[f'base_{primary}']:.4g} "
            f"(base) -> {metrics[f'tuned_{primary}']:.4g} (tuned); "
            + ("improved." if report.improved else "not improved.")
        )
    else:
        message = report.message
    sink.log(message)
    sink.timeline("EVALUATION_COMPLETED", message, duration_s=duration, metrics=metrics)
    return to_dict(report)


class StopRequested(StoppingCriteria):
    """Ends a generation at the next token once a stop was asked for (the caller then raises Cancelled)."""

    def __init__(self, stop: StopSignal) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.stop.requested


class Evaluation:
    """One evaluation of one recipe's trained model."""

    def __init__(self, recipe: BaseRecipe) -> None:
        assert recipe.trainer is not None
        self.recipe = recipe
        self.spec = recipe.spec
        self.settings = recipe.spec.evaluation
        self.tokenizer = recipe.tokenizer
        model: Any = recipe.trainer.model  # unwrapped (no DDP/DeepSpeed engine): this rank's own replica
        self.model = model
        self.device: torch.device = next(model.parameters()).device
        self.batch_size = max(1, recipe.hp.batch_size)
        self.max_length = recipe.hp.max_seq_length or 2048
        self.dtype = recipe.compute_dtype()

    # -- the run ----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Read the test rows and tokenize them as training did (on every rank)."""
        cfg, method = self.recipe.cfg, self.spec.method
        assert cfg.test_file is not None
        rows, family = read_rows(cfg.test_file, METHOD_FAMILIES[method], self.recipe.method)
        if self.recipe.family and family != self.recipe.family:
            raise ValueError(
                f"the test split is {family} data but the training data is {self.recipe.family} data"
            )
        rows = rows[: self.settings.max_examples]
        self.rows = rows
        self.family = family
        self.conversational = family == Family.CHAT or isinstance(rows[0].get("prompt"), list)
        self.scorer = self._scorer(method, rows)
        self.samples = [self._sample_source(row) for row in rows[: self.settings.num_samples]]

    def run(self, started: float) -> evaluation_pb2.EvaluationReport:
        """Score both models and answer the sample prompts (the main rank only)."""
        method, scorer, samples = self.spec.method, self.scorer, self.samples
        results: dict[str, Any] = {}
        answers: dict[str, list[str]] = {}
        for which in ("base", "tuned"):
            with self._model(which) as model:
                results[which] = scorer(model)
                answers[which] = (
                    self._generate(model, [s[0] for s in samples], self.settings.max_new_tokens)
                    if samples
                    else []
                )
        report = evaluation_pb2.EvaluationReport(
            status=evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, split=SPLIT, start_time=timestamp(started)
        )
        self._fill(report, method, results)
        for (_, prompt, reference), base, tuned in zip(
            samples, answers["base"], answers["tuned"], strict=True
        ):
            report.samples.add(prompt=prompt, base_answer=base, tuned_answer=tuned, reference=reference)
        report.end_time.CopyFrom(timestamp())
        return report

    def _scorer(self, method: int, rows: list[dict[str, Any]]) -> Callable[[Any], Any]:
        if method in LOSS_METHODS:
            data = self._loss_dataset(rows)
            self.example_count = len(data)
            return lambda model: self._token_loss(model, data)
        if method in PREFERENCE_METHODS:
            groups = self._answer_sequences(method, rows)
            self.example_count = len(groups[0])
            return lambda model: [self._answer_logps(model, sequences) for sequences in groups]
        if method == M.TRAINING_METHOD_GRPO:
            self.example_count = len(rows)
            return lambda model: self._rewards(model, rows)
        raise ValueError(f"no evaluation for {job_pb2.TrainingMethod.Name(method)}")  # type: ignore[arg-type]

    def _fill(self, report: evaluation_pb2.EvaluationReport, method: int, results: dict[str, Any]) -> None:
        report.example_count = self.example_count
        if method in LOSS_METHODS:
            report.primary_metric = "loss"
            for which, target in (("base", report.base_metrics), ("tuned", report.tuned_metrics)):
                loss = results[which]
                target["loss"] = loss
                target["perplexity"] = math.exp(min(loss, 700.0))
            report.improved = results["tuned"] < results["base"]
        elif method in PREFERENCE_METHODS:
            report.primary_metric = "reward_accuracy"
            report.base_metrics["reward_accuracy"] = 0.5
            report.base_metrics["reward_margin"] = 0.0
            accuracy, margin = self._preference_metrics(method, results["base"], results["tuned"])
            report.tuned_metrics["reward_accuracy"] = accuracy
            report.tuned_metrics["reward_margin"] = margin
            report.improved = accuracy > 0.5
        else:
            report.primary_metric = "mean_reward"
            report.base_metrics.update(results["base"])
            report.tuned_metrics.update(results["tuned"])
            report.improved = results["tuned"]["mean_reward"] > results["base"]["mean_reward"]

    # -- the two models ---------------------------------------------------------------------------------

    @contextmanager
    def _model(self, which: str) -> Iterator[Any]:
        """The tuned model as trained, or the base: the adapter switched off, or (full fine-tuning) the base
        weights loaded beside it and released afterwards."""
        self.model.eval()
        if which == "tuned":
            yield self.model
            return
        if not self.recipe.full:
            if not hasattr(self.model, "disable_adapter"):
                raise TypeError(f"the trained model is a {type(self.model).__name__}, not a PEFT model")
            with self.model.disable_adapter():
                yield self.model
            return
        self._release_optimizer_state()
        base: Any = self.recipe.load_model(trainable=False)
        # On a GPU the matmuls run autocast to the compute dtype anyway: the base copy is kept in it.
        dtype = self.dtype if self.device.type == "cuda" else None
        base = base.to(self.device, dtype=dtype).eval()
        try:
            yield base
        finally:
            del base
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _release_optimizer_state(self) -> None:
        """Full fine-tuning: the optimizer's state (twice the weights with Adam) is not needed once the model
        is saved, and the base copy needs the room."""
        optimizer = getattr(self.recipe.trainer, "optimizer", None)
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            state.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextmanager
    def _inference(self) -> Iterator[None]:
        autocast = self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            yield

    def _check_stop(self) -> None:
        if self.recipe.stop.requested:
            raise Cancelled(self.recipe.stop.reason)

    # -- SFT and distillation: token loss ---------------------------------------------------------------

    def _loss_dataset(self, rows: list[dict[str, Any]]) -> Dataset:
        """The rows tokenized with labels, by the recipe's own SFTTrainer (chat template, assistant-only or
        completion-only masks, truncation to max_length), without packing."""
        recipe, trainer = self.recipe, self.recipe.trainer
        assert trainer is not None
        sft: Any = trainer  # an SFTTrainer: SFT and distillation
        data = recipe.prepare(rows)
        weighted = getattr(recipe, "_tokenize_weighted", None)
        if weighted is not None and self.family == Family.CHAT and recipe.hp.assistant_only_loss:
            if any(m.get("weight") == 0 for row in rows for m in row["messages"]):
                data = weighted(data)
        # SFTTrainer._prepare_dataset(dataset, processing_class, args, packing, formatting_func, name)
        prepared = sft._prepare_dataset(data, self.tokenizer, trainer.args, False, None, "test")
        if len(prepared) == 0:
            raise ValueError("no test example has a token that training's loss counts")
        return prepared

    def _token_loss(self, model: Any, data: Dataset) -> float:
        """Mean negative log-likelihood per counted token (labels != -100) over the whole split."""
        total, count = 0.0, 0
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(data), self.batch_size):
            self._check_stop()
            batch = data[start : start + self.batch_size]
            ids, labels = batch["input_ids"], batch["labels"]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
            label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
            with self._inference():
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            logits = logits[:, -width:]  # a soft prompt (prompt tuning) adds virtual tokens in front
            batch_total, batch_count = summed_token_loss(logits, label_ids)
            total, count = total + batch_total, count + batch_count
        if count == 0:
            raise ValueError("no test example has a token that training's loss counts")
        return total / count

    # -- DPO, ORPO, KTO: implicit rewards ---------------------------------------------------------------

    def _answer_sequences(self, method: int, rows: list[dict[str, Any]]) -> list[list[tuple[list[int], int]]]:
        """DPO/ORPO: [chosen sequences, rejected sequences]; KTO: [sequences] (their labels in
        ``kto_labels``). A sequence is (token ids, where the answer starts)."""
        if method == M.TRAINING_METHOD_KTO:
            data = self.recipe.prepare(rows)  # preference pairs split into good and bad rows, as trained
            kto_rows = list(data)[: self.settings.max_examples]
            self.kto_labels = [bool(row["label"]) for row in kto_rows]
            return [[self._split(row["prompt"], row["completion"]) for row in kto_rows]]
        chosen = [self._split(row["prompt"], row["chosen"]) for row in rows]
        rejected = [self._split(row["prompt"], row["rejected"]) for row in rows]
        return [chosen, rejected]

    def _split(self, prompt: Any, answer: Any) -> tuple[list[int], int]:
        """prompt+answer as training tokenizes it (TRL's DPO way: the prompt with the generation prompt, then
        the whole conversation; the answer starts where the two diverge), truncated to max_length."""
        if self.conversational:
            prompt_text = self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=False
            )
            full_text = self.tokenizer.apply_chat_template(prompt + answer, tokenize=False)
            prompt_ids = self._ids(str(prompt_text), special=False)
            full_ids = self._ids(str(full_text), special=False)
        else:
            prompt_ids = self._ids(str(prompt), special=True)
            full_ids = self._ids(str(prompt) + str(answer), special=True)
        start = 0
        while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
            start += 1
        if len(full_ids) > self.max_length:  # keep the answer: drop the prompt's start first
            cut = min(len(full_ids) - self.max_length, max(start - 1, 0))
            full_ids, start = full_ids[cut:][: self.max_length], start - cut
        return full_ids, start

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _answer_logps(self, model: Any, sequences: Sequence[tuple[list[int], int]]) -> list[float]:
        """Sum of the answer tokens' log-probabilities for each sequence."""
        out: list[float] = []
        pad = self.tokenizer.pad_token_id or 0
        for begin in range(0, len(sequences), self.batch_size):
            self._check_stop()
            batch = sequences[begin : begin + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor(
                [ids + [pad] * (width - len(ids)) for ids, _ in batch], device=self.device
            )
            mask = torch.tensor(
                [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=self.device
            )
            with self._inference():
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, -width:]
            for row, (ids, start) in enumerate(batch):
                first = max(start, 1)
                if first >= len(ids):
                    out.append(0.0)
                    continue
                logp = torch.log_softmax(logits[row, first - 1 : len(ids) - 1].float(), dim=-1)
                target = input_ids[row, first : len(ids)]
                out.append(logp.gather(-1, target.unsqueeze(-1)).sum().item())
        return out

    def _preference_metrics(
        self, method: int, base: list[list[float]], tuned: list[list[float]]
    ) -> tuple[float, float]:
        beta = {
            M.TRAINING_METHOD_DPO: self.spec.dpo.beta,
            M.TRAINING_METHOD_ORPO: self.spec.orpo.beta,
            M.TRAINING_METHOD_KTO: self.spec.kto.beta,
        }[method]  # type: ignore[index]
        rewards_of = [
            [beta * (t - b) for t, b in zip(tuned[i], base[i], strict=True)] for i in range(len(tuned))
        ]
        if method == M.TRAINING_METHOD_KTO:
            labels = self.kto_labels
            rewards = rewards_of[0]
            right = [(r > 0) if good else (r < 0) for r, good in zip(rewards, labels, strict=True)]
            good = [r for r, g in zip(rewards, labels, strict=True) if g]
            bad = [r for r, g in zip(rewards, labels, strict=True) if not g]
            margin = (sum(good) / len(good) if good else 0.0) - (sum(bad) / len(bad) if bad else 0.0)
            return sum(right) / len(right), margin
        chosen, rejected = rewards_of
        diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
        return sum(d > 0 for d in diffs) / len(diffs), sum(diffs) / len(diffs)

    # -- GRPO: rewards of greedy completions ------------------------------------------------------------

    def _rewards(self, model: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
        scorer = None
        if job_pb2.REWARD_FUNCTION_REWARD_MODEL in self.spec.grpo.reward_functions:
            scorer = self.recipe.reward_scorer()  # type: ignore[attr-defined]  # a GRPORecipe
        functions = rewards.build(self.spec.grpo, list(rows[0]), reward_model=scorer)
        prompts = [row["prompt"] for row in rows]
        texts = self._generate(
            model, [self._prompt_text(p) for p in prompts], self.spec.grpo.max_completion_length
        )
        completions: list[Any] = (
            [[{"role": "assistant", "content": t}] for t in texts] if self.conversational else texts
        )
        total = [0.0] * len(rows)
        metrics: dict[str, float] = {}
        for function in functions:
            scores = function(prompts=prompts, completions=completions, **columns)
            metrics[f"reward_{getattr(function, '__name__', 'function')}"] = sum(scores) / len(scores)
            total = [t + float(s) for t, s in zip(total, scores, strict=True)]
        metrics["mean_reward"] = sum(total) / len(total)
        return metrics

    # -- generation and samples -------------------------------------------------------------------------

    def _prompt_text(self, prompt: Any) -> str:
        if isinstance(prompt, list):
            return str(maybe_apply_chat_template({"prompt": prompt}, self.tokenizer)["prompt"])
        return str(prompt)

    def _sample_source(self, row: dict[str, Any]) -> tuple[str, str, str]:
        """(what the models are given, the prompt as shown, the dataset's reference answer) of one row."""
        if self.family == Family.CHAT:
            messages: Messages = row["messages"]
            last = max(
                (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages)
            )
            context = messages[:last]
            reference = str(messages[last].get("content") or "") if last < len(messages) else ""
            return self._prompt_text(context), _last_user_turn(context), reference
        if self.family == Family.TEXT:
            words = str(row["text"]).split(" ")
            half = max(1, len(words) // 2)
            return " ".join(words[:half]), " ".join(words[:half]), " ".join(words[half:])
        prompt = row["prompt"]
        shown = _last_user_turn(prompt) if isinstance(prompt, list) else str(prompt)
        if self.family == Family.PREFERENCE:
            reference = rewards.text(row["chosen"])
        elif self.family == Family.KTO:
            reference = rewards.text(row["completion"]) if row.get("label") else ""
        elif self.family == Family.PROMPT_COMPLETION:
            reference = rewards.text(row["completion"])
        else:  # prompt-only (GRPO): the exact-match answer where the rows have one
            reference = str(row.get("answer") or "")
        return self._prompt_text(prompt), shown, reference

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """Greedy, stopping at the chat template's end-of-turn token (or EOS)."""
        from trainer_worker.recipes.base import end_of_turn_token

        stop_ids = [i for i in [self.tokenizer.eos_token_id] if i is not None]
        turn_end = end_of_turn_token(self.tokenizer)
        if turn_end is not None:
            stop_ids.append(self.tokenizer.convert_tokens_to_ids(turn_end))
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _generate(self, model: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers, stopping at the chat template's end-of-turn token (or EOS)."""
        config = self._generation_config(max_new_tokens)
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        answers: list[str] = []
        try:
            for begin in range(0, len(prompts), self.batch_size):
                self._check_stop()
                batch = prompts[begin : begin + self.batch_size]
                encoded = self.tokenizer(
                    batch, return_tensors="pt", padding=True, add_special_tokens=not self.conversational
                ).to(self.device)
                with self._inference():
                    out = model.generate(
                        **encoded,
                        generation_config=config,
                        stopping_criteria=StoppingCriteriaList([StopRequested(self.recipe.stop)]),
                    )
                self._check_stop()
                width = encoded["input_ids"].shape[1]
                echoed = out.shape[1] >= width and torch.equal(out[:, :width], encoded["input_ids"])
                new = out[:, width:] if echoed else out
                answers += [a.strip() for a in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            self.tokenizer.padding_side = side
        return answers


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The summed next-token cross entropy of a batch over the counted tokens (labels != -100), and how
    many tokens that is."""
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        target = labels[row, 1:]
        counted = target != -100
        if not counted.any():
            continue
        picked = logits[row, :-1][counted].float()
        total += F.cross_entropy(picked, target[counted], reduction="sum").item()
        count += int(counted.sum().item())
    return total, count


def _last_user_turn(messages: Messages) -> str:
    return next(
        (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"),
        rewards.text(messages),
    )
