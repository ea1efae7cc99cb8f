// The README's TypeScript example: a Connect client over gRPC (HTTP/2) with an API key, one unary call,
// one server stream, and an error's details decoded.
//
// Usage: TUNEFORGE_API_KEY=tfk_... node dist/clients/ts/src/example.js [ADDRESS] [JOB]
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { BadRequestSchema, ErrorInfoSchema } from "../../../gen/ts/google/rpc/error_details_pb.js";
import { EstimationService } from "../../../gen/ts/tuneforge/v1/estimation_service_pb.js";
import { JobState } from "../../../gen/ts/tuneforge/v1/job_pb.js";
import { JobService } from "../../../gen/ts/tuneforge/v1/job_service_pb.js";

const [address = "127.0.0.1:50051", jobName = "job_does_not_exist"] = process.argv.slice(2);

// Every call carries `authorization: Bearer <key>`.
const apiKey: Interceptor = (next) => async (request) => {
  request.header.set("authorization", `Bearer ${process.env.TUNEFORGE_API_KEY ?? ""}`);
  return next(request);
};
const transport = createGrpcTransport({ baseUrl: `http://${address}`, interceptors: [apiKey] });
const estimation = createClient(EstimationService, transport);
const jobs = createClient(JobService, transport);

const { models } = await estimation.listBaseModels({ pageSize: 10 });
console.log(JSON.stringify({ models: models.map((m) => m.id) }));

try {
  // WatchJob: the job after each change, ending when the job does.
  for await (const { job } of jobs.watchJob({ job: jobName })) {
    console.log(JSON.stringify({ job: job?.id, state: JobState[job?.state ?? 0] }));
  }
} catch (err) {
  const error = ConnectError.from(err);
  const [info] = error.findDetails(ErrorInfoSchema); // reason: an ErrorReason name, e.g. "NOT_FOUND"
  const violations = error.findDetails(BadRequestSchema).flatMap((b) => b.fieldViolations);
  console.log(JSON.stringify({
    code: Code[error.code],
    reason: info?.reason,
    domain: info?.domain,
    violations: violations.map((v) => v.field),
  }));
}
