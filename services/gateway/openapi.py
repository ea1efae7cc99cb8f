"""OpenAPI 3.1 for the REST/JSON routes, generated from the protos: `python -m services.gateway.openapi OUT`.

Why generated here and not by protoc-gen-openapiv2/swagger: the one packaged generator that runs offline
(Debian's golang-grpc-gateway 1.6.4, protoc-gen-swagger) refuses protos with proto3 `optional` fields, which
ours use, and writes Swagger 2.0; gnostic's protoc-gen-openapi is not packaged. So this module reads the same
things such a generator reads: the `google.api.http` rules (services.gateway.rules, the ones the gateway
serves), the message descriptors, and the comments of the .proto files (from a descriptor set protoc builds
with source info). Schemas follow proto3 JSON: lowerCamelCase names, 64-bit integers as strings, enums by
name, well-known types in their JSON form.

`make openapi` writes gen/openapi/tuneforge.v1.openapi.json; `make openapi-check` (run by `make test`) fails
when the committed file differs from what the protos generate. The gateway serves it at /v1/openapi.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from services.gateway.rules import Route, all_routes

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "gen" / "openapi" / "tuneforge.v1.openapi.json"

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$",
                                  "description": "Seconds with an 's' suffix, e.g. \"3600s\"."},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated lowerCamelCase paths."},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}},
                             "additionalProperties": True},
    "google.protobuf.DoubleValue": {"type": "number"}, "google.protobuf.FloatValue": {"type": "number"},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64"},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64"},
    "google.protobuf.Int32Value": {"type": "integer"}, "google.protobuf.UInt32Value": {"type": "integer"},
    "google.protobuf.BoolValue": {"type": "boolean"}, "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte"},
}


# -- comments --------------------------------------------------------------------------------------------

def load_comments(root: Path = ROOT) -> dict[str, str]:
    """Leading comments by full name (message, field as Message.field, enum, enum value, service, method),
    read from a descriptor set protoc builds with source info."""
    import grpc_tools  # type: ignore[import-untyped]

    protos = sorted(str(p.relative_to(root / "protos")) for p in (root / "protos").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{root / 'protos'}",
                        f"-I{root / 'third_party' / 'protos'}", f"-I{include}", "--include_source_info",
                        f"--descriptor_set_out={out}", *protos], check=True, cwd=root)
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    comments: dict[str, str] = {}
    for file in fds.file:
        names = _paths_to_names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = location.leading_comments.strip()
            if name and text:
                comments[name] = " ".join(line.strip() for line in text.splitlines())
    return comments


def _paths_to_names(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    prefix = file.package
    names: dict[tuple[int, ...], str] = {}

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full = f"{scope}.{m.name}"
        names[path] = full
        for i, f in enumerate(m.field):
            names[(*path, 2, i)] = f"{full}.{f.name}"
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i), full)
        for i, e in enumerate(m.enum_type):
            enum(e, (*path, 4, i), full)

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full = f"{scope}.{e.name}"
        names[path] = full
        for i, v in enumerate(e.value):
            names[(*path, 2, i)] = f"{full}.{v.name}"

    for i, m in enumerate(file.message_type):
        message(m, (4, i), prefix)
    for i, e in enumerate(file.enum_type):
        enum(e, (5, i), prefix)
    for i, s in enumerate(file.service):
        names[(6, i)] = f"{prefix}.{s.name}"
        for j, method in enumerate(s.method):
            names[(6, i, 2, j)] = f"{prefix}.{s.name}.{method.name}"
    return names


# -- schemas ---------------------------------------------------------------------------------------------

class _Schemas:
    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {}

    def ref(self, desc: descriptor.Descriptor | descriptor.EnumDescriptor) -> dict[str, Any]:
        if isinstance(desc, descriptor.Descriptor) and desc.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[desc.full_name])
        name = desc.full_name
        if name not in self.schemas:
            self.schemas[name] = {}  # a placeholder first: messages may refer to themselves
            if isinstance(desc, descriptor.EnumDescriptor):
                self.schemas[name] = self._enum(desc)
            else:
                self.schemas[name] = self._message(desc)
        return {"$ref": f"#/components/schemas/{name}"}

    def _enum(self, desc: descriptor.EnumDescriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in desc.values]}
        lines = [self.comments.get(desc.full_name, "")]
        lines += [f"- {v.name}: {self.comments[f'{desc.full_name}.{v.name}']}" for v in desc.values
                  if f"{desc.full_name}.{v.name}" in self.comments]
        text = "\n".join(line for line in lines if line)
        if text:
            schema["description"] = text
        return schema

    def _message(self, desc: descriptor.Descriptor) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for f in desc.fields:
            schema = self.field(f)
            comment = self.comments.get(f"{desc.full_name}.{f.name}")
            if comment:
                schema = {**schema, "description": comment} if "$ref" not in schema else \
                    {"allOf": [schema], "description": comment}
            properties[f.json_name] = schema
        out: dict[str, Any] = {"type": "object", "properties": properties}
        if desc.full_name in self.comments:
            out["description"] = self.comments[desc.full_name]
        return out

    def field(self, f: FieldDescriptor) -> dict[str, Any]:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            value = f.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.field(value)}
        if f.message_type is not None:
            item = self.ref(f.message_type)
        elif f.enum_type is not None:
            item = self.ref(f.enum_type)
        else:
            item = dict(_SCALARS[f.type])
        return {"type": "array", "items": item} if f.is_repeated else item


# -- paths -----------------------------------------------------------------------------------------------

def _openapi_path(route: Route) -> str:
    """The template in OpenAPI's form: `{model_id=**}` -> `{model_id}`; the verb stays as `:verb`."""
    import re

    return re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", route.path.template)


