"""The Kubernetes manifest of a VLLM deployment, rendered from deploy/k8s/vllm/deployment.yaml.

Values go into the template as JSON, which is valid YAML, so no value can break the document's
structure. vLLM serves the base model with the job's adapter as a LoRA module named after the deployment;
a merged model is served on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "vllm" / "deployment.yaml"
# --max-lora-rank takes one of these.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
MODELS_DIR = "/models/model"


@dataclass(frozen=True)
class VllmSource:
    deployment_id: str
    job_id: str
    name: str
    base_model: str
    # The s3:// URI of the adapter folder (or of the merged model folder when `merged`).
    uri: str
    merged: bool
    lora_rank: int
    image: str
    s3_region: str
    s3_endpoint_url: str


def resource_name(name: str) -> str:
    """A DNS-1123 label for the Kubernetes objects: "tf-" + the deployment name."""
    label = re.sub(r"[^a-z0-9-]", "-", f"tf-{name.lower()}")[:63]
    return label.rstrip("-") or "tf-deployment"


def max_lora_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def vllm_args(source: VllmSource) -> list[str]:
    common = ["--host", "0.0.0.0", "--port", "8000"]
    if source.merged:
        return ["--model", MODELS_DIR, "--served-model-name", source.name, *common]
    return ["--model", source.base_model, "--enable-lora", "--lora-modules", f"{source.name}={MODELS_DIR}",
            "--max-lora-rank", str(max_lora_rank(source.lora_rank)), *common]


def render(source: VllmSource, template: Path = TEMPLATE) -> str:
    fetch = ["aws", "s3", "cp", "--recursive", "--only-show-errors", source.uri, MODELS_DIR]
    values = {
        "resource": resource_name(source.name),
        "deployment_id": source.deployment_id,
        "job_id": source.job_id,
        "name": source.name,
        "image": source.image,
        "fetch_command": fetch,
        "vllm_args": vllm_args(source),
        "s3_region": source.s3_region,
        "s3_endpoint_url": source.s3_endpoint_url,
    }
    return Template(template.read_text()).substitute({k: json.dumps(v) for k, v in values.items()})
