"""Settings of the serving service: the kit's TUNEFORGE_* settings plus where the OpenAI-compatible HTTP
endpoint listens, how model processes are run (services.serving.runner), and how many deployments an
organization (and the platform) may have live."""

from __future__ import annotations

from pydantic import Field

from tuneforge_core.settings import KitSettings


class ServingSettings(KitSettings):
    # TUNEFORGE_SERVING_HOST, TUNEFORGE_SERVING_PORT: the OpenAI-compatible HTTP endpoint. Empty host: the
    # gRPC host. No port: 8082 (a free port when that one is taken, or when the gRPC port is 0); 0: a
    # free port.
    serving_host: str = ""
    serving_port: int | None = Field(default=None, ge=0, le=65535)
    # TUNEFORGE_SERVING_BASE_URL: the endpoint's URL as callers reach it (behind a proxy), e.g.
    # https://tuneforge.example.com/v1; empty: http://<host>:<port>/v1.
    serving_base_url: str = ""
    # Seconds a model process may take to download, load and pass its self-check before the deployment
    # is FAILED.
    serving_load_timeout_s: float = Field(default=600.0, gt=0)
    # The self-check: its prompt, and the tokens the answer must end within.
    serving_check_prompt: str = "Hello! Who are you?"
    serving_check_max_new_tokens: int = Field(default=64, ge=1, le=4096)
    # The most tokens a chat completion may ask for (max_tokens), and the default when it asks for none.
    serving_max_tokens: int = Field(default=2048, ge=1)
    serving_default_max_tokens: int = Field(default=256, ge=1)
    # The container image of VLLM deployments' manifests (deploy/k8s/vllm).
    serving_vllm_image: str = "vllm/vllm-openai:latest"
    # Seconds a stopping model process gets before it is killed.
    serving_stop_grace_s: float = Field(default=5.0, ge=0)
    # Deadline of each call to the jobs service.
    serving_jobs_timeout_s: float = Field(default=10.0, gt=0)
    # TUNEFORGE_SERVING_MAX_DEPLOYMENTS_PER_ORG: live deployments (PENDING or READY; FAILED and deleted
    # ones do not count) an organization may have; each EMBEDDED one is a process holding a model in
    # memory. CreateDeployment beyond it answers RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED). 0: no limit.
    serving_max_deployments_per_org: int = Field(default=4, ge=0)
    # TUNEFORGE_SERVING_MAX_MODEL_PROCESSES: model processes the platform runs for all organizations
    # together (PENDING deployments, and READY EMBEDDED ones); CreateDeployment beyond it answers
    # RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED). 0: no limit (size it to the serving host's memory).
    serving_max_model_processes: int = Field(default=0, ge=0)