def _query_parameters(desc: descriptor.Descriptor, schemas: _Schemas, skip: set[str],
                      prefix: str = "", depth: int = 0) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for f in desc.fields:
        name = f"{prefix}{f.json_name}"
        if f.name in skip and not prefix:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            continue
        if f.message_type is not None and f.message_type.full_name not in _WELL_KNOWN:
            if f.is_repeated or depth >= 3:
                continue
            params += _query_parameters(f.message_type, schemas, set(), f"{name}.", depth + 1)
            continue
        param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schemas.field(f)}
        if f.is_repeated:
            param["explode"] = True
        comment = schemas.comments.get(f"{desc.full_name}.{f.name}")
        if comment:
            param["description"] = comment
        params.append(param)
    return params


_ERROR = {"description": "A google.rpc.Status: the gRPC code, a message, and details (ErrorInfo, "
                         "BadRequest naming each bad field).",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}}}


def _operation(route: Route, schemas: _Schemas, ids: dict[str, int]) -> dict[str, Any]:
    method = route.method
    request, response = method.input_type, method.output_type
    op_id = method.name if method.name not in ids else f"{method.name}{ids[method.name] + 1}"
    ids[method.name] = ids.get(method.name, 0) + 1
    description = schemas.comments.get(method.full_name, "")
    op: dict[str, Any] = {"operationId": op_id, "tags": [method.containing_service.name],
                          "summary": description.split(". ")[0].rstrip(".") if description else method.name,
                          "description": description,
                          "parameters": [{"name": v, "in": "path", "required": True,
                                          "schema": {"type": "string"},
                                          **({"description": "May contain '/' (sent as is)."}
                                             if "**" in route.path.template else {})}
                                         for v in route.path.variables]}
    if route.client_streaming:
        metadata = next(f.message_type for f in request.fields if f.message_type is not None)
        assert metadata is not None
        op["parameters"] += _query_parameters(metadata, schemas, set())
        op["requestBody"] = {"required": True, "description": "The file's raw bytes, streamed to the service "
                             f"in chunks; the {metadata.name} fields are query parameters.",
                             "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}
    else:
        skip = set(route.path.variables)
        if route.body == "*":
            op["requestBody"] = {"required": False,
                                 "content": {"application/json": {"schema": schemas.ref(request)}}}
        else:
            if route.body:
                skip.add(route.body)
                body_field = request.fields_by_name[route.body]
                op["requestBody"] = {"required": True,
                                     "content": {"application/json": {"schema": schemas.field(body_field)}}}
            op["parameters"] += _query_parameters(request, schemas, skip)
    if route.server_streaming:
        op["responses"] = {"200": {
            "description": f"Server-sent events: each `data:` line is one {response.name} as JSON; a failure "
                           "after the stream began is an `event: error` whose data is a google.rpc.Status.",
            "content": {"text/event-stream": {"schema": {"type": "string"},
                                              "x-event-schema": schemas.ref(response)}}}}
    else:
        op["responses"] = {"200": {"description": response.name,
                                   "content": {"application/json": {"schema": schemas.ref(response)}}}}
    op["responses"]["default"] = _ERROR
    return op


def build_document(comments: dict[str, str] | None = None) -> dict[str, Any]:
    """The OpenAPI document of every route (comments: from `load_comments`, or none)."""
    from google.rpc import status_pb2

    schemas = _Schemas(comments or {})
    schemas.ref(status_pb2.Status.DESCRIPTOR)
    paths: dict[str, dict[str, Any]] = {}
    ids: dict[str, int] = {}
    services: dict[str, str] = {}
    for route in sorted(all_routes(), key=lambda r: (r.path.template, r.http_method)):
        operation = _operation(route, schemas, ids)
        paths.setdefault(_openapi_path(route), {})[route.http_method.lower()] = operation
        service = route.method.containing_service
        services[service.name] = schemas.comments.get(service.full_name, "")
    return {
        "openapi": "3.1.0",
        "info": {"title": "TuneForge API", "version": "v1",
                 "description": "The REST/JSON face of the tuneforge.v1 gRPC services, generated from the "
                                "protos' google.api.http annotations (services/gateway/openapi.py). "
                                "Authenticate with `Authorization: Bearer <API key>`."},
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "security": [{"bearer": []}],
        "tags": [{"name": name, "description": text} for name, text in sorted(services.items())],
        "paths": dict(sorted(paths.items())),
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "A TuneForge API key."}},
                       "schemas": dict(sorted(schemas.schemas.items()))},
    }


def render(comments: dict[str, str] | None = None) -> str:
    return json.dumps(build_document(comments), indent=1, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(load_comments()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
