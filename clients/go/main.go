// Command tuneforge-go-example calls TuneForge through the generated Go client (gen/go): it lists the base
// models, then sends two bad requests and decodes the google.rpc.Status details of each (ErrorInfo's reason
// and domain, BadRequest's field violations). It prints one JSON object a line.
//
// Usage: TUNEFORGE_API_KEY=tfk_... tuneforge-go-example [-address 127.0.0.1:50051]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	tuneforgev1 "github.com/tuneforge/tuneforge/gen/go/tuneforge/v1"
)

// apiKey puts `authorization: Bearer <key>` on every call of a connection.
type apiKey string

func (k apiKey) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(k)}, nil
}

// RequireTransportSecurity is false so that the example also runs against a plaintext local platform;
// with TLS (grpc.WithTransportCredentials) the key travels encrypted.
func (apiKey) RequireTransportSecurity() bool { return false }

func emit(record map[string]interface{}) {
	line, err := json.Marshal(record)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(line))
}

// describe turns an RPC error into its code, message, ErrorInfo and BadRequest violations.
func describe(step string, err error) map[string]interface{} {
	st := status.Convert(err)
	record := map[string]interface{}{"step": step, "code": st.Code().String(), "message": st.Message()}
	violations := []map[string]string{}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			record["reason"] = d.GetReason()
			record["domain"] = d.GetDomain()
			// ErrorReason's value names are the reason strings themselves (errors.proto).
			_, known := tuneforgev1.ErrorReason_value[d.GetReason()]
			record["known_reason"] = known
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				violations = append(violations, map[string]string{"field": v.GetField(), "description": v.GetDescription()})
			}
		}
	}
	record["violations"] = violations
	return record
}

func main() {
	address := flag.String("address", "127.0.0.1:50051", "the platform's gRPC address")
	flag.Parse()
	key := os.Getenv("TUNEFORGE_API_KEY")
	if key == "" {
		fmt.Fprintln(os.Stderr, "TUNEFORGE_API_KEY is not set")
		os.Exit(2)
	}
	conn, err := grpc.Dial(*address, grpc.WithInsecure(), grpc.WithPerRPCCredentials(apiKey(key)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	models, err := tuneforgev1.NewEstimationServiceClient(conn).ListBaseModels(ctx,
		&tuneforgev1.ListBaseModelsRequest{PageSize: 100})
	if err != nil {
		emit(describe("failed", err))
		os.Exit(1)
	}
	ids := []string{}
	for _, m := range models.GetModels() {
		ids = append(ids, m.GetId())
	}
	emit(map[string]interface{}{"step": "models", "count": len(ids), "ids": ids})

	jobs := tuneforgev1.NewJobServiceClient(conn)
	if _, err := jobs.GetJob(ctx, &tuneforgev1.GetJobRequest{Job: "job_does_not_exist"}); err != nil {
		emit(describe("not_found", err))
	} else {
		emit(map[string]interface{}{"step": "not_found", "code": "OK"})
	}
	// A LoRA rank of 0 on a job with no base model and no dataset: one violation per field.
	spec := &tuneforgev1.JobSpec{Lora: &tuneforgev1.LoraConfig{Rank: proto.Int32(0)}}
	if _, err := jobs.CreateJob(ctx, &tuneforgev1.CreateJobRequest{Spec: spec}); err != nil {
		emit(describe("invalid", err))
	} else {
		emit(map[string]interface{}{"step": "invalid", "code": "OK"})
	}
	emit(map[string]interface{}{"step": "done"})
}
