"""Training and serving share one chat template and one end-of-turn token.

The recipes train with the model's own template and save it with every output; a full or merged model also
gets the template's end-of-turn token among its generation config's ``eos_token_id``, so a server that stops
on ``eos_token_id`` stops where training taught the model to (Llama 3 ends turns with <|eot_id|>, not with
its eos token). test_correctness.py shows the trained tiny model stopping there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.worker.helpers import FAST_HYPERPARAMETERS, make_run_config, read_events
from trainer_worker.events import EventSink
from trainer_worker.recipes.base import end_of_turn_token
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import IM_END, PAD
from trainer_worker.train import run

# Llama 3's template, shortened: each turn ends with <|eot_id|>, the eos token is another one.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_end_of_turn_token_is_found_in_the_template(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert end_of_turn_token(tokenizer) == IM_END

    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    assert end_of_turn_token(tokenizer) == "<|eot_id|>"

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_token(tokenizer) is None
    tokenizer.chat_template = None
    assert end_of_turn_token(tokenizer) is None


def test_saved_model_stops_on_the_end_of_turn_token_even_when_eos_differs(
    tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    # A base model whose eos token is not the token its template ends turns with.
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = PAD
    tokenizer.save_pretrained(base)
    GenerationConfig(
        eos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(base)
    spec = {
        "adapter": "ADAPTER_TYPE_FULL",
        "hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 1},
    }
    cfg = make_run_config(tmp_path, base, chat_data, spec)
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()

    saved = Path(read_events(cfg.events_file)[-1]["adapter_dir"])
    saved_tokenizer = AutoTokenizer.from_pretrained(saved)
    assert saved_tokenizer.chat_template == tokenizer.chat_template
    eos = AutoModelForCausalLM.from_pretrained(saved).generation_config.eos_token_id
    assert eos == [tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
