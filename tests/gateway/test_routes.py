"""The route table and the transcoding rules, without a server: every RPC has a route, the routes are the
contract the console and the seeds' REST users build on, and bad input is named field by field."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from tuneforge.v1 import dataset_service_pb2, job_pb2, job_service_pb2, metrics_service_pb2

from services.gateway import openapi, transcode
from services.gateway.rules import TemplateError, all_routes, compile_template, unannotated_methods

# The contract of /tmp routes.md, as (HTTP method, path template, RPC): the console is built against it.
CONTRACT = {
    ("GET", "/v1/models", "ListBaseModels"),
    ("GET", "/v1/models/{model_id=**}:requirements", "GetModelRequirements"),
    ("GET", "/v1/hardware", "ListHardwareOptions"),
    ("POST", "/v1/jobs:estimate", "EstimateJob"),
    ("POST", "/v1/jobs:plan", "PlanJob"),
    ("POST", "/v1/hardware:validate", "ValidateHardware"),
    ("POST", "/v1/costs:estimate", "EstimateCost"),
    ("POST", "/v1/jobs", "CreateJob"),
    ("GET", "/v1/jobs", "ListJobs"),
    ("GET", "/v1/jobs/{job}", "GetJob"),
    ("POST", "/v1/jobs/{job}:cancel", "CancelJob"),
    ("DELETE", "/v1/jobs/{job}", "DeleteJob"),
    ("GET", "/v1/jobs/{job}:watch", "WatchJob"),
    ("GET", "/v1/jobs/{job}/events", "ListJobEvents"),
    ("GET", "/v1/jobs/{job}/artifacts", "GetJobArtifacts"),
    ("GET", "/v1/jobs/{job}/checkpoints", "ListCheckpoints"),
    ("GET", "/v1/jobs/{job}/evaluation", "GetJobEvaluation"),
    ("GET", "/v1/workers", "ListWorkers"),
    ("GET", "/v1/pools", "ListPools"),
    ("GET", "/v1/usage", "GetUsage"),
    ("GET", "/v1/jobs/{job_id}/metrics", "ListMetrics"),
    ("GET", "/v1/jobs/{job_id}/metrics:stream", "StreamMetrics"),
    ("GET", "/v1/jobs/{job_id}/logs:stream", "StreamLogs"),
    ("POST", "/v1/datasets:upload", "UploadDataset"),
    ("POST", "/v1/datasets:validate", "ValidateDataset"),
    ("POST", "/v1/datasets", "CreateDataset"),
    ("GET", "/v1/datasets", "ListDatasets"),
    ("GET", "/v1/datasets/{dataset}", "GetDataset"),
    ("PATCH", "/v1/datasets/{dataset}", "UpdateDataset"),
    ("DELETE", "/v1/datasets/{dataset}", "DeleteDataset"),
    ("POST", "/v1/datasets/{dataset}:split", "SplitDataset"),
    ("GET", "/v1/datasets/{dataset}/validation-report", "GetValidationReport"),
    ("GET", "/v1/caller", "GetCaller"),
    ("POST", "/v1/api-keys", "CreateApiKey"),
    ("GET", "/v1/api-keys", "ListApiKeys"),
    ("POST", "/v1/api-keys/{api_key}:revoke", "RevokeApiKey"),
    ("GET", "/v1/audit-events", "ListAuditEvents"),
    ("POST", "/v1/deployments", "CreateDeployment"),
    ("GET", "/v1/deployments", "ListDeployments"),
    ("GET", "/v1/deployments/{deployment}", "GetDeployment"),
    ("DELETE", "/v1/deployments/{deployment}", "DeleteDeployment"),
}


def test_every_rpc_has_a_route() -> None:
    """A new RPC without a google.api.http rule fails here: HTTP users and the console could not reach it."""
    assert unannotated_methods() == []


def test_the_routes_are_the_contract() -> None:
    table = {(r.http_method, r.path.template, r.method.name) for r in all_routes()}
    assert table == CONTRACT


def match(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for route in all_routes():
        variables = route.path.match(path)
        if route.http_method == method and variables is not None:
            return route.method.name, variables
    return None


def test_paths_reach_their_rpc() -> None:
    assert match("GET", "/v1/jobs/j1") == ("GetJob", {"job": "j1"})
    assert match("GET", "/v1/jobs/j1:watch") == ("WatchJob", {"job": "j1"})
    assert match("POST", "/v1/jobs/j1:cancel") == ("CancelJob", {"job": "j1"})
    assert match("POST", "/v1/jobs") == ("CreateJob", {})
    assert match("POST", "/v1/jobs:plan") == ("PlanJob", {})
    assert match("GET", "/v1/jobs/j1/metrics") == ("ListMetrics", {"job_id": "j1"})
    assert match("GET", "/v1/jobs/j1/metrics:stream") == ("StreamMetrics", {"job_id": "j1"})
    # Model ids keep their '/', encoded or not.
    assert match("GET", "/v1/models/meta-llama/Llama-3.1-8B:requirements") == \
        ("GetModelRequirements", {"model_id": "meta-llama/Llama-3.1-8B"})
    assert match("GET", "/v1/models/org%2Fmodel:requirements") == ("GetModelRequirements",
                                                                   {"model_id": "org/model"})
    assert match("GET", "/v1/datasets/a%20b") == ("GetDataset", {"dataset": "a b"})
    assert match("PUT", "/v1/jobs/j1") is None
    assert match("GET", "/v1/jobs/j1/nothing") is None


def test_templates_the_gateway_cannot_serve_are_refused() -> None:
    for bad in ("v1/jobs", "/v1/{Job}", "/v1/jobs/{job=a b}", "/v1/jo$bs"):
        with pytest.raises(TemplateError):
            compile_template(bad)
    t = compile_template("/v1/{name=projects/*/jobs/*}:run")
    assert t.verb == "run" and t.match("/v1/projects/p/jobs/j:run") == {"name": "projects/p/jobs/j"}


def bad(fn: object, *args: object, **kwargs: object) -> dict[str, str]:
    with pytest.raises(transcode.BadInput) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return dict(info.value.violations)


def test_query_parameters_fill_scalars_repeated_enums_nested_fields_and_timestamps() -> None:
    request = job_service_pb2.ListJobsRequest()
    transcode.apply_query(request, {"pageSize": ["5"], "page_token": ["t"],
                                    "states": ["JOB_STATE_QUEUED", "3"]})
    assert request.page_size == 5 and request.page_token == "t"
    assert list(request.states) == [job_pb2.JOB_STATE_QUEUED, 3]
    usage = job_service_pb2.GetUsageRequest()
    transcode.apply_query(usage, {"startTime": ["2026-01-01T00:00:00Z"],
                                  "period": ["USAGE_PERIOD_UNIT_WEEK"]})
    assert usage.start_time.seconds == 1767225600 and usage.period == job_service_pb2.USAGE_PERIOD_UNIT_WEEK
    metrics = metrics_service_pb2.StreamMetricsRequest()
    transcode.apply_query(metrics, {"follow": ["true"], "startStep": ["10"]})
    assert metrics.follow and metrics.start_step == 10
    upload = dataset_service_pb2.UploadDatasetMetadata()
    transcode.apply_query(upload, {"name": ["n"], "split.trainFraction": ["0.9"], "split.seed": ["7"],
                                   "options.maxSamples": ["12"], "minExamples": ["3"]})
    assert upload.split.train_fraction == pytest.approx(0.9) and upload.split.seed == 7
    assert upload.options.max_samples == 12 and upload.HasField("min_examples")


def test_bad_query_parameters_are_named() -> None:
    problems = bad(transcode.apply_query, job_service_pb2.ListJobsRequest(),
                   {"pageSize": ["ten"], "states": ["NOPE"], "colour": ["red"], "pageToken": ["a", "b"]})
    assert set(problems) == {"pageSize", "states", "colour", "pageToken"}
    assert "JOB_STATE_QUEUED" in problems["states"] and "unknown field" in problems["colour"]
    assert "2 times" in problems["pageToken"]
    assert "boolean" in bad(transcode.apply_query, metrics_service_pb2.StreamMetricsRequest(),
                            {"follow": ["maybe"]})["follow"]
    message = bad(transcode.apply_query, job_service_pb2.CreateJobRequest(), {"spec": ["x"]})["spec"]
    assert "give its fields as 'spec.<field>'" in message
    assert "yesterday" in bad(transcode.apply_query, job_service_pb2.GetUsageRequest(),
                              {"startTime": ["yesterday"]})["startTime"]


def test_json_bodies_accept_both_names_and_name_each_bad_field() -> None:
    request = job_service_pb2.CreateJobRequest()
    transcode.parse_json_into(request, json.dumps({"name": "n", "request_id": "r", "spec": {
        "baseModel": "m", "hyperparameters": {"learning_rate": 0.1, "epochs": 2}}}).encode())
    assert request.request_id == "r" and request.spec.hyperparameters.learning_rate == pytest.approx(0.1)
    assert request.spec.base_model == "m"
    assert "not valid JSON" in bad(transcode.parse_json_into, job_service_pb2.CreateJobRequest(),
                                   b'{"name": ')["body"]
    assert "JSON object" in bad(transcode.parse_json_into, job_service_pb2.CreateJobRequest(), b"[1]")["body"]
    problems = bad(transcode.parse_json_into, job_service_pb2.CreateJobRequest(),
                   b'{"spec": {"hyperparameters": {"lr": 1}}, "colour": 1}')
    assert set(problems) == {"spec.hyperparameters.lr", "colour"}
    assert "learningRate" in problems["spec.hyperparameters.lr"]
    assert set(bad(transcode.parse_json_into, job_service_pb2.CreateJobRequest(),
                   b'{"spec": {"method": "FINE"}}')) == {"spec.method"}
    assert set(bad(transcode.parse_json_into, job_service_pb2.ListJobsRequest(),
                   b'{"states": ["JOB_STATE_QUEUED", "NOPE"]}')) == {"states[1]"}
    wrong_type = bad(transcode.parse_json_into, job_service_pb2.CreateJobRequest(),
                     b'{"spec": {"hyperparameters": {"epochs": "many"}}}')
    assert list(wrong_type) == ["spec.hyperparameters.epochs"], wrong_type


def test_responses_are_canonical_proto_json() -> None:
    job = job_pb2.Job(id="j", state=job_pb2.JOB_STATE_RUNNING)
    job.create_time.FromJsonString("2026-01-02T03:04:05Z")
    job.progress.total_steps = 3
    out = json.loads(transcode.to_json_bytes(job_service_pb2.GetJobResponse(job=job)))
    assert out["job"]["state"] == "JOB_STATE_RUNNING" and out["job"]["createTime"] == "2026-01-02T03:04:05Z"
    assert json_format.ParseDict(out, job_service_pb2.GetJobResponse()).job == job


def test_the_committed_openapi_is_what_the_protos_generate() -> None:
    """`make openapi` regenerates it; a changed proto comment or route without it fails here."""
    committed = openapi.OUT.read_text()
    assert committed == openapi.render(openapi.load_comments()), "run `make openapi` and commit gen/openapi/"
    document = json.loads(committed)
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert operations == {name for _m, _t, name in CONTRACT}
    upload = document["paths"]["/v1/datasets:upload"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    assert {"name", "filename", "split.trainFraction"} <= {p["name"] for p in upload["parameters"]}
    watch = document["paths"]["/v1/jobs/{job}:watch"]["get"]
    assert "text/event-stream" in watch["responses"]["200"]["content"]
    assert document["paths"]["/v1/jobs/{job}"]["get"]["description"]
