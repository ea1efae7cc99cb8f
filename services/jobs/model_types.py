"""CreateJob's model-type rule: fill in JobSpec.model_type, and refuse what the model cannot train on.

The rules are `tuneforge_core.model_types`'; this module reads what they need: the base model's type (the
catalog's, or the config.json of a local or stored model) and whether the dataset holds images (its first
training rows: the datasets service writes an "images" list into every row of a ZIP upload that has one).

A hub id the catalog does not list cannot be looked at here (only the worker reaches the hub): an
UNSPECIFIED model_type then follows the dataset (VLM for images, else LLM), and the worker checks that the
model it downloaded has a vision tower when VLM is asked of it.
"""

from __future__ import annotations

import asyncio
import json
from itertools import islice

from tuneforge.v1 import dataset_pb2, job_pb2

from tuneforge_core import model_types as mt
from tuneforge_core.errors import InvalidArgument, Unavailable, Violations
from tuneforge_core.models import ModelKind, ModelPolicy
from tuneforge_core.storage import ObjectStore

# How much of the train split is read to tell whether the dataset holds images.
PEEK_ROWS = 64
PEEK_BYTES = 1 << 20


async def resolve(spec: job_pb2.JobSpec, dataset: dataset_pb2.Dataset, train_uri: str, organization: str,
                  models: ModelPolicy, store: ObjectStore) -> None:
    """Fills in spec.model_type (when UNSPECIFIED) and raises InvalidArgument when the dataset or the
    base model does not fit it, naming spec.dataset / spec.model_type and saying why."""
    base = await asyncio.to_thread(base_model_type, spec.base_model, organization, models, store)
    images = bool(train_uri) and await asyncio.to_thread(has_images, store, train_uri)
    stated = spec.model_type
    if stated == mt.UNSPECIFIED:
        spec.model_type = base or (mt.VLM if images else mt.LLM)
    v = Violations()
    if stated == mt.VLM and base == mt.LLM:
        v.add("spec.model_type", f"MODEL_TYPE_VLM needs a vision-language base model, but {spec.base_model} "
                                 "is text only (no vision_config); use MODEL_TYPE_LLM")
    if images and spec.model_type != mt.VLM:
        what = (f"the base model {spec.base_model} is text only and cannot read images"
                if base == mt.LLM else
                "spec.model_type is MODEL_TYPE_LLM, which trains the language model alone, on text")
        v.add("spec.dataset",
              f"dataset '{dataset.name or dataset.id}' holds images (a ZIP upload), but {what}; train a "
              "vision-language base model with MODEL_TYPE_VLM, or use a text dataset")
        if stated == mt.LLM and base != mt.LLM:
            v.add("spec.model_type",
                  "MODEL_TYPE_LLM trains on text only; an image dataset needs MODEL_TYPE_VLM")
    mt.check_model_type(v, spec, base)  # the VLM rules again, now that the types are known
    v.raise_if_any("the model type does not fit the model or the dataset")


def base_model_type(ref: str, organization: str, models: ModelPolicy, store: ObjectStore
                    ) -> mt.ModelType | None:
    """The base model's type: the catalog's for a hub id, its config.json's for a local or stored folder;
    None when it cannot be told here (a hub id the catalog does not list, a folder without config.json)."""
    source = models.source(ref, organization, "spec.base_model")
    if source.kind is ModelKind.HUB:
        return mt.catalog_model_type(ref)
    if source.path is not None:  # local, or stored in a local object store
        return mt.folder_model_type(source.path)
    try:
        config = json.loads(store.get_bytes(f"{source.key}/config.json"))
    except (FileNotFoundError, ValueError):
        return None
    except Exception as exc:  # storage down: the caller may retry
        raise Unavailable("The object storage could not be read to check the model; retry later.",
                          metadata={"model": ref}) from exc
    return mt.config_model_type(config) if isinstance(config, dict) else None


def has_images(store: ObjectStore, uri: str) -> bool:
    """Whether the first rows of a normalized split list images (rows of a ZIP upload that have some)."""
    try:
        key = store.key_of(uri)
    except InvalidArgument:  # not in this deployment's storage: no worker reads it either
        return False
    try:
        stream = store.open_object(key)
        try:
            head = stream.read(PEEK_BYTES)
        finally:
            stream.close()
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise Unavailable("The object storage could not be read to check the dataset; retry later.",
                          metadata={"uri": uri}) from exc
    lines = head.splitlines()
    if len(head) == PEEK_BYTES and lines:
        lines = lines[:-1]  # the last one may be cut
    for line in islice(lines, PEEK_ROWS):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("images"):
            return True
    return False
