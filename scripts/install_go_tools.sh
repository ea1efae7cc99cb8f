#!/usr/bin/env bash
# Usage: scripts/install_go_tools.sh — makes sure a Go toolchain and the Go protobuf/gRPC plugins and libraries
# are installed, from Debian packages (the Go module proxy is not reachable here; Debian's golang-go works in
# GOPATH mode against the golang-*-dev packages under /usr/share/gocode).
# Exit 0: everything is there (installed now or before). Exit 3: cannot install (no apt-get, not root and no
# sudo, or apt failed): callers skip Go with the message this prints.
set -uo pipefail
# golang-github-golang-protobuf-1-5-dev is named explicitly: apt otherwise satisfies grpc's dependency with the
# 1.3 API, which panics at run time next to google.golang.org/protobuf 1.28.
packages=(golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev golang-google-genproto-dev
  golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "Go tools: not installed (${missing[*]}) and no apt-get on this machine: skipping Go" >&2
  exit 3
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "Go tools: not installed (${missing[*]}) and apt-get needs root (no passwordless sudo): skipping Go" >&2
  exit 3
fi
echo "Go tools: installing ${missing[*]} with apt-get" >&2
start=$(date +%s)
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q)
if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >/tmp/tuneforge-go-apt.log 2>&1; then
  # A fresh image may have no package lists yet.
  "${apt[@]}" update >>/tmp/tuneforge-go-apt.log 2>&1
  if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >>/tmp/tuneforge-go-apt.log 2>&1; then
    echo "Go tools: apt-get install failed (log: /tmp/tuneforge-go-apt.log): skipping Go" >&2
    tail -5 /tmp/tuneforge-go-apt.log >&2
    exit 3
  fi
fi
echo "Go tools: installed in $(( $(date +%s) - start )) s" >&2
