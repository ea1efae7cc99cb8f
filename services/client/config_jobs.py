"""Jobs from other platforms' config files (Synth TOML, ModelForge JSON, NeMo Customizer JSON).

`tuneforge_core.config_files` maps the file to a JobSpec and names every key it cannot honour; this module
does what the file's dataset needs on the platform: a dataset named by id or name is used as it is; a local
file (relative paths resolve against the working directory, as the Synth CLI resolves them) is uploaded
first, with the file's
validation split (ModelForge `eval_split`), its first N rows (`examples`: DatasetOptions.max_samples, the
only place TuneForge can say "train on the first N rows") and a separate validation file (Synth
`[data].validation_path`, uploaded as its own dataset and named in spec.validation_dataset).

Uploads are idempotent: the request id is the file's SHA-256 with the upload's options, so running the same
config twice reuses the dataset it uploaded the first time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.v1 import dataset_pb2, dataset_service_pb2, estimation_pb2, estimation_service_pb2, job_pb2

from tuneforge_core.config_files import ConfigJob, load_config
from tuneforge_core.errors import FieldViolation, InvalidArgument, TuneForgeError, Violations
from tuneforge_core.spec import resolve_spec

if TYPE_CHECKING:
    from services.client.client import TuneForgeClient

DEFAULT_MIN_EXAMPLES = 100


@dataclass
class Upload:
    """A local file the job needs on the platform."""

    key: str  # the config key (or flag) that named it
    path: Path
    name: str  # the dataset name it gets
    split: dataset_pb2.SplitConfig
    options: dataset_pb2.DatasetOptions
    min_examples: int | None
    request_id: str
    # "train" (spec.dataset) or "validation" (spec.validation_dataset).
    purpose: str = "train"

    def describe(self) -> str:
        extra = []
        if self.options.HasField("max_samples"):
            extra.append(f"first {self.options.max_samples} examples")
        if self.purpose == "validation":
            extra.append("all of it as the job's validation data")
        elif self.split.validation_fraction > 0:
            extra.append(f"{self.split.validation_fraction:g} held out for validation")
        elif self.split.HasField("validation_fraction"):
            extra.append("no validation split of its own")
        more = f" ({', '.join(extra)})" if extra else ""
        return f"{self.key}: upload {self.path} as dataset '{self.name}'{more}"


@dataclass
class ConfigDryRun:
    """What `--dry-run` shows: the resolved spec, the plan, and the uploads a real run would make."""

    config: ConfigJob
    spec: job_pb2.JobSpec
    # True when the platform resolved the spec (CreateJob validate_only); False when it was resolved here
    # because the dataset is a local file not uploaded yet.
    checked_by_platform: bool
    plan: estimation_service_pb2.PlanJobResponse | None
    uploads: list[Upload] = field(default_factory=list)
    # Why the plan could not be made, when it could not.
    plan_error: str = ""


def read(path_or_text: str | Path, *, dataset: str | None = None, model: str | None = None,
         gpu_type: str | None = None, examples: int | None = None) -> tuple[ConfigJob, list[Upload]]:
    """The mapped config and its uploads; InvalidArgument naming the file's keys for anything it cannot
    honour, a dataset file that is not there included."""
    config = load_config(path_or_text, dataset=dataset, model=model, examples=examples, gpu_type=gpu_type)
    v = Violations()
    uploads: list[Upload] = []
    if not config.dataset:
        v.add("--dataset", "the config names no dataset: pass a dataset id or name, or a local file")
    elif "://" in config.dataset:
        v.add(config.dataset_key, f"'{config.dataset}' is remote: import it first (`tuneforge datasets "
                                  "import URI --name NAME`) and pass --dataset NAME")
    elif config.dataset_is_file:
        path = Path(config.dataset)
        if v.check(path.is_file(), config.dataset_key, f"{path} is not a file"):
            uploads.append(_upload(config.dataset_key, path, config.validation_fraction,
                                   config.max_samples, with_validation_file=bool(config.validation_file)))
    else:  # a dataset already on the platform: its splits and size are fixed
        v.check(config.max_samples is None, "--examples",
                f"the first N rows are chosen when a file is uploaded (DatasetOptions.max_samples); "
                f"'{config.dataset}' is already a dataset and JobSpec has no field for it: pass a local file")
        v.check(config.validation_fraction is None, config.validation_fraction_key or "eval_split",
                f"the validation split is made when a file is uploaded; '{config.dataset}' is already split")
    if config.validation_file:
        path = Path(config.validation_file)
        if v.check(path.is_file(), config.validation_key, f"{path} is not a file"):
            uploads.append(_upload(config.validation_key, path, None, None, validation=True))
    v.raise_if_any("the config's data cannot be used")
    return config, uploads


def _upload(key: str, path: Path, validation_fraction: float | None, max_samples: int | None, *,
            validation: bool = False, with_validation_file: bool = False) -> Upload:
    digest = _sha256(path)
    split = dataset_pb2.SplitConfig()
    # As the seeds' platforms split: train and validation only, no test part. A validation file is all
    # "train" in its own dataset (spec.validation_dataset reads that split), and replaces the main file's
    # validation part.
    if validation or with_validation_file:
        split.train_fraction, split.validation_fraction, split.test_fraction = 1.0, 0.0, 0.0
    elif validation_fraction is not None:
        split.train_fraction = 1.0 - validation_fraction
        split.validation_fraction, split.test_fraction = validation_fraction, 0.0
    options = dataset_pb2.DatasetOptions()
    min_examples = 1 if validation else None
    if max_samples is not None:
        options.max_samples = max_samples
        min_examples = min(max_samples, DEFAULT_MIN_EXAMPLES)
    tag = hashlib.sha256(
        f"{digest}|{split.SerializeToString().hex()}|{options.SerializeToString().hex()}".encode()
    ).hexdigest()
    stem = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-"
                   for c in path.stem.lower()).strip("-._") or "data"  # a dataset name: [a-z0-9._-]
    name = f"{stem[:40]}-{'first' + str(max_samples) + '-' if max_samples else ''}{tag[:8]}"[:63]
    return Upload(key=key, path=path, name=name, split=split, options=options, min_examples=min_examples,
                  request_id=f"config-upload-{tag[:32]}", purpose="validation" if validation else "train")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_uploads(client: TuneForgeClient, config: ConfigJob, uploads: list[Upload]) -> None:
    for upload in uploads:
        try:
            response = client.upload_dataset(upload.path, upload.name, split=upload.split,
                                             options=upload.options, min_examples=upload.min_examples,
                                             request_id=upload.request_id)
        except TuneForgeError as err:  # name the config key that pointed at the file
            err.violations = [FieldViolation(upload.key, f"{v.field}: {v.description}")
                              for v in err.violations] or [FieldViolation(upload.key, err.message)]
            raise
        if upload.purpose == "validation":
            config.spec.validation_dataset = response.dataset.id
        else:
            config.spec.dataset = response.dataset.id


def create_job_from_config(client: TuneForgeClient, path_or_text: str | Path, *, dataset: str | None = None,
                           model: str | None = None, gpu_type: str | None = None, examples: int | None = None,
                           name: str = "", description: str = "", request_id: str = "",
                           validate_only: bool = False) -> job_pb2.Job:
    """Uploads the config's local data (if any) and creates the job; see the module docstring."""
    config, uploads = read(path_or_text, dataset=dataset, model=model, gpu_type=gpu_type, examples=examples)
    if validate_only and uploads:
        raise InvalidArgument(
            "validate_only creates nothing, so the config's local data cannot be uploaded",
            violations=[FieldViolation(u.key, f"{u.path} is a local file; upload it and pass the dataset "
                                              "as dataset=, or use dry_run_config") for u in uploads])
    if not uploads:
        config.spec.dataset = config.dataset
    _run_uploads(client, config, uploads)
    return client.create_job(config.spec, name=name or config.name,
                             description=description or config.description, request_id=request_id,
                             validate_only=validate_only)


