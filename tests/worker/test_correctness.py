"""Training is correct, not just running: on a small synthetic task (the capital of each of 16 countries,
a fixed mapping of the prompt) the fine-tuned tiny model answers at least 90% of the questions exactly, where
the base model answers none, and each answer ends with the chat template's end-of-turn token, so generation
stops there as a server would.

Full fine-tuning, 48 optimizer steps of 8 rows, trained once for the module (about 5 s of training).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tests.worker.helpers import make_run_config, read_events
from trainer_worker.events import EventSink
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import CAPITALS, IM_END
from trainer_worker.train import run

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24


def _question(country: str) -> str:
    return f"What is the capital of {country}?"


def _answer(country: str) -> str:
    return f"The capital of {country} is {CAPITALS[country]}."


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("correctness")
    rows = [
        {
            "messages": [
                {"role": "user", "content": _question(c)},
                {"role": "assistant", "content": _answer(c)},
            ]
        }
        for c in CAPITALS
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows * 8))
    spec = {
        "adapter": "ADAPTER_TYPE_FULL",
        "hyperparameters": {
            "epochs": 3,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "warmup_steps": 0,
            "logging_steps": 8,
            "save_steps": 1000,
        },
    }
    cfg = make_run_config(tmp_path, tiny_model, train, spec)
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()
    return Path(read_events(cfg.events_file)[-1]["adapter_dir"])


def _generate(model_dir: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, dict[str, list[int]]]:
    """Greedy tokens after the generation prompt for every question, in one left-padded batch, as a chat
    server would produce them (everything from the first pad on is dropped)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    inputs = tokenizer.apply_chat_template(
        [[{"role": "user", "content": _question(c)}] for c in CAPITALS],
        add_generation_prompt=True,
        padding=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    generated = {}
    for country, row in zip(CAPITALS, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
        end = row.index(tokenizer.pad_token_id) if tokenizer.pad_token_id in row else len(row)
        generated[country] = row[:end]
    return tokenizer, model, generated


def _accuracy(model_dir: Path) -> float:
    tokenizer, _, generated = _generate(model_dir)
    right = [
        tokenizer.decode(tokens, skip_special_tokens=True) == _answer(c) for c, tokens in generated.items()
    ]
    return sum(right) / len(right)


def test_fine_tuned_model_answers_what_the_base_model_cannot(tiny_model: Path, trained: Path) -> None:
    assert _accuracy(tiny_model) == 0.0
    assert _accuracy(trained) >= 0.9


def test_generation_stops_at_the_end_of_turn_token(tiny_model: Path, trained: Path) -> None:
    tokenizer, model, generated = _generate(trained)
    # Serving uses the very template and end-of-turn token training used.
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    eos = model.generation_config.eos_token_id
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])

    for country, tokens in generated.items():
        assert len(tokens) < MAX_NEW_TOKENS, f"{country}: generation ran to the token limit"
        assert tokens[-1] == end_of_turn and end_of_turn not in tokens[:-1]
