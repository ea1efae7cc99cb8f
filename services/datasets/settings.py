"""Settings of the datasets service: the kit's TUNEFORGE_* settings plus the upload limit."""

from __future__ import annotations

from pydantic import Field

from services.kit.settings import KitSettings

GIB = 1024 ** 3


class DatasetSettings(KitSettings):
    # TUNEFORGE_MAX_UPLOAD_BYTES: the largest file UploadDataset/ValidateDataset accept. Larger uploads fail
    # with RESOURCE_EXHAUSTED (UPLOAD_TOO_LARGE), before reading when the client declared the size.
    max_upload_bytes: int = Field(default=2 * GIB, gt=0)

    @classmethod
    def from_kit(cls, settings: KitSettings) -> DatasetSettings:
        """The process' settings as DatasetSettings; the datasets-only fields come from the environment.

        The platform runner builds one KitSettings for all services; explicit kit values win over the
        environment, so nothing the runner set is lost.
        """
        if isinstance(settings, cls):
            return settings
        return cls(**settings.model_dump())