def dry_run_config(client: TuneForgeClient, path_or_text: str | Path, *, dataset: str | None = None,
                   model: str | None = None, gpu_type: str | None = None,
                   examples: int | None = None, name: str = "") -> ConfigDryRun:
    """Everything a run would do except creating anything: the platform's CreateJob(validate_only) when the
    dataset is already on it (else the same resolution done here), and its plan (time, cost, fit), a local
    dataset file counted here as its upload would count it (`local_size`)."""
    config, uploads = read(path_or_text, dataset=dataset, model=model, gpu_type=gpu_type, examples=examples)
    spec = job_pb2.JobSpec()
    spec.CopyFrom(config.spec)
    if not config.dataset_is_file:  # a validation file still to upload is left out of the check
        spec.dataset = config.dataset
        job = client.create_job(spec, name=name or config.name, validate_only=True)
        resolved, by_platform = job.spec, True
    else:
        resolved, by_platform = resolve_spec(spec, allow_user_reward_code=True, require_dataset=False), False
    plan, plan_error = None, ""
    train = next((u for u in uploads if u.purpose == "train"), None)
    try:  # a local file is counted here, as the upload would count it
        plan = client.plan_job(spec, dataset_size=local_size(train) if train is not None else None)
    except TuneForgeError as err:  # a model the estimator does not know: the spec itself is still fine
        plan_error = str(err)
    return ConfigDryRun(config=config, spec=resolved, checked_by_platform=by_platform, plan=plan,
                        uploads=uploads, plan_error=plan_error)


def local_size(upload: Upload) -> estimation_pb2.DatasetSize:
    """The size of an upload's file as the datasets service would count it (services.datasets.local), for
    a plan made before the file is uploaded; InvalidArgument naming the config key when the file would be
    refused."""
    from services.datasets.local import options_of, size_of_file, validate_file

    metadata = dataset_service_pb2.UploadDatasetMetadata(name=upload.name, split=upload.split,
                                                         options=upload.options)
    if upload.min_examples is not None:
        metadata.min_examples = upload.min_examples
    opts, split = options_of(metadata)
    report = validate_file(upload.path, opts)
    if not report.valid:
        first = next((i for i in report.issues if i.severity == dataset_pb2.ISSUE_SEVERITY_ERROR), None)
        where = f"line {first.line}: " if first is not None and first.line else ""
        why = f", the first: {where}{first.message}" if first is not None else ""
        raise InvalidArgument(
            f"the upload would refuse {upload.path} ({report.error_count} errors{why}); `tuneforge datasets "
            f"validate {upload.path}` prints the whole report",
            violations=[FieldViolation(upload.key, f"{upload.path} is not a valid dataset")])
    return size_of_file(report, split, upload.name)


__all__ = ["ConfigDryRun", "Upload", "create_job_from_config", "dry_run_config", "read"]
