"""`tuneforge chat JOB` and `tuneforge deployments create|list|get|delete` (DeploymentService, and the
OpenAI-compatible endpoint of EMBEDDED deployments through the `openai` client)."""

from __future__ import annotations

import sys
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from tuneforge.v1 import deployment_service_pb2 as dpb

from services.cli.render import as_json, enum_name, whole_ids

if TYPE_CHECKING:
    from services.client import TuneForgeClient

deployments_app = typer.Typer(help="Create, list, inspect and delete deployments (served models).",
                              no_args_is_help=True)
Address = Annotated[str, typer.Option("--address", envvar="TUNEFORGE_ADDRESS",
                                      help="gRPC address of the platform.")]
Org = Annotated[str, typer.Option("--org", envvar="TUNEFORGE_ORGANIZATION",
                                  help="Organization (default: the API key's; another is refused).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print as JSON.")]
DEFAULT_ADDRESS = "127.0.0.1:50051"
EXIT_COMMANDS = {"/exit", "/quit"}


def state(deployment: dpb.Deployment) -> str:
    return enum_name(dpb.DeploymentState, deployment.state, "DEPLOYMENT_STATE_")


def target(deployment: dpb.Deployment) -> str:
    return enum_name(dpb.DeploymentTarget, deployment.target, "DEPLOYMENT_TARGET_")


