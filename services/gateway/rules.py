"""The HTTP routes of the public API, read from the `google.api.http` annotations of the service protos.

Nothing here is written per RPC: every route comes from an RPC's HttpRule, so a new RPC gets its route by
annotating it, and `test_every_rpc_has_a_route` fails for an RPC that is not annotated.

Path templates follow google/api/http.proto: literal segments, `{field}` (one segment), `{field=**}` (the
rest of the path, slashes included, e.g. model ids such as `org/model`), `{field=prefix/*}`, and a custom
verb after the last segment (`/v1/jobs/{job}:cancel`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor

# The modules whose services the gateway serves: every public service of tuneforge.v1.
SERVICE_MODULES = ("api_key_service", "audit_service", "dataset_service", "deployment_service",
                   "estimation_service", "job_service", "metrics_service")

_VERBS = ("get", "put", "post", "delete", "patch")


class TemplateError(ValueError):
    """A path template this gateway cannot serve (a programming error in a proto annotation)."""


@dataclass(frozen=True)
class PathTemplate:
    """One compiled path template: its regex, the request fields its variables bind, and its verb."""

    template: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]  # field paths, e.g. ("job",) or ("model_id",)
    verb: str
    literal_segments: int  # for ordering: more literal segments first

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The variables' values (percent-decoded) when `raw_path` (still percent-encoded) matches. Bytes
        that are not UTF-8 become lone surrogates (errors="surrogateescape", as aiohttp decodes the request
        line), never U+FFFD, so that `transcode.set_path_field` can refuse them."""
        m = self.regex.fullmatch(raw_path)
        if m is None:
            return None
        return {name: unquote(m.group(f"v{i}"), errors="surrogateescape")
                for i, name in enumerate(self.variables)}


def _segments_regex(segments: str, *, in_variable: bool) -> tuple[str, int]:
    parts, literals = [], 0
    for segment in segments.split("/"):
        if segment == "*":
            parts.append(r"[^/]+")
        elif segment == "**":
            parts.append(r".+")
        elif segment and re.fullmatch(r"[A-Za-z0-9_.~-]+", segment):
            parts.append(re.escape(segment))
            literals += 1
        else:
            where = "variable pattern" if in_variable else "path"
            raise TemplateError(f"segment '{segment}' in {where} '{segments}' is not supported")
    return "/".join(parts), literals


def compile_template(template: str) -> PathTemplate:
    """Compiles an HttpRule path template into a PathTemplate."""
    if not template.startswith("/"):
        raise TemplateError(f"template '{template}' does not start with '/'")
    body, verb = template, ""
    last_close, last_colon = template.rfind("}"), template.rfind(":")
    if last_colon > last_close and last_colon > template.rfind("/"):
        body, verb = template[:last_colon], template[last_colon + 1:]
    regex, literals = "", 0
    variables: list[str] = []
    tokens = re.split(r"(\{[^}]*\})", body[1:])
    for token in tokens:
        if not token:
            continue
        if token.startswith("{"):
            name, _, pattern = token[1:-1].partition("=")
            if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", name):
                raise TemplateError(f"variable '{name}' in '{template}' is not a field path")
            sub, _ = _segments_regex(pattern or "*", in_variable=True)
            regex += f"(?P<v{len(variables)}>{sub})"
            variables.append(name)
        else:
            literal_regex = []
            for piece in token.split("/"):
                if piece == "":
                    literal_regex.append("")
                    continue
                sub, count = _segments_regex(piece, in_variable=False)
                literal_regex.append(sub)
                literals += count
            regex += "/".join(literal_regex)
    full = "/" + regex + (":" + re.escape(verb) if verb else "")
    return PathTemplate(template, re.compile(full), tuple(variables), verb, literals)


@dataclass(frozen=True)
class Route:
    """One HTTP binding of one RPC."""

    http_method: str  # GET, POST, ...
    path: PathTemplate
    body: str  # "", "*" or a field name
    response_body: str
    method: descriptor.MethodDescriptor
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def full_name(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def client_streaming(self) -> bool:
        return self.method.client_streaming


def http_rule(method: descriptor.MethodDescriptor) -> http_pb2.HttpRule | None:
    """The method's `google.api.http` option, or None when it has none."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return None
    return options.Extensions[annotations_pb2.http]


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def routes_of(method: descriptor.MethodDescriptor) -> list[Route]:
    """The routes of one RPC (its rule and additional bindings); none when it has no rule."""
    rule = http_rule(method)
    if rule is None:
        return []
    routes = []
    for binding in _bindings(rule):
        kind = binding.WhichOneof("pattern")
        if kind not in _VERBS:
            raise TemplateError(f"{method.full_name}: HTTP pattern '{kind}' is not supported")
        template = compile_template(getattr(binding, kind))
        for name in template.variables:
            _check_field_path(method.input_type, name, method.full_name)
        if binding.body not in ("", "*"):
            _check_field_path(method.input_type, binding.body, method.full_name)
        routes.append(Route(kind.upper(), template, binding.body, binding.response_body, method))
    return routes


def _check_field_path(message: descriptor.Descriptor, path: str, where: str) -> None:
    current = message
    for part in path.split("."):
        f = current.fields_by_name.get(part)
        if f is None:
            raise TemplateError(f"{where}: '{path}' is not a field of {message.full_name}")
        if f.message_type is not None:
            current = f.message_type


def service_descriptors() -> list[descriptor.ServiceDescriptor]:
    """The public services of tuneforge.v1, from the generated modules."""
    import importlib

    services = []
    for name in SERVICE_MODULES:
        module = importlib.import_module(f"tuneforge.v1.{name}_pb2")
        services.extend(module.DESCRIPTOR.services_by_name.values())
    return services


def all_routes() -> list[Route]:
    """Every route, in matching order: routes with a custom verb first, then more literal segments."""
    routes = [r for s in service_descriptors() for m in s.methods for r in routes_of(m)]
    return sorted(routes, key=lambda r: (r.path.verb == "", -r.path.literal_segments, -len(r.path.template)))


def unannotated_methods() -> list[str]:
    """Full names of the public RPCs that have no `google.api.http` rule."""
    return [m.full_name for s in service_descriptors() for m in s.methods if http_rule(m) is None]
