"""Where a job's models may come from: one rule for the jobs service, the estimation service and the worker.

A base model (or a distillation teacher, a DPO reference model, a GRPO reward model) is one of:

- a hub id (``org/name``), which the worker loads from the Hugging Face Hub;
- a folder under one of the operator's model roots (``TUNEFORGE_MODEL_ROOTS``), written as an absolute
  path or a ``file://`` URI. The path is resolved (``..`` and symlinks) before it is compared with the
  roots, so neither a ``../`` nor a link leads out of a root. No roots (the default): no local paths;
- an output of the same organization's jobs in this deployment's object storage,
  ``<storage>/jobs/<org>/...``, as an ``s3://`` or ``file://`` URI (or, on a local store, a path).

Decisions, each made so that a caller can never make a server read what the caller may not:

- The object storage is never a model root for another organization. A path or URI inside it is judged by
  the storage rule alone, even where a model root contains the store: only ``jobs/<the job's org>/``.
- ``s3://`` models outside this deployment's storage are refused. Reading one would need the
  organization's own credentials, which do not exist yet, and the platform's own identity must never read
  a bucket on a caller's behalf (it reaches buckets the caller may not). So the only ``s3://`` models are
  the organization's own outputs, which the platform wrote and may read back; CreateJob checks that they
  exist with the platform's identity for that reason only.
- Relative paths are refused: they resolve against a server's working directory, which means nothing to
  the caller. A hub id that names a folder in the worker's working directory is refused by the worker,
  since ``from_pretrained`` would read that folder instead of asking the hub.
- The data dir (databases, keys, work dirs, caches) is not readable through a root that contains it; a
  root inside the data dir (``<data_dir>/models``, what ``tuneforge up`` uses) is.

`ModelPolicy.source` applies the rule without reading anything but the file system's links;
`ModelPolicy.missing` says what a local or stored model folder lacks (config.json, ``*.safetensors``), never
what any file holds. The rule's form part (`ref_problem`) needs no settings: `resolve_spec` uses it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from tuneforge.v1 import job_pb2

from tuneforge_core.errors import FieldViolation, InvalidArgument, Unavailable, Violations
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import LocalObjectStore, ObjectStore

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
FORMS = "a hub id (org/name), an absolute path under a model root, a file:// URI, or an s3:// URI"
S3_OUTSIDE = (
    "s3:// models outside this deployment's storage need organization credentials, not supported yet; "
    "use a hub id, a folder under a model root, or an output of this organization's jobs"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ModelKind(StrEnum):
    HUB = "hub"
    LOCAL = "local"
    STORED = "stored"


@dataclass(frozen=True)
class ModelSource:
    """A model reference the rule admitted, and where it is."""

    ref: str
    kind: ModelKind
    # LOCAL: the resolved folder. STORED in a local object store: the folder inside it.
    path: Path | None = None
    # STORED: the folder's key in the object store ("jobs/acme/job_x/merged").
    key: str = ""


def ref_problem(value: str) -> str | None:
    """What is wrong with the form of a model reference, or None. Reads nothing and needs no settings."""
    if not value:
        return f"is required: {FORMS}"
    if _CONTROL.search(value):
        return "must not contain control characters"
    if value.startswith("s3://"):
        parsed = urlparse(value)
        if not parsed.netloc or not parsed.path.strip("/"):
            return "an s3:// URI must name a bucket and a folder"
        return None if not (parsed.query or parsed.fragment) else "an s3:// URI has no query or fragment"
    if value.startswith("file:"):
        parsed = urlparse(value)
        if not value.startswith("file://") or parsed.netloc not in ("", "localhost"):
            return "a file:// URI names a folder on the server itself: file:///absolute/folder"
        if parsed.query or parsed.fragment or not unquote(parsed.path).startswith("/"):
            return "a file:// URI is file:///absolute/folder, with no query or fragment"
        return None
    if value.startswith("/"):
        return None
    if value.startswith((".", "~")):
        return "a local path must be absolute (a relative one would be read from a server's working folder)"
    if MODEL_ID_RE.match(value):
        return None
    return f"'{value}' is not {FORMS}"


def parse_roots(value: str | Iterable[str | Path]) -> tuple[Path, ...]:
    """The model roots of a TUNEFORGE_MODEL_ROOTS value (comma-separated absolute folders), resolved."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    roots = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if not Path(item).is_absolute():
            raise ValueError(f"model root '{item}' is not an absolute folder")
        roots.append(Path(os.path.realpath(item)))
    return tuple(roots)


