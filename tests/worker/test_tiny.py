"""The tiny model loads through the same from_pretrained path as a hub model; the dataset is valid chat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import has_generation_markers

from trainer_worker.tiny import build_tiny_chat_model, write_synthetic_chat_dataset


def test_tiny_model_loads_like_a_hub_model(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    assert (tiny_model / "model.safetensors").is_file()
    assert model.config.max_position_embeddings >= 2048
    assert 800 <= len(tokenizer) <= 1100
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert has_generation_markers(tokenizer.chat_template)
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_chat_template_masks_the_answer_and_its_end_token(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "3 plus 4 is 7."},
    ]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    answer = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(answer) == "3 plus 4 is 7.<|im_end|>"


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = build_tiny_chat_model(tmp_path / "a", seed=3)
    second = build_tiny_chat_model(tmp_path / "b", seed=3)
    other = build_tiny_chat_model(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert not torch.equal(
        AutoModelForCausalLM.from_pretrained(first).lm_head.weight,
        AutoModelForCausalLM.from_pretrained(other).lm_head.weight,
    )


def test_dataset_writer_writes_openai_chat_rows(tmp_path: Path) -> None:
    path = write_synthetic_chat_dataset(tmp_path / "d.jsonl", 50, seed=1, with_system=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]

    assert len(rows) == 50
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    again = write_synthetic_chat_dataset(tmp_path / "again.jsonl", 50, seed=1, with_system=True)
    assert again.read_text() == path.read_text()


def test_cli_writes_a_dataset(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    subprocess.run(
        [sys.executable, "-m", "trainer_worker.tiny", "dataset", str(out), "--n", "7"],
        check=True,
        capture_output=True,
    )
    assert len(out.read_text().splitlines()) == 7
    preference = tmp_path / "preference.jsonl"
    subprocess.run(
        [sys.executable, "-m", "trainer_worker.tiny", "dataset", str(preference), "--family", "preference"],
        check=True,
        capture_output=True,
    )
    assert {"prompt", "chosen", "rejected"} == json.loads(preference.read_text().splitlines()[0]).keys()


def test_every_family_of_synthetic_rows_has_its_normalized_shape(tmp_path: Path) -> None:
    from trainer_worker.tiny import synthetic_rows, write_synthetic_dataset
    from tuneforge_core.compat import family_of_row as family_of

    expected = {"chat": "chat", "preference": "preference", "kto": "KTO", "prompt-only": "prompt-only"}
    for family, detected in expected.items():
        rows = synthetic_rows(20, seed=2, family=family)
        assert {family_of(row) for row in rows} == {detected}
    for row in synthetic_rows(20, seed=2, family="preference"):
        assert row["chosen"] != row["rejected"]
    labels = [row["label"] for row in synthetic_rows(20, family="kto")]
    assert labels.count(True) == labels.count(False) == 10
    path = write_synthetic_dataset(tmp_path / "p.jsonl", 5, seed=2, family="prompt-only")
    assert [json.loads(line) for line in path.read_text().splitlines()] == synthetic_rows(5, 2, "prompt-only")


def test_a_wider_model_with_the_same_seed_shares_the_tokenizer(tmp_path: Path) -> None:
    """What distillation needs of a teacher; the tests build one this way."""
    small = build_tiny_chat_model(tmp_path / "small")
    wide = build_tiny_chat_model(tmp_path / "wide", hidden_size=96)
    assert (small / "tokenizer.json").read_bytes() == (wide / "tokenizer.json").read_bytes()
    assert AutoModelForCausalLM.from_pretrained(wide).config.hidden_size == 96
