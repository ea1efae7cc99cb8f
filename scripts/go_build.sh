#!/usr/bin/env bash
# Usage: scripts/go_build.sh [OUT_DIR] — vets and compiles gen/go's packages and the clients/go example
# (into OUT_DIR/tuneforge-go-example when OUT_DIR is given). It builds in GOPATH mode against Debian's Go
# packages under /usr/share/gocode (make go-tools installs them): the Go module proxy is not reachable here,
# so module mode could not download gen/go/go.mod's requirements. Exit 3: no Go toolchain.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-}
if ! command -v go >/dev/null; then
  echo "go_build: no Go toolchain (make go-tools installs Debian's golang-go where apt-get can)" >&2
  exit 3
fi
# A GOPATH holding copies of gen/go and clients/go at their import paths (copies, not a link to the
# repository, so that nothing walking the work tree meets a loop).
work=$repo/.cache/go
module=github.com/tuneforge/tuneforge
rm -rf "$work/src/$module" && mkdir -p "$work/src/$module/gen" "$work/src/$module/clients"
cp -r "$repo/gen/go" "$work/src/$module/gen/go"
cp -r "$repo/clients/go" "$work/src/$module/clients/go"
export GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOCACHE="$work/build-cache" GOFLAGS=
cd "$work/src/$module"
mapfile -t packages < <(cd "$repo" && find gen/go -name '*.go' -printf "$module/%h\n" | sort -u)
go vet "${packages[@]}" "$module/clients/go"
go build "${packages[@]}"
if [ -n "$out" ]; then
  go build -o "$out/tuneforge-go-example" "$module/clients/go"
else
  go build -o /dev/null "$module/clients/go"
fi
echo "go_build: ok (${packages[*]#$module/}, clients/go)"
