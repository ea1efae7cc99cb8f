"""Settings of the datasets service: the kit's TUNEFORGE_* settings plus the upload and import limits."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from tuneforge_core.settings import KitSettings

GIB = 1024 ** 3


class DatasetSettings(KitSettings):
    # TUNEFORGE_MAX_UPLOAD_BYTES: the largest file UploadDataset/ValidateDataset accept. Larger uploads fail
    # with RESOURCE_EXHAUSTED (UPLOAD_TOO_LARGE), before reading when the client declared the size.
    max_upload_bytes: int = Field(default=2 * GIB, gt=0)
    # TUNEFORGE_MAX_LINE_BYTES: the longest JSONL line (one example) or CSV field read; a longer one is a
    # LINE_TOO_LONG error on its line and is skipped without being held in memory.
    max_line_bytes: int = Field(default=16 * 1024 ** 2, gt=0)
    # TUNEFORGE_MAX_EXTRACTED_BYTES: what a ZIP upload may expand to; more is refused as a zip bomb.
    max_extracted_bytes: int = Field(default=8 * GIB, gt=0)
    # TUNEFORGE_CREDENTIALS_KEY: Fernet key(s) that encrypt the source credentials of running imports,
    # comma-separated, newest first (older keys still decrypt, for rotation). Empty: a key generated on
    # first use and kept in <data_dir>/secrets/credentials.key (mode 0600), enough for the embedded setup.
    credentials_key: SecretStr = SecretStr("")
    # TUNEFORGE_HF_LOCAL_ROOT: the folder under which CreateDataset may read local Hugging Face datasets
    # (save_to_disk folders, data files). Empty: local paths are refused, only hub ids are imported, so a
    # caller can never make the server read its own files.
    hf_local_root: Path | None = None
    # TUNEFORGE_IMPORT_MULTIPART_THRESHOLD_BYTES / _CHUNK_BYTES: S3/GCS objects at least this large are
    # downloaded as concurrent ranged GETs of this many bytes each.
    import_multipart_threshold_bytes: int = Field(default=8 * 1024 ** 2, gt=0)
    import_multipart_chunk_bytes: int = Field(default=8 * 1024 ** 2, gt=0)
    # TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST: where CreateDataset may send S3/GCS requests (source.endpoint_url)
    # besides AWS S3 and Google Cloud Storage themselves: comma-separated hosts ("minio.internal",
    # "10.0.0.5:9000") or URL prefixes ("https://s3.example.com/tenant-a"). Empty: AWS and GCS only, so a
    # caller cannot make the server send requests into its own network (server-side request forgery).
    import_endpoint_allowlist: str = ""
    # TUNEFORGE_IMPORT_WORKERS: CreateDataset imports that may run at once (checking, reading or processing
    # their source), each on a thread of their own pool (services.kit.pools); one more is refused at once
    # with RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) naming this setting, never queued.
    import_workers: int = Field(default=4, gt=0)
    # TUNEFORGE_PROCESSING_WORKERS: uploads, validations and re-splits that may run at once (from their
    # first byte received to their commit; tokenizer loading too), on a pool of their own; one more is
    # refused at once with RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) naming this setting.
    processing_workers: int = Field(default=4, gt=0)
    # TUNEFORGE_IMPORT_CONNECT_TIMEOUT_S / _READ_TIMEOUT_S: how long an S3/GCS import waits to connect, and
    # for each read of a response, before that attempt fails (boto3 tries 3 times, so a source that never
    # answers fails an import after about 3 times the sum). Hugging Face reads have the hub client's own
    # timeouts (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT: 10 s by default).
    import_connect_timeout_s: float = Field(default=10.0, gt=0)
    import_read_timeout_s: float = Field(default=60.0, gt=0)
    # TUNEFORGE_MAX_DATASET_BYTES_PER_ORG: the bytes of dataset files (as uploaded or imported) one
    # organization may keep; an upload or import that would go past it is refused with RESOURCE_EXHAUSTED
    # (QUOTA_EXCEEDED) naming this setting, before anything is stored. 0: unlimited.
    max_dataset_bytes_per_org: int = Field(default=50 * GIB, ge=0)

    @field_validator("import_endpoint_allowlist")
    @classmethod
    def _parsable_allowlist(cls, value: str) -> str:
        from services.datasets.sources import EndpointAllowlist

        EndpointAllowlist.parse(value)  # a malformed entry stops the service at start
        return value
