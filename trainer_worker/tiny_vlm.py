"""A tiny vision-language model and a tiny image dataset, built locally in seconds.

The VLM counterpart of :mod:`trainer_worker.tiny`: a LLaVA-architecture model (a 1-layer CLIP vision tower,
the projector, and the tiny Llama language model) with random weights, and a processor made of a PIL-backed
CLIP image processor and the tiny chat tokenizer (plus an ``<image>`` token). Both are saved to a folder and
loaded back through ``from_pretrained(path)`` (``AutoModelForImageTextToText``, ``AutoProcessor``), the path
a hub model such as Qwen2.5-VL or Llama 3.2 Vision takes. Nothing is downloaded.

The dataset is what a user uploads for a VLM (seed 000): a ZIP holding ``train.jsonl`` and the images it
names, OpenAI chat rows whose user content has an ``{"type": "image"}`` part and an ``"images"`` list. The
task (the colour of a square) can only be learnt by looking at the image.

    python -m trainer_worker.tiny_vlm model OUT_DIR
    python -m trainer_worker.tiny_vlm dataset OUT.zip --n 24
"""

from __future__ import annotations

import argparse
import io
import json
import random
import zipfile
from pathlib import Path
from typing import Any

from trainer_worker.tiny import _build_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8

# ChatML like the tiny chat model's, for contents that are strings or lists of parts: an image part renders
# as the image token (the processor expands it to one token per patch), a text part as its text.
VLM_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- render(message['content']) + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QUESTION = "What colour is the square?"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


def build_tiny_vlm(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vocab_size: int = 1024,
    lm_head_std: float = 0.25,
) -> Path:
    """Build a random-init LlavaForConditionalGeneration and its processor; save both to ``out_dir``."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _build_tokenizer(seed, vocab_size)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops again
        chat_template=VLM_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    text_config = LlamaConfig(
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
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    torch.nn.init.normal_(model.lm_head.weight, std=lm_head_std)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def _png(colour: tuple[int, int, int], rng: random.Random) -> bytes:
    """A square of ``colour`` on a grey background, at a random place."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    x, y = rng.randint(0, 12), rng.randint(0, 12)
    ImageDraw.Draw(image).rectangle([x, y, x + 18, y + 18], fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_rows(n: int, seed: int = 0) -> list[tuple[str, bytes, dict[str, Any]]]:
    """``n`` (image path, PNG bytes, train.jsonl row) triples of the colour task."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        path = f"images/{i:04d}.png"
        row = {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": f"The square is {colour}."},
            ],
            "images": [path],
        }
        out.append((path, _png(COLOURS[colour], rng), row))
    return out


def write_image_dataset_zip(path: Path, n: int = 24, seed: int = 0) -> Path:
    """A ZIP as seed 000 asks users to upload: ``train.jsonl`` and the images it names (``zip -r``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = image_rows(n, seed)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train.jsonl", "".join(json.dumps(row) + "\n" for _, _, row in rows))
        for image_path, data, _ in rows:
            archive.writestr(image_path, data)
    return path


def write_image_split(directory: Path, n: int = 24, seed: int = 0) -> Path:
    """What a worker holds after the agent fetched an image dataset's train split: normalized rows whose
    "images" are local files (``directory/train.jsonl`` and ``directory/images/``)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for image_path, data, row in image_rows(n, seed):
        target = directory / image_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        lines.append(json.dumps({**row, "images": [str(target)]}) + "\n")
    out = directory / "train.jsonl"
    out.write_text("".join(lines), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_worker.tiny_vlm", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="build the tiny vision-language model into OUT_DIR")
    model.add_argument("out_dir", type=Path)
    model.add_argument("--seed", type=int, default=0)
    dataset = sub.add_parser("dataset", help="write a ZIP of images and train.jsonl")
    dataset.add_argument("out", type=Path)
    dataset.add_argument("--n", type=int, default=24)
    dataset.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "model":
        print(build_tiny_vlm(args.out_dir, seed=args.seed))
    else:
        print(write_image_dataset_zip(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
