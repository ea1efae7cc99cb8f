"""Generated keys live in a private folder of their own, apart from anything they open."""

from __future__ import annotations

import stat
from pathlib import Path

from services.kit.keyfiles import load_or_create_key, secret_file


def test_keys_live_in_a_private_secrets_folder_and_old_files_move_in(tmp_path: Path) -> None:
    legacy = tmp_path / "credentials.key"
    legacy.write_text("old-key\n")
    path = secret_file(tmp_path, "credentials.key")
    assert path == tmp_path / "secrets" / "credentials.key"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not legacy.exists() and load_or_create_key(path, lambda: b"new") == "old-key"
    fresh = secret_file(tmp_path, "page_token.key")
    assert load_or_create_key(fresh, lambda: b"generated") == "generated"
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert load_or_create_key(fresh, lambda: b"other") == "generated"  # made once, then read back
