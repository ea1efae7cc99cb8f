"""A tiny chat model and a learnable chat dataset, built locally in seconds.

There is no model hub on the machines that test TuneForge, so tests and demos build their own
Llama-architecture model here and load it back through the very same ``from_pretrained(path)`` code path a
hub model takes. The dataset task (country capitals and small sums, phrased in fixed sentences) is easy
enough that the training loss of the random-init model falls clearly within one or two short epochs.

    python -m trainer_worker.tiny model OUT_DIR
    python -m trainer_worker.tiny reward-model OUT_DIR
    python -m trainer_worker.tiny dataset OUT.jsonl --n 200
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"

# ChatML. The {% generation %} markers wrap each assistant answer *and* its end-of-turn token, so TRL's
# assistant_only_loss trains only the answers and still teaches the model to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Austria": "Vienna",
}

SYSTEM_PROMPT = "You are a concise assistant. Answer in one sentence."

# General chat text so the tokenizer learns ordinary English as well as the task's words.
GENERAL_TEXT = """
Hello! How can I help you today? I would like to know more about training language models.
Fine-tuning adapts a pretrained model to a new task with a small amount of labelled data.
A learning rate that is too high makes the loss diverge; one that is too low makes training slow.
Please summarize the following paragraph in two sentences and keep the important numbers.
Sure, here is a short summary of the report, followed by a list of the open questions.
The weather tomorrow will be sunny in the morning, with light rain expected in the evening.
Could you translate this sentence into French, Spanish and German for our customers?
Thank you for the detailed explanation; the example with the small dataset was very useful.
Write a Python function that returns the sum of a list of integers, and add a docstring.
Each epoch visits every example once, and the optimizer updates the weights after each batch.
What are the main differences between supervised fine-tuning and preference optimization?
The quick brown fox jumps over the lazy dog while the cat watches from the garden wall.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2048 appear in many answers.
Remember to validate the input, handle errors clearly, and write tests for every feature.
"""


def _example(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of the synthetic task."""
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _wrong_answer(rng: random.Random, answer: str) -> str:
    """A plausible wrong answer (another capital, a sum off by 1 or 2): what preference data rejects."""
    head, _, value = answer.rstrip(".").rpartition(" is ")
    if value in CAPITALS.values():
        return f"{head} is {rng.choice(sorted(set(CAPITALS.values()) - {value}))}."
    return f"{head} is {int(value) + rng.choice([-2, -1, 1, 2])}."


def _messages(rng: random.Random, with_system: bool) -> list[dict[str, str]]:
    question, answer = _example(rng)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if with_system else []
    return [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_synthetic_chat_dataset(path: Path, n: int, seed: int = 0, *, with_system: bool = False) -> Path:
    """Write ``n`` OpenAI-chat JSONL rows of the synthetic task to ``path``."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"messages": _messages(rng, with_system)}) + "\n")
    return path


def synthetic_rows(n: int, seed: int = 0, family: str = "chat") -> list[dict[str, object]]:
    """``n`` rows of the synthetic task in one normalized family (the shapes the datasets service writes):

    - ``chat``: {"messages": [user, assistant]}
    - ``preference``: {"prompt": [user], "chosen": [assistant], "rejected": [assistant with a wrong answer]}
    - ``kto``: {"prompt": [user], "completion": [assistant], "label": bool}, alternating right and wrong
    - ``prompt-only``: {"prompt": [user], "answer": the right answer}, for GRPO's exact-match reward
    """
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for i in range(n):
        question, answer = _example(rng)
        wrong = _wrong_answer(rng, answer)
        prompt = [{"role": "user", "content": question}]
        if family == "chat":
            rows.append({"messages": [*prompt, {"role": "assistant", "content": answer}]})
        elif family == "preference":
            chosen, rejected = (
                [{"role": "assistant", "content": answer}],
                [{"role": "assistant", "content": wrong}],
            )
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif family == "kto":
            good = i % 2 == 0
            completion = [{"role": "assistant", "content": answer if good else wrong}]
            rows.append({"prompt": prompt, "completion": completion, "label": good})
        elif family == "prompt-only":
            rows.append({"prompt": prompt, "answer": answer})
        else:
            raise ValueError(f"unknown family {family!r}")
    return rows


def write_synthetic_dataset(path: Path, n: int, seed: int = 0, family: str = "chat") -> Path:
    """Write :func:`synthetic_rows` as JSONL to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in synthetic_rows(n, seed, family):
            f.write(json.dumps(row) + "\n")
    return path


def _tokenizer_corpus(seed: int) -> Iterator[str]:
    """Chat-formatted text the tokenizer learns its merges from; it covers every word the dataset uses."""
    yield from GENERAL_TEXT.strip().splitlines()
    rng = random.Random(seed)
    for _ in range(2000):
        question, answer = _example(rng)
        yield (
            f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"
        )


def _build_tokenizer(seed: int, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )


def build_tiny_chat_model(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    lm_head_std: float = 0.25,
) -> Path:
    """Build a random-init LlamaForCausalLM with a trained BPE tokenizer and save both to ``out_dir``.

    The same seed gives the same tokenizer and the same weights. LoRA never trains the output head, and at
    the usual init (std 0.02) the head's logits are so flat that an adapter can barely lower the loss; a
    wider head (``lm_head_std``) stands in for a pretrained model's confident one, so the loss of a LoRA
    run falls clearly (about 8.8 to 2.5 over 2 epochs of 200 rows at lr 2e-3).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(seed, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.nn.init.normal_(model.lm_head.weight, std=lm_head_std)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_reward_model(
    out_dir: Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> Path:
    """A random-init LlamaForSequenceClassification with one label (a GRPO reward model, the form
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` loads) and the tiny
    tokenizer of the same ``seed``, saved to ``out_dir``. Its scores mean nothing; they vary by text."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = _build_tokenizer(seed, 1024)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.num_labels = 1  # one score per sequence
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores that differ visibly between completions
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer_worker.tiny", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="build the tiny chat model into OUT_DIR")
    model.add_argument("out_dir", type=Path)
    model.add_argument("--seed", type=int, default=0)
    reward = sub.add_parser("reward-model", help="build the tiny reward model (one-label classifier)")
    reward.add_argument("out_dir", type=Path)
    reward.add_argument("--seed", type=int, default=0)
    dataset = sub.add_parser("dataset", help="write synthetic OpenAI-chat JSONL")
    dataset.add_argument("out", type=Path)
    dataset.add_argument("--n", type=int, default=200)
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument("--with-system", action="store_true", help="chat rows with a system message")
    dataset.add_argument("--family", choices=["chat", "preference", "kto", "prompt-only"], default="chat")
    args = parser.parse_args(argv)
    if args.command == "model":
        print(build_tiny_chat_model(args.out_dir, seed=args.seed))
    elif args.command == "reward-model":
        print(build_tiny_reward_model(args.out_dir, seed=args.seed))
    elif args.family == "chat":
        print(write_synthetic_chat_dataset(args.out, args.n, args.seed, with_system=args.with_system))
    else:
        print(write_synthetic_dataset(args.out, args.n, args.seed, args.family))


if __name__ == "__main__":
    main()
