"""Fixtures of the HTTP gateway tests: the whole platform as `tuneforge up` runs it (the gateway is one of
its processes), and a small HTTP client that says which RPC each request reached."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.gateway.rules import all_routes
from services.platform.supervisor import Platform
from tests.auth import make_key
from tests.e2e.conftest import start_platform, tiny_assets  # noqa: F401 - the fixture, shared

ROUTES = all_routes()


def rpc_of(method: str, path: str) -> str:
    """The RPC a request reaches, by the gateway's own route table ("" for none)."""
    raw = path.split("?", 1)[0]
    for route in ROUTES:
        if route.http_method == method and route.path.match(raw) is not None:
            return route.method.name
    return ""


class Api:
    """aiohttp calls to the gateway with one API key; records which RPCs were reached."""

    def __init__(self, base: str, key: str | None, reached: set[str] | None = None) -> None:
        self.base, self.key = base, key
        self.reached = reached if reached is not None else set()
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.session = aiohttp.ClientSession(self.base, headers=headers)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, *, data: bytes | None = None,
                   params: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        assert self.session is not None
        kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if data is not None:
            kwargs["data"] = data
        elif body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.request(method, path, **kwargs) as response:
            text = await response.text()
            assert response.content_type == "application/json", (response.status, text[:300])
            if response.status == 200:
                self.reached.add(rpc_of(method, path))
            return response.status, json.loads(text)

    async def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, answer = await self.call(method, path, body, **kwargs)
        assert status == 200, (method, path, status, answer)
        return answer

    async def events(self, path: str, params: Any = None, limit: int = 100_000) -> list[tuple[str, Any]]:
        """The server-sent events of a stream until it ends: (event name, decoded data) pairs."""
        assert self.session is not None
        out: list[tuple[str, Any]] = []
        async with self.session.get(path, params=params) as response:
            assert response.status == 200, (response.status, await response.text())
            assert response.content_type == "text/event-stream"
            self.reached.add(rpc_of("GET", path))
            name = "message"
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    out.append((name, json.loads(line.removeprefix("data: "))))
                    name = "message"
                    if len(out) >= limit:
                        break
        return out


def violations(answer: dict[str, Any]) -> dict[str, str]:
    """The BadRequest field violations of a Status JSON, by field."""
    for detail in answer.get("details", []):
        if detail["@type"].endswith("google.rpc.BadRequest"):
            return {v["field"]: v["description"] for v in detail["fieldViolations"]}
    return {}


def error_reason(answer: dict[str, Any]) -> str:
    for detail in answer.get("details", []):
        if detail["@type"].endswith("google.rpc.ErrorInfo"):
            return str(detail["reason"])
    return ""


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the datasets service may import from (TUNEFORGE_HF_LOCAL_ROOT), holding a saved dataset."""
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    root = tmp_path_factory.mktemp("hf")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(root / "saved"))
    return root


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, tiny_assets: tuple[Path, Path],  # noqa: F811
             hf_root: Path) -> Iterator[Platform]:
    p = start_platform(tmp_path_factory.mktemp("gateway"), workers=1, model=tiny_assets[0],
                       TUNEFORGE_HF_LOCAL_ROOT=str(hf_root))
    try:
        assert p.http_url.startswith("http://127.0.0.1:")
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def keys(platform: Platform) -> dict[str, str]:
    """Admin keys of two organizations, and a viewer key of the first."""
    return {"a": make_key(platform.address, platform.data_dir, "gw-a"),
            "b": make_key(platform.address, platform.data_dir, "gw-b"),
            "viewer": make_key(platform.address, platform.data_dir, "gw-a", "viewer")}
