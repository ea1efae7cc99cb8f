"""`tuneforge demo` / `make demo`: the main job end to end on embedded defaults.

Builds a tiny Llama-architecture chat model and a synthetic chat dataset locally (there is no model hub
here), starts the platform, uploads the data, runs a LoRA SFT job on a CPU worker while showing its live
progress, prints where the adapter is, and stops the platform. Returns the process exit code.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.text import Text
from tuneforge.v1 import evaluation_pb2, job_pb2

from services.cli.credentials import read_admin_key
from services.cli.render import outcome, watch
from services.cli.timeline import metrics_table
from services.client import TuneForgeClient, TuneForgeError
from services.platform.supervisor import Platform, PlatformConfig


def show_evaluation(client: TuneForgeClient, job: job_pb2.Job, console: Console) -> None:
    """The evaluation after training, base against tuned on the test split, and one sample answer."""
    report = client.get_job_evaluation(job.id).evaluation
    if report.status != evaluation_pb2.EVALUATION_STATUS_SUCCEEDED:
        name = evaluation_pb2.EvaluationStatus.Name(report.status).removeprefix("EVALUATION_STATUS_")
        console.print(f"evaluation {name}: {report.message}")
        return
    verdict = "[green]improved[/green]" if report.improved else "[yellow]did not improve[/yellow]"
    console.print(f"evaluation on {report.example_count} test examples: the tuned model {verdict} on "
                  f"{report.primary_metric} (tuneforge jobs eval {job.id})")
    console.print(metrics_table(report))
    if report.samples:
        sample = report.samples[0]
        console.print(Text("sample prompt: ", style="bold") + Text(sample.prompt))
        answers = (("base answer:   ", sample.base_answer), ("tuned answer:  ", sample.tuned_answer))
        for label, answer in answers:
            shown = answer if len(answer) <= 200 else answer[:200] + " [...]"  # `jobs eval` shows it whole
            console.print(Text(label, style="bold") + Text(shown or "(empty)"))


def run_demo(data_dir: Path, *, examples: int, epochs: int, console: Console) -> int:
    from trainer_worker.tiny import build_tiny_chat_model, write_synthetic_chat_dataset

    if data_dir.exists():
        shutil.rmtree(data_dir)  # the demo's own folder: every run starts clean
    data_dir.mkdir(parents=True)
    started = time.monotonic()
    model_dir = build_tiny_chat_model(data_dir / "models" / "tiny-chat")
    dataset_file = write_synthetic_chat_dataset(data_dir / "inputs" / "chat.jsonl", examples)
    console.print(f"[bold]1/5[/bold] built a tiny chat model at {model_dir} and {examples} chat examples")

    # The model's folder is the one place on this disk the platform may read a model from.
    roots = {"TUNEFORGE_MODEL_ROOTS": str(model_dir.parent.resolve())}
    platform = Platform(PlatformConfig(data_dir=data_dir / "platform", grpc_port=0, workers=1, env=roots))
    platform.start()
    console.print(f"[bold]2/5[/bold] platform up on {platform.address} (NATS {platform.nats_url}; REST/JSON "
                  f"and web console on {platform.http_url}/)")
    try:
        # `tuneforge up` wrote the default organization's first admin key into its data dir.
        with TuneForgeClient(platform.address, api_key=read_admin_key(platform.data_dir)) as client:
            upload = client.upload_dataset(dataset_file, "demo-chat", description="synthetic chat demo",
                                           tokenizer=str(model_dir.resolve()), max_length=512,
                                           request_id=str(uuid.uuid4()))
            ds = upload.dataset
            splits = "/".join(str(s.example_count) for s in ds.splits)
            tokens = ds.statistics.tokens
            console.print(f"[bold]3/5[/bold] dataset {ds.id} READY: {ds.statistics.example_count} examples, "
                          f"splits {splits}; tokens per example {tokens.min}-{tokens.max} "
                          f"(median {tokens.median}), {tokens.train_tokens:,} training tokens per epoch")
            spec = job_pb2.JobSpec(base_model=str(model_dir.resolve()), dataset=ds.id,
                                   method=job_pb2.TRAINING_METHOD_SFT, adapter=job_pb2.ADAPTER_TYPE_LORA)
            spec.lora.rank = 16
            hp = spec.hyperparameters
            hp.epochs, hp.batch_size, hp.learning_rate, hp.logging_steps = epochs, 8, 3e-3, 2
            spec.output.merge_adapter = True
            plan = client.plan_job(spec)
            best = plan.cheapest_fit
            console.print(f"     plan: {plan.training_tokens:,} training tokens; cheapest GPU that fits: "
                          f"{best.gpu_count} x {best.gpu_type}, {best.memory_per_gpu.total / 2**30:.1f} GiB, "
                          f"{best.time.total_seconds / 60:.1f} min, ${best.cost.total_usd:.2f}")
            job = client.create_job(spec, name="demo-lora-sft", request_id=str(uuid.uuid4()))
            console.print(f"[bold]4/5[/bold] job {job.id} queued; training on a CPU worker")
            final = watch(client, job, console)
            console.print("[bold]5/5[/bold] done")
            outcome(final, console)
            if final.state != job_pb2.JOB_STATE_SUCCEEDED:
                console.print(f"worker logs: {platform.logs_dir}")
                return 1
            adapter = final.output.adapter_uri.removeprefix("file://")
            console.print(f"[green]The trained adapter is in {adapter}[/green]")
            show_evaluation(client, final, console)
            usage = final.usage
            console.print(f"usage: {usage.run_time.ToTimedelta().total_seconds():.0f} s on {usage.hardware}, "
                          f"{usage.tokens_trained:,} tokens trained, ${usage.cost_usd:.4f} at "
                          f"${usage.hourly_usd:.2f}/h (tuneforge usage, tuneforge jobs events {final.id})")
            console.print(f"done in {time.monotonic() - started:.0f} s")
            return 0
    except TuneForgeError as err:
        console.print(f"[red]demo failed[/red]: {err}")
        console.print(f"logs: {platform.logs_dir}")
        return 1
    finally:
        platform.stop()
        console.print("platform stopped")
