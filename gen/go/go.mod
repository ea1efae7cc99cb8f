module github.com/tuneforge/tuneforge/gen/go

go 1.19

// The versions Debian bookworm packages (golang-google-grpc-dev, golang-google-protobuf-dev,
// golang-google-genproto-dev), against which `make go-check` builds this module in GOPATH mode.
require (
	google.golang.org/genproto v0.0.0-20200413115906-b5235f65be36
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
