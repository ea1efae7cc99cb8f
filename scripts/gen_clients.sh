#!/usr/bin/env bash
# Usage: scripts/gen_clients.sh PYTHON OUT_ROOT — generates the TypeScript and Go clients of buf.gen.yaml
# under OUT_ROOT (OUT_ROOT/gen/ts, OUT_ROOT/gen/go; "." for the committed ones). Needs clients/ts's npm
# packages (make clients-ts-deps). Without protoc-gen-go/protoc-gen-go-grpc (make go-tools installs them from
# Debian) it generates TypeScript only, says so, and leaves gen/go as it is.
set -euo pipefail
python=$(realpath -ms "$1")
root=$(realpath -ms "$2")
cd "$(dirname "$0")/.."
buf=clients/ts/node_modules/.bin/buf
if [ ! -x "$buf" ]; then
  echo "gen_clients: $buf is missing: run 'make clients-ts-deps' (npm ci in clients/ts)" >&2
  exit 1
fi
go_plugins=1
if ! command -v protoc-gen-go >/dev/null || ! command -v protoc-gen-go-grpc >/dev/null; then
  go_plugins=0
  echo "gen_clients: protoc-gen-go/protoc-gen-go-grpc not found (make go-tools installs them): Go skipped," \
    "gen/go not regenerated" >&2
fi
# gen/go is committed as Debian bookworm's plugins write it; other versions write other headers and code,
# which make proto-check reports as stale.
if [ "$go_plugins" = 1 ] && [ "$(protoc-gen-go --version 2>&1)" != "protoc-gen-go v1.28.1" ]; then
  echo "gen_clients: warning: $(protoc-gen-go --version 2>&1) is not Debian's v1.28.1 that gen/go is made with" >&2
fi
# Two templates from buf.gen.yaml, as JSON: the whole (less Go where its plugins are missing), and the
# TypeScript plugin alone for google/rpc/error_details.proto.
mapfile -t templates < <("$python" - "$go_plugins" <<'PY'
import json
import sys

import yaml

with open("buf.gen.yaml") as f:
    config = yaml.safe_load(f)
keep_go = sys.argv[1] == "1"
plugins = [p for p in config["plugins"] if keep_go or not p["out"].startswith("gen/go")]
print(json.dumps({**config, "plugins": plugins}))
ts = [dict(p, include_imports=False) for p in config["plugins"] if p["out"] == "gen/ts"]
print(json.dumps({"version": config["version"], "plugins": ts}))
PY
)
# Generated files of protos that no longer exist must go too (gen/go/go.mod stays).
[ -d "$root/gen/ts" ] && find "$root/gen/ts" -name '*_pb.ts' -delete
[ "$go_plugins" = 1 ] && [ -d "$root/gen/go" ] && find "$root/gen/go" -name '*.pb.go' -delete
"$buf" generate --template "${templates[0]}" -o "$root"
"$buf" generate third_party/protos --path third_party/protos/google/rpc/error_details.proto \
  --template "${templates[1]}" -o "$root"
