"""The worker's side of vision-language jobs, without torch: images onto local disk, and which recipe runs.

Rows of an image dataset (a ZIP upload) name their images by storage URI (the datasets service stores them
under ``datasets/<org>/<id>/images/``). The agent fetches every image the downloaded splits name into the
job's data folder and rewrites the rows to the local paths, so the training process (which never talks to
storage) reads plain files. A URI outside this deployment's storage is refused, as for every other input.

A job whose base model is a vision-language model (its config.json has a ``vision_config``), or whose
spec says MODEL_TYPE_VLM, is trained by ``trainer_worker.recipes.vlm`` (SFT with LoRA/QLoRA only).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError, Transient
from tuneforge_core import model_types as mt
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import ObjectStore

Locate = Callable[[str], tuple[ObjectStore, str]]
VLM_RECIPE = "vlm:VisionSFTRecipe"


def localize_images(files: list[Path], locate: Locate, images_dir: Path) -> int:
    """Downloads the images the rows of ``files`` name into ``images_dir`` and rewrites those rows to the
    local paths; returns how many images were fetched (0 for a text dataset: the files stay untouched)."""
    fetched: dict[str, str] = {}
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        changed = False
        for i, line in enumerate(lines):
            if '"images"' not in line:
                continue
            row = json.loads(line)
            uris = row.get("images") if isinstance(row, dict) else None
            if not uris:
                continue
            local = []
            for uri in uris:
                if uri not in fetched:
                    fetched[uri] = str(_fetch(uri, locate, images_dir))
                local.append(fetched[uri])
            row["images"] = local
            lines[i] = json.dumps(row, ensure_ascii=False)
            changed = True
        if changed:
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(fetched)


def _fetch(uri: str, locate: Locate, images_dir: Path) -> Path:
    store, key = locate(uri)
    # A name of our own (the key's hash and its suffix): nothing in the key decides where the file lands.
    suffix = PurePosixPath(key).suffix.lower()[:8]
    dest = images_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + suffix)
    try:
        return store.get_file(key, dest)
    except FileNotFoundError as exc:
        raise TrainingError(Reason.BAD_TRAINING_DATA, f"The image {uri} does not exist.") from exc
    except Exception as exc:  # storage unreachable: another delivery may succeed
        raise Transient(f"could not fetch {uri}: {exc}") from exc


def recipe_override(spec: job_pb2.JobSpec, model_path: str) -> str | None:
    """``"module:Class"`` of the recipe for a vision-language job or base model, or None for the method's
    own recipe. Raises TrainingError for a method no recipe trains on a vision-language base."""
    # A folder's config.json; a hub id's catalog type (a hub VLM outside the catalog needs MODEL_TYPE_VLM,
    # which CreateJob sets for an image dataset; reading its config here would mean the network).
    path = Path(model_path)
    base = mt.folder_model_type(path) if path.is_dir() else mt.catalog_model_type(model_path)
    if spec.model_type != mt.VLM and base != mt.VLM:
        return None
    if spec.method not in mt.VLM_METHODS or spec.adapter not in mt.VLM_ADAPTERS:
        raise TrainingError(
            Reason.TRAINING_FAILED,
            "The base model is a vision-language model, which this worker trains with SFT and LoRA or QLoRA "
            f"only (spec.model_type is {mt.name(spec.model_type)}).",
        )
    return VLM_RECIPE

