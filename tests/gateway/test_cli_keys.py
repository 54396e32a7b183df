"""``pneumo keys generate|status|rotate`` through the installed console script, as an operator
runs them: a key rotation killed with SIGKILL midway leaves every file readable and is finished by
running it again; the run is audited as an operator action."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from sqlalchemy import select

from audit.models import AuditRecord
from conf.settings import load_settings
from gateway.app import runtime_for
from storage.encryption import Keyring
from storage.filestore import FileStore
from storage.keyring import load_keyring
from tests.gateway.test_cli_first_hour import PNEUMO, run_pneumo

FILES = 150


def _config(tmp_path: Path, current: str, retired: dict[str, str]) -> Path:
    lines = [f'data_dir = "{tmp_path / "var"}"', "", "[storage.encryption]", f'key_id = "{current}"',
             f'key_file = "{tmp_path / (current + ".key")}"']
    if retired:
        lines += ["", "[storage.encryption.retired_key_files]"]
        lines += [f'"{key_id}" = "{tmp_path / (key_id + ".key")}"' for key_id in retired]
    path = tmp_path / "pneumo.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _keyring(tmp_path: Path) -> Keyring:
    keyring = load_keyring(load_settings(tmp_path / "pneumo.toml").storage.encryption)
    assert keyring is not None
    return keyring


def test_generate_status_and_a_killed_rotation_resumed(tmp_path: Path) -> None:
    for key_id in ("old", "new"):
        assert run_pneumo("keys", "generate", str(tmp_path / f"{key_id}.key"), cwd=tmp_path).returncode == 0
    again = run_pneumo("keys", "generate", str(tmp_path / "old.key"), cwd=tmp_path)
    assert again.returncode == 2 and "not overwritten" in again.stderr

    # A store written under "old" (and migrated, as `pneumo serve` leaves it).
    _config(tmp_path, "old", {})
    contents: dict[str, bytes] = {}
    with runtime_for(load_settings(tmp_path / "pneumo.toml")) as runtime:
        store = runtime.store
        for index in range(FILES):
            relative = store.relative_path("1.2.7", "1.2.7.1", f"1.2.7.1.{index}")
            contents[relative] = os.urandom(400_000)
            store.commit(store.stage_bytes(contents[relative]), relative)

    _config(tmp_path, "new", {"old": "old"})
    status = run_pneumo("keys", "status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["to_rotate"] == {"old": FILES}

    # Rotate, and SIGKILL it as soon as some files are under the new key.
    store = FileStore(tmp_path / "var" / "dicom", tmp_path / "var" / "tmp", keyring=_keyring(tmp_path))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    process = subprocess.Popen([str(PNEUMO), "keys", "rotate"], cwd=tmp_path, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while not any(store.key_id(r) == "new" for r in list(contents)[:: max(1, FILES // 30)]):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "rotation did not start"
            time.sleep(0.005)  # poll interval, bounded by the deadline
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    keys = [store.key_id(r) for r in contents]
    assert "new" in keys and "old" in keys, "the kill came too late to test an interrupted rotation"
    assert all(store.read_bytes(r) == data for r, data in contents.items())  # old or new: all readable

    resumed = run_pneumo("keys", "rotate", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["ok"] and report["scanned"] == FILES
    assert report["already_current"] == keys.count("new") and report["rotated"] == {"old": keys.count("old")}
    assert {store.key_id(r) for r in contents} == {"new"}
    assert all(store.read_bytes(r) == data for r, data in contents.items())

    with runtime_for(load_settings(tmp_path / "pneumo.toml"), migrate=False) as runtime:
        with runtime.database.read_session() as session:
            events = [r.event for r in session.execute(select(AuditRecord).order_by(AuditRecord.seq)).scalars()]
    [rotation] = [e for e in events if any(t["code"] == "KEY-ROTATE" for t in e["event_types"])]
    assert rotation["action"] == "E" and f"rotated={{'old': {keys.count('old')}}}" in rotation["outcome_description"]

    # The old key alone no longer reads the store.
    retired_only = FileStore(tmp_path / "var" / "dicom", tmp_path / "var" / "tmp",
                             keyring=Keyring("old", {"old": _keyring(tmp_path).keys["old"]}))
    assert retired_only.key_id(next(iter(contents))) == "new"


def test_rotate_without_a_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pneumo.toml").write_text(f'data_dir = "{tmp_path / "var"}"\n')
    with runtime_for(load_settings(tmp_path / "pneumo.toml")):
        pass
    result = run_pneumo("keys", "rotate", cwd=tmp_path)
    assert result.returncode == 2 and "no current key" in result.stderr