def deployment_table(deployments: list[dpb.Deployment]) -> Table:
    table = Table("ID", "NAME", "JOB", "TARGET", "STATE", "ENDPOINT", "CREATED")
    for d in deployments:
        table.add_row(d.id, escape(d.name), d.job, target(d) + (" (merged)" if d.merged else ""), state(d),
                      escape(d.endpoint) or "-", d.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"))
    return whole_ids(table)


def reuse_or_create(client: TuneForgeClient, job: str) -> dpb.Deployment:
    """The job's EMBEDDED adapter deployment that is READY or loading, else a new one."""
    token = ""
    while True:
        page = client.list_deployments(page_size=100, page_token=token, job=job)
        for d in page.deployments:
            if d.target == dpb.DEPLOYMENT_TARGET_EMBEDDED and not d.merged and d.state in (
                    dpb.DEPLOYMENT_STATE_READY, dpb.DEPLOYMENT_STATE_PENDING):
                return d
        token = page.next_page_token
        if not token:
            break
    return client.create_deployment(job, request_id=str(uuid.uuid4()))


def wait_ready(client: TuneForgeClient, deployment: dpb.Deployment, timeout_s: float) -> dpb.Deployment:
    deadline = time.monotonic() + timeout_s
    while deployment.state == dpb.DEPLOYMENT_STATE_PENDING and time.monotonic() < deadline:
        time.sleep(0.5)
        deployment = client.get_deployment(deployment.id)
    return deployment


def stream_answer(ai: Any, model: str, messages: list[dict[str, str]], max_tokens: int,
                  temperature: float) -> str:
    """Streams one answer to stdout as it is generated; returns it."""
    parts = []
    for chunk in ai.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                            temperature=temperature, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text = chunk.choices[0].delta.content
            parts.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def register(app: typer.Typer) -> None:
    """Adds `chat` and `deployments` to the CLI (services.cli.main)."""
    app.add_typer(deployments_app, name="deployments")

    @app.command("chat")
    def chat(
        job: Annotated[str, typer.Argument(help="The SUCCEEDED job whose model to chat with (id or name).")],
        message: Annotated[str, typer.Option("--message", "-m",
                                             help="Send this one message, print the answer and exit.")] = "",
        system: Annotated[str, typer.Option("--system", help="A system message first.")] = "",
        max_tokens: Annotated[int, typer.Option("--max-tokens", min=1,
                                                help="Tokens per answer, at most.")] = 256,
        temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="0: greedy.")] = 0.0,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the model to load.")] = 600.0,
        address: Address = DEFAULT_ADDRESS, org: Org = "",
    ) -> None:
        """Chat with a job's model: reuses the job's EMBEDDED deployment (or creates one), waits until it
        is READY, then streams answers. Type /exit (or Ctrl-D) to leave."""
        import openai

        from services.cli.credentials import api_key
        from services.cli.main import api, err_console

        with api(address, org) as client:
            deployment = reuse_or_create(client, job)
            if deployment.state == dpb.DEPLOYMENT_STATE_PENDING:
                err_console.print(f"loading the model of job {escape(job)} (deployment {deployment.name})…",
                                  highlight=False)
            deployment = wait_ready(client, deployment, timeout)
        if deployment.state != dpb.DEPLOYMENT_STATE_READY:
            why = deployment.error.message or f"still {state(deployment)} after {timeout:g} s"
            err_console.print(f"[red]error[/red] deployment {escape(deployment.name)}: {escape(why)}",
                              highlight=False)
            raise typer.Exit(1)
        ai = openai.OpenAI(base_url=deployment.endpoint, api_key=api_key() or "none", max_retries=1)
        messages = [{"role": "system", "content": system}] if system else []
        try:
            if message:
                stream_answer(ai, deployment.model, [*messages, {"role": "user", "content": message}],
                              max_tokens, temperature)
                return
            err_console.print(f"chatting with {escape(deployment.model)} at {escape(deployment.endpoint)} "
                              "(/exit to leave)", highlight=False)
            while True:
                try:
                    line = input("> ")
                except EOFError:
                    break
                if line.strip() in EXIT_COMMANDS:
                    break
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line})
                messages.append({"role": "assistant",
                                 "content": stream_answer(ai, deployment.model, messages, max_tokens,
                                                          temperature)})
        except openai.APIError as exc:
            err_console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None

    @deployments_app.command("create")
    def deployments_create(
        job: Annotated[str, typer.Argument(help="The SUCCEEDED job whose model to serve (id or name).")],
        name: Annotated[str, typer.Option(
            help="The deployment's name, which requests send as `model` (unique within the organization; "
            "default: made from its id).")] = "",
        merged: Annotated[bool, typer.Option(
            help="Serve the merged model, not the adapter on its base.")] = False,
        wait: Annotated[bool, typer.Option(help="Wait until it is READY (or FAILED).")] = True,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the model to load.")] = 600.0,
        request_id: Annotated[str, typer.Option(
            help="Idempotency key: a retry with the same one returns the deployment made the first time "
            "(default: a new one).")] = "",
        address: Address = DEFAULT_ADDRESS, org: Org = "", json_out: AsJson = False,
    ) -> None:
        """Serve a job's model on the OpenAI-compatible endpoint (an EMBEDDED deployment); exits 1 when it
        does not turn READY."""
        from services.cli.main import api, console, err_console

        with api(address, org) as client:
            d = client.create_deployment(job, name=name, merged=merged,
                                         request_id=request_id or str(uuid.uuid4()))
            if wait:
                if d.state == dpb.DEPLOYMENT_STATE_PENDING and not json_out:
                    err_console.print(f"loading the model of job {escape(job)} (deployment "
                                      f"{escape(d.name)})…", highlight=False)
                d = wait_ready(client, d, timeout)
        if json_out:
            console.print_json(as_json(d))
        else:
            console.print(deployment_table([d]))
            if d.state == dpb.DEPLOYMENT_STATE_READY:
                console.print(f"model {escape(d.model)} at {escape(d.endpoint)}", highlight=False)
        if wait and d.state != dpb.DEPLOYMENT_STATE_READY:
            why = d.error.message or f"still {state(d)} after {timeout:g} s"
            err_console.print(f"[red]error[/red] deployment {escape(d.name)}: {escape(why)}", highlight=False)
            raise typer.Exit(1)

    @deployments_app.command("list")
    def deployments_list(
        job: Annotated[str, typer.Option(help="Only deployments of this job (id or name).")] = "",
        page_size: Annotated[int, typer.Option()] = 50,
        page_token: Annotated[str, typer.Option()] = "",
        address: Address = DEFAULT_ADDRESS, org: Org = "", json_out: AsJson = False,
    ) -> None:
        """The organization's deployments, newest first."""
        from services.cli.main import api, console

        with api(address, org) as client:
            response = client.list_deployments(page_size, page_token, job=job)
        if json_out:
            console.print_json(as_json(response))
            return
        console.print(deployment_table(list(response.deployments)))
        if response.next_page_token:
            console.print(f"next page: --page-token {response.next_page_token}")

    @deployments_app.command("get")
    def deployments_get(
        ref: Annotated[str, typer.Argument(help="Deployment id or name.")],
        address: Address = DEFAULT_ADDRESS, org: Org = "", json_out: AsJson = False,
    ) -> None:
        """One deployment: its state, endpoint, self-check and (VLLM) manifest."""
        from services.cli.main import api, console

        with api(address, org) as client:
            d = client.get_deployment(ref)
        if json_out:
            console.print_json(as_json(d))
            return
        console.print(deployment_table([d]))
        if d.HasField("check"):
            c = d.check
            console.print(f"self-check: loaded={c.loaded} generated={c.generated} stopped_at_end_of_turn="
                          f"{c.stopped_at_end_of_turn} ({escape(c.end_of_turn_token)})\n"
                          f"  prompt: {escape(c.prompt)}\n  answer: {escape(c.answer)}", highlight=False)
        if d.error.message:
            console.print(f"[red]error[/red] {escape(d.error.message)}", highlight=False)
        if d.manifest:
            console.print("manifest (kubectl apply -f -):")
            console.print(d.manifest, markup=False, highlight=False)

    @deployments_app.command("delete")
    def deployments_delete(
        ref: Annotated[str, typer.Argument(help="Deployment id or name.")],
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
        address: Address = DEFAULT_ADDRESS, org: Org = "",
    ) -> None:
        """Stop serving and forget the deployment (deleting a deleted one succeeds)."""
        from services.cli.main import api, console

        if not yes and not typer.confirm(f"Stop serving deployment {ref} and delete it?"):
            raise typer.Exit(1)
        with api(address, org) as client:
            response = client.delete_deployment(ref)
        console.print(f"deployment {response.deployment} "
                      f"{'was already deleted' if response.already_deleted else 'deleted'}")