class ModelPolicy:
    """This deployment's rule for model references (see the module's docstring)."""

    def __init__(self, roots: str | Iterable[str | Path] = (), store: ObjectStore | None = None,
                 data_dir: Path | None = None) -> None:
        self.roots = parse_roots(roots)
        self.store = store
        self.store_root = store.root if isinstance(store, LocalObjectStore) else None
        self.data_dir = Path(os.path.realpath(data_dir)) if data_dir is not None else None

    @classmethod
    def from_settings(cls, settings: Any, store: ObjectStore | None) -> ModelPolicy:
        """The policy of a process' KitSettings (model_roots, data_dir) and its object store."""
        return cls(settings.model_roots, store, settings.data_dir)

    # -- the rule ---------------------------------------------------------------------------------------

    def source(self, ref: str, organization: str, field: str) -> ModelSource:
        """Where `ref` is, if this deployment lets `organization` use it; else InvalidArgument on `field`."""
        problem = ref_problem(ref)
        if problem is not None:
            raise _refused(field, problem)
        if ref.startswith("s3://"):
            key = self._key_in_store(ref)
            if key is None:
                raise _refused(field, S3_OUTSIDE)
            return self._stored(ref, key, None, organization, field)
        if ref.startswith("file:"):
            return self._local(ref, unquote(urlparse(ref).path), organization, field)
        if ref.startswith("/"):
            return self._local(ref, ref, organization, field)
        return ModelSource(ref, ModelKind.HUB)

    def check(self, v: Violations, ref: str, organization: str, field: str) -> ModelSource | None:
        """`source`, its refusal added to `v` instead of raised."""
        try:
            return self.source(ref, organization, field)
        except InvalidArgument as exc:
            v.items.extend(exc.violations)
            return None

    def _key_in_store(self, uri: str) -> str | None:
        if self.store is None:
            return None
        try:
            return self.store.key_of(uri)
        except InvalidArgument:
            return None

    def _local(self, ref: str, raw: str, organization: str, field: str) -> ModelSource:
        path = Path(os.path.realpath(raw))  # "..", symlinks: what the path really names, now
        if self.store_root is not None and path.is_relative_to(self.store_root):
            return self._stored(ref, path.relative_to(self.store_root).as_posix(), path, organization, field)
        roots = [root for root in self.roots if path.is_relative_to(root)]
        if self.data_dir is not None and path.is_relative_to(self.data_dir):
            roots = [root for root in roots if root.is_relative_to(self.data_dir)]
        if not roots:
            where = (
                "is not under any of this deployment's model roots (TUNEFORGE_MODEL_ROOTS)"
                if self.roots
                else "is a local path, and this deployment allows none (TUNEFORGE_MODEL_ROOTS is empty)"
            )
            raise _refused(field, f"{where}; links and '..' are followed before the check")
        return ModelSource(ref, ModelKind.LOCAL, path=path)

    def _stored(self, ref: str, key: str, path: Path | None, organization: str, field: str) -> ModelSource:
        own = f"jobs/{organization}/"
        parts = PurePosixPath(key).parts
        if (
            not organization
            or not key.startswith(own)
            or not key[len(own):].strip("/")
            or "//" in key
            or any(p in (".", "..") for p in parts)
        ):
            raise _refused(
                field,
                "is in this deployment's object storage but not among the outputs of organization "
                f"'{organization}' (jobs/{organization}/...): another organization's models cannot be read",
            )
        return ModelSource(ref, ModelKind.STORED, path=path, key=key.rstrip("/"))

    # -- presence ---------------------------------------------------------------------------------------

    def missing(self, source: ModelSource) -> str | None:
        """What keeps a local or stored folder from being a model (config.json and *.safetensors at its
        top), or None; nothing for a hub id, which only the worker can reach. Says nothing of contents."""
        if source.kind is ModelKind.HUB:
            return None
        if source.kind is ModelKind.LOCAL:
            assert source.path is not None
            if not source.path.is_dir():
                return "no model folder exists there"
            has_config = (source.path / "config.json").is_file()
            has_weights = any(p.is_file() for p in source.path.glob("*.safetensors"))
        else:
            assert self.store is not None
            try:
                has_config = self.store.exists(f"{source.key}/config.json")
                names = [k[len(source.key) + 1:] for k in self.store.list_keys(source.key + "/")]
            except Exception as exc:  # storage down: the caller may retry; its details stay in the log
                raise Unavailable("The object storage could not be read to check the model; retry later.",
                                  metadata={"model": source.ref}) from exc
            if not names:
                return "no model is stored there"
            has_weights = any(n.endswith(".safetensors") and "/" not in n for n in names)
        lacks = [what for what, ok in (("config.json", has_config), ("*.safetensors weights", has_weights))
                 if not ok]
        if lacks:
            return f"the folder is not a model: it has no {' and no '.join(lacks)} (safetensors only)"
        return None

    def check_spec(self, spec: job_pb2.JobSpec, organization: str, *, present: bool = True
                   ) -> list[ModelSource]:
        """Checks a resolved spec's base model (and `other_models`) against the rule and, with
        `present`, that a local or stored one exists; raises InvalidArgument naming each field."""
        fields = [("spec.base_model", spec.base_model), *other_models(spec)]
        v = Violations()
        sources = []
        for field, ref in fields:
            source = self.check(v, ref, organization, field)
            if source is None:
                continue
            sources.append(source)
            lack = self.missing(source) if present else None
            if lack is not None:
                v.add(field, lack)
        if v:
            reason = (
                Reason.MODEL_NOT_FOUND if all(_is_missing(item.description) for item in v.items)
                else Reason.INVALID_ARGUMENT
            )
            v.raise_if_any("the model cannot be used", reason=reason)
        return sources


def other_models(spec: job_pb2.JobSpec) -> list[tuple[str, str]]:
    """(field, reference) of each model a resolved spec loads besides its base model: the distillation
    teacher, DPO's own reference model, GRPO's reward model. Each follows the base model's rule."""
    if spec.method == job_pb2.TRAINING_METHOD_DISTILLATION:
        return [("spec.distillation.teacher_model", spec.distillation.teacher_model)]
    if spec.method == job_pb2.TRAINING_METHOD_DPO and spec.dpo.reference_model:
        return [("spec.dpo.reference_model", spec.dpo.reference_model)]
    if spec.method == job_pb2.TRAINING_METHOD_GRPO and spec.grpo.reward_model:
        return [("spec.grpo.reward_model", spec.grpo.reward_model)]
    return []


def _is_missing(description: str) -> bool:
    return description.startswith(("no model", "the folder is not a model"))


def _refused(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {description}", violations=[FieldViolation(field, description)])


__all__: Sequence[str] = [
    "FORMS", "MODEL_ID_RE", "S3_OUTSIDE", "ModelKind", "ModelPolicy", "ModelSource", "other_models",
    "parse_roots", "ref_problem",
]
