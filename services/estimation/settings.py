"""Settings of the estimation service, from TUNEFORGE_ESTIMATION_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EstimationSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_ESTIMATION_", env_file=None, extra="ignore")

    # A folder with hardware.json and models.json replacing the catalog shipped with the code.
    catalog_dir: Path | None = None
    # Hourly USD per GPU type, overriding the catalog's defaults, as JSON: {"nvidia-a100-80gb": 1.8}.
    hourly_usd: dict[str, float] = Field(default_factory=dict)
    # Deadline of each call to the datasets service.
    datasets_timeout_s: float = Field(default=10.0, gt=0.0)
