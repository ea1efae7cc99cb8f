// Drives a running TuneForge through the generated TypeScript client (gen/ts) over gRPC, the way a Node
// caller would: lists the base models, uploads a dataset by client streaming, creates a LoRA job, follows
// WatchJob and StreamMetrics until the job ends, and sends a bad request to decode its ErrorInfo and
// BadRequest. Prints one JSON object a line (tests/clients/test_typescript.py reads them).
//
// Usage: node dist/clients/ts/src/e2e.js ADDRESS MODEL DATASET_FILE   (API key in TUNEFORGE_API_KEY)
import { createHash, randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import { basename } from "node:path";

import { create, type DescEnum, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { BadRequestSchema, ErrorInfoSchema } from "../../../gen/ts/google/rpc/error_details_pb.js";
import { DatasetService, type UploadDatasetRequestSchema } from "../../../gen/ts/tuneforge/v1/dataset_service_pb.js";
import { DatasetStateSchema } from "../../../gen/ts/tuneforge/v1/dataset_pb.js";
import { EstimationService } from "../../../gen/ts/tuneforge/v1/estimation_service_pb.js";
import { type JobSpec, JobSpecSchema, JobState, JobStateSchema, LoraConfigSchema } from "../../../gen/ts/tuneforge/v1/job_pb.js";
import { JobService } from "../../../gen/ts/tuneforge/v1/job_service_pb.js";
import { MetricKind } from "../../../gen/ts/tuneforge/v1/metrics_pb.js";
import { MetricsService } from "../../../gen/ts/tuneforge/v1/metrics_service_pb.js";

const CHUNK_BYTES = 1024 * 1024;
type UploadRequest = MessageInitShape<typeof UploadDatasetRequestSchema>;
const FINAL = new Set([JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]);

function emit(record: Record<string, unknown>): void {
  console.log(JSON.stringify(record, (_key, value) => (typeof value === "bigint" ? Number(value) : value)));
}

/** The proto name of an enum value ("JOB_STATE_SUCCEEDED"): the TypeScript enums drop the prefix. */
function enumName(schema: DescEnum, value: number): string {
  return schema.values.find((v) => v.number === value)?.name ?? String(value);
}

/** Every call carries the API key, as `authorization: Bearer <key>`. */
function apiKey(key: string): Interceptor {
  return (next) => async (request) => {
    request.header.set("authorization", `Bearer ${key}`);
    return next(request);
  };
}

/** UploadDataset's requests: the metadata first, then the file's bytes a chunk at a time. */
async function* uploadRequests(path: string, name: string): AsyncGenerator<UploadRequest> {
  const data = await readFile(path);
  yield {
    payload: {
      case: "metadata",
      value: {
        name,
        filename: basename(path),
        sizeBytes: BigInt(data.length),
        sha256: createHash("sha256").update(data).digest("hex"),
        requestId: randomUUID(),
      },
    },
  };
  for (let offset = 0; offset < data.length; offset += CHUNK_BYTES) {
    yield { payload: { case: "chunk", value: data.subarray(offset, offset + CHUNK_BYTES) } };
  }
}

function loraSpec(model: string, dataset: string): JobSpec {
  return create(JobSpecSchema, {
    baseModel: model,
    dataset,
    hyperparameters: { epochs: 1, maxSteps: 6, batchSize: 8, learningRate: 3e-3, loggingSteps: 1, maxSeqLength: 256 },
  });
}

async function main(): Promise<void> {
  const [address, model, datasetFile] = process.argv.slice(2);
  const key = process.env.TUNEFORGE_API_KEY ?? "";
  if (!address || !model || !datasetFile || !key) {
    throw new Error("usage: e2e.js ADDRESS MODEL DATASET_FILE, with TUNEFORGE_API_KEY set");
  }
  const transport = createGrpcTransport({ baseUrl: `http://${address}`, interceptors: [apiKey(key)] });
  const estimation = createClient(EstimationService, transport);
  const datasets = createClient(DatasetService, transport);
  const jobs = createClient(JobService, transport);
  const metrics = createClient(MetricsService, transport);

  const models = await estimation.listBaseModels({ pageSize: 100 });
  emit({ step: "models", count: models.models.length, ids: models.models.map((m) => m.id) });

  // Client streaming: the metadata first, then the file's bytes.
  const uploaded = await datasets.uploadDataset(uploadRequests(datasetFile, `ts-${randomUUID().slice(0, 8)}`));
  const dataset = uploaded.dataset!;
  emit({
    step: "upload",
    id: dataset.id,
    state: enumName(DatasetStateSchema, dataset.state),
    examples: dataset.splits.reduce((sum, split) => sum + split.exampleCount, 0n),
  });

  const { job } = await jobs.createJob({ spec: loraSpec(model, dataset.id), requestId: randomUUID() });
  emit({ step: "create_job", id: job!.id, state: enumName(JobStateSchema, job!.state) });

  // Both streams end by themselves when the job reaches a final state.
  const watch = (async () => {
    const states: string[] = [];
    let last = JobState.UNSPECIFIED;
    for await (const response of jobs.watchJob({ job: job!.id }, { timeoutMs: 600_000 })) {
      const name = enumName(JobStateSchema, response.job!.state);
      if (states[states.length - 1] !== name) states.push(name);
      last = response.job!.state;
    }
    return { states, final: last };
  })();
  const follow = (async () => {
    const points: { step: bigint; loss?: number }[] = [];
    const request = { jobId: job!.id, follow: true, batch: true, kinds: [MetricKind.TRAIN] };
    for await (const response of metrics.streamMetrics(request, { timeoutMs: 600_000 })) {
      for (const point of response.points) points.push({ step: point.step, loss: point.loss });
    }
    return points;
  })();
  const [watched, points] = await Promise.all([watch, follow]);
  emit({ step: "watch", states: watched.states, final: enumName(JobStateSchema, watched.final),
    ended: FINAL.has(watched.final) });
  emit({ step: "metrics", count: points.length, steps: points.map((p) => p.step),
    losses: points.map((p) => p.loss ?? null) });

  // A bad request: LoRA rank 0. The status carries ErrorInfo and BadRequest in its details.
  const bad = loraSpec(model, dataset.id);
  bad.lora = create(LoraConfigSchema, { rank: 0 });
  try {
    await jobs.createJob({ spec: bad });
    emit({ step: "error", code: "OK" });
  } catch (err) {
    const error = ConnectError.from(err);
    const [info] = error.findDetails(ErrorInfoSchema);
    const violations = error.findDetails(BadRequestSchema).flatMap((b) => b.fieldViolations);
    emit({
      step: "error",
      code: Code[error.code],
      message: error.rawMessage,
      reason: info?.reason,
      domain: info?.domain,
      violations: violations.map((v) => ({ field: v.field, description: v.description })),
    });
  }
  emit({ step: "done" });
}

main().catch((err: unknown) => {
  const error = ConnectError.from(err);
  emit({ step: "failed", code: Code[error.code], message: error.rawMessage });
  process.exitCode = 1;
});
