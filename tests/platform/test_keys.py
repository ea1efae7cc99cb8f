"""Keys as people use them: the first admin key `tuneforge up` leaves for the CLI, `tuneforge keys` and
`tuneforge audit`, and canary secrets that must never be written anywhere."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, identity_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.client import TuneForgeClient, TuneForgeError
from tests.auth import make_key
from tests.platform.conftest import ORG, Seeded

runner = CliRunner()


def cli(address: str, *args: str, key: str = "", data_dir: Path | None = None,
        columns: int = 250) -> tuple[int, str]:
    env = {"TUNEFORGE_API_KEY": key, "TUNEFORGE_DATA_DIR": str(data_dir or "/nonexistent"),
           "COLUMNS": str(columns)}
    result = runner.invoke(app, [*args, "--address", address], env=env)
    return result.exit_code, result.output


def test_tuneforge_up_leaves_an_admin_key_the_cli_finds(seeded_platform: Seeded) -> None:
    data_dir = seeded_platform.platform.data_dir
    key_file = data_dir / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    code, out = cli(seeded_platform.address, "whoami", data_dir=data_dir)  # no TUNEFORGE_API_KEY
    assert code == 0, out
    assert "organization default (role admin)" in out
    # Without either, the CLI says where a key comes from.
    code, out = cli(seeded_platform.address, "datasets", "list")
    assert code == 2
    assert "UNAUTHENTICATED" in out and "TUNEFORGE_API_KEY" in out


def test_keys_create_list_revoke_through_the_cli(seeded_platform: Seeded) -> None:
    address = seeded_platform.address
    admin = make_key(address, seeded_platform.platform.data_dir, ORG, "admin")
    code, out = cli(address, "keys", "create", "ci-bot", "--role", "viewer", "--ttl-days", "400", key=admin)
    said = " ".join(out.split())  # refused by the option's name, not the request's field (ttl)
    assert code == 2 and "--ttl-days" in said and "must be between 1 hour and 365 days" in said, said
    code, out = cli(address, "keys", "create", "ci-bot", "--role", "viewer", "--ttl-days", "7", key=admin)
    assert code == 0, out
    secret = out.strip().splitlines()[-1].strip()
    assert secret.startswith("tf_") and len(secret) == 55
    code, out = cli(address, "whoami", key=secret)
    assert code == 0 and f"organization {ORG} (role viewer)" in out, out
    code, out = cli(address, "keys", "list", key=admin)
    assert code == 0 and "ci-bot" in out and secret not in out, out
    # A viewer may read but not create jobs or manage keys.
    code, out = cli(address, "keys", "list", key=secret)
    assert code == 2 and "PERMISSION_DENIED" in out, out
    code, out = cli(address, "keys", "revoke", "ci-bot", key=admin)
    assert code == 0 and "revoked" in out, out
    code, out = cli(address, "datasets", "list", key=secret)
    assert code == 2 and "UNAUTHENTICATED" in out and "revoked" in out, out
    code, out = cli(address, "audit", "--failures", key=admin)
    assert code == 0 and "ListApiKeys" in out and "PERMISSION_DENIED" in out, out
    # Naming another organization than the key's is refused by name.
    code, out = cli(address, "datasets", "list", "--org", "someone-else", key=admin)
    assert code == 2 and "PERMISSION_DENIED" in out and "organization" in out, out


def test_canary_secrets_are_stored_nowhere(seeded_platform: Seeded) -> None:
    """A new API key and import credentials appear in no file of the data dir (databases, their
    write-ahead logs, logs, objects) and in no response after the one that created the key."""
    platform = seeded_platform.platform
    address = platform.address
    admin = make_key(address, platform.data_dir, ORG, "admin")
    canary_secret_key = "CANARYsecretAccessKey" + os.urandom(8).hex()
    canary_token = "hf_CANARY" + os.urandom(8).hex()
    with TuneForgeClient(address, api_key=admin) as client:
        created = client.create_api_key("canary", identity_pb2.ROLE_MEMBER)
        canary_key = created.secret
        with TuneForgeClient(address, api_key=canary_key) as member:
            member.list_datasets()
        for source, credentials in [
            (dataset_pb2.DatasetSource(s3_uri="s3://canary-bucket/data.jsonl"),
             dataset_service_pb2.SourceCredentials(access_key_id="AKIACANARY",
                                                   secret_access_key=canary_secret_key)),
            (dataset_pb2.DatasetSource(huggingface_id="canary/dataset"),
             dataset_service_pb2.SourceCredentials(huggingface_token=canary_token)),
        ]:
            try:
                client.import_dataset(f"canary-{os.urandom(3).hex()}", source, credentials=credentials)
            except TuneForgeError as err:  # no network here: refused or failed, either way fine
                assert canary_secret_key not in str(err) and canary_token not in str(err)
        after = [client.list_api_keys(show_inactive=True), client.whoami(),
                 client.list_audit_events(page_size=1000), client.list_datasets()]
        client.revoke_api_key("canary")
    canaries = [canary_key, canary_secret_key, canary_token]
    for response in after:
        text = str(response)
        assert not [c for c in canaries if c in text], type(response)
    found = []
    for path in platform.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [(str(path), c[:12]) for c in canaries if c.encode() in data]
    assert not found, found


@pytest.mark.parametrize("header", ["Bearer", "Bearer  ", "Token abc", "bearer tf_short"])
def test_malformed_authorization_headers_are_unauthenticated(seeded_platform: Seeded, header: str) -> None:
    import grpc
    from tuneforge.v1 import api_key_service_pb2, api_key_service_pb2_grpc

    with grpc.insecure_channel(seeded_platform.address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=(("authorization", header),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_tables_print_ids_whole_on_a_narrow_terminal(seeded_platform: Seeded) -> None:
    admin = make_key(seeded_platform.address, seeded_platform.platform.data_dir, ORG, "admin")
    for command, ids in ((("datasets", "list"), seeded_platform.dataset_ids),
                         (("jobs", "list"), seeded_platform.job_ids)):
        code, out = cli(seeded_platform.address, *command, key=admin, columns=72)
        assert code == 0, out
        assert all(i in out for i in ids), out
    code, out = cli(seeded_platform.address, "keys", "list", key=admin, columns=72)
    with TuneForgeClient(seeded_platform.address, api_key=admin) as client:
        key_ids = [k.id for k in client.list_api_keys().api_keys]
    assert code == 0 and key_ids and all(i in out for i in key_ids), out


def test_every_list_command_prints_json(seeded_platform: Seeded) -> None:
    import json

    admin = make_key(seeded_platform.address, seeded_platform.platform.data_dir, ORG, "admin")
    for command, field in ((("datasets", "list"), "datasets"), (("jobs", "list"), "jobs"),
                           (("keys", "list"), "api_keys"), (("workers",), None), (("audit",), "events")):
        code, out = cli(seeded_platform.address, *command, "--json", key=admin)
        assert code == 0, (command, out)
        parsed = json.loads(out)
        assert field is None or parsed[field], (command, parsed)
