#!/usr/bin/env bash
# Usage: scripts/gen_protos.sh PYTHON OUT_DIR — generates messages, gRPC stubs and mypy stubs.
set -euo pipefail
python=$1
out=$2
site=$("$python" -c 'import site; print(site.getsitepackages()[0])')
bin=$(dirname "$python")
mkdir -p "$out"
PATH="$bin:$PATH" "$python" -m grpc_tools.protoc -Iprotos -Ithird_party/protos -I"$site/grpc_tools/_proto" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  $(find protos -name '*.proto' | sort) 2> >(grep -v "^Writing mypy" >&2) > /dev/null
# Packages for the generated modules (the proto package root is the Python package root).
for d in "$out/tuneforge" "$out/tuneforge/v1" "$out/tuneforge/events" "$out/tuneforge/events/v1"; do
  touch "$d/__init__.py"
done
touch "$out/tuneforge/py.typed"
