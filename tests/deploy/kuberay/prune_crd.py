"""Writes raycluster-v1.schema.json: the `ray.io/v1` openAPIV3Schema of KubeRay's RayCluster CRD with the
Kubernetes core objects it embeds (each group's pod `template`, the head's `headService`) cut down to
`{"type": "object"}`. Those are validated as the core objects they are (tests/deploy/test_kuberay.py hands
them to kubernetes-validate); the rest, KubeRay's own fields, is what this schema checks. The CRD file is
17 times the size of what remains (934 kB): almost all of it copies of the core PodSpec.

Run it when upgrading KubeRay (and change KUBERAY_VERSION in test_kuberay.py):
  curl -sLO https://raw.githubusercontent.com/ray-project/kuberay/v1.7.0/ray-operator/config/crd/bases/ray.io_rayclusters.yaml
  .venv/bin/python tests/deploy/kuberay/prune_crd.py ray.io_rayclusters.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

CORE_OBJECTS = ("template", "headService")
OUT = Path(__file__).with_name("raycluster-v1.schema.json")


def prune(node: Any) -> Any:
    if isinstance(node, list):
        return [prune(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: {"type": "object"} if name in CORE_OBJECTS else prune(child)
                        for name, child in value.items()}
        else:
            out[key] = prune(value)
    return out


def main(crd_file: str) -> None:
    crd = yaml.safe_load(Path(crd_file).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    OUT.write_text(json.dumps(prune(version["schema"]["openAPIV3Schema"]), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
