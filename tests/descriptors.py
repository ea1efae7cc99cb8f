"""The public API as the generated descriptors describe it, for tests generated from it (tenant isolation,
hostile input): so a new RPC is covered the moment it is added to a proto."""

from __future__ import annotations

import importlib
import pkgutil

import tuneforge.v1
from google.protobuf import descriptor


def service_methods() -> list[descriptor.MethodDescriptor]:
    """Every RPC of every tuneforge.v1 service."""
    methods = []
    for module in pkgutil.iter_modules(tuneforge.v1.__path__):
        if module.name.endswith("_service_pb2"):
            pb2 = importlib.import_module(f"tuneforge.v1.{module.name}")
            for service in pb2.DESCRIPTOR.services_by_name.values():
                methods += list(service.methods)
    return methods
