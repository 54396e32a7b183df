"""The first hour of a PACS engineer with the gateway (issue 14, items 1-6), through the real
``pneumo`` console script run from *another* working directory, a real ``pneumo serve`` and
DCMTK's ``storescu`` / ``echoscu``.

One served gateway (workers on, the bundled model) receives a CR chest radiograph (analysed: an
SR and a summary image follow) and a CT slice (stored, never analysed: not applicable), plus one
association from an AE title it does not know. Then:

1. ``--config`` works after the command name and from ``$PNEUMO_CONFIG``;
2. every command's ``--help`` says what it does, its options and an example; no ``==SUPPRESS==``;
3. read-only commands never create a store: from an empty folder they fail, naming the
   configuration and database, and leave the folder empty; with a store they name both on stderr;
4. ``pneumo instances`` shows each row's kind (image, SR, SC), outcome and reason;
5. the server logs one INFO line per association and per stored instance, UIDs only, and no
   highdicom chatter;
6. ``make install`` reinstalls only when pyproject.toml or the lock file changed, and the
   licence is declared as an SPDX string with its file (no setuptools deprecation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import build_parser
from gateway.cli_help import command_parsers
from tests.conftest import copy_with_new_uids, dcmtk, sample, wait_until
from tests.gateway.serve_process import ServeProcess, write_config

REPO = Path(__file__).resolve().parents[2]
PNEUMO = Path(sys.executable).with_name("pneumo")  # the installed console script


def run_pneumo(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``pneumo ARGS`` as an operator types it, in *cwd* (never the repository)."""
    environment = {k: v for k, v in os.environ.items() if k != "PNEUMO_CONFIG" and not k.startswith("PNEUMO_")}
    environment.update(env or {})
    return subprocess.run(
        [str(PNEUMO), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=120, check=False
    )


def log_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


@dataclass
class Served:
    server: ServeProcess
    config: Path
    elsewhere: Path  # an empty folder the commands run from
    cr_uid: str
    ct_uid: str
    cr_file: Path
    ct_file: Path

    def log(self) -> list[dict[str, Any]]:
        return log_lines(self.server.log_path.read_text())


def _instance_count(database: Path) -> int:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return int(connection.execute("SELECT count(*) FROM instance").fetchone()[0])
    finally:
        connection.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("first-hour")
    (root / "gateway").mkdir()
    config = write_config(root / "gateway" / "pneumo.toml", root / "gateway" / "var", workers=True)
    server = ServeProcess(config, root / "serve.log").start()
    try:
        import pydicom

        cr = copy_with_new_uids(sample("RG1_UNCR.dcm"), root / "in")
        ct = copy_with_new_uids(sample("CT_small.dcm"), root / "in")
        store = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port), str(cr), str(ct)],
            capture_output=True, text=True, check=False,
        )
        assert store.returncode == 0, store.stderr
        stranger = subprocess.run(
            [dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "PNEUMO", "127.0.0.1", str(server.dicom_port)],
            capture_output=True, text=True, check=False,
        )
        assert stranger.returncode != 0
        database = root / "gateway" / "var" / "pneumo.db"
        # The CR image gets an SR and a summary image (SC): four instances once the analysis is done.
        wait_until(lambda: _instance_count(database) >= 4, timeout=120, what="the SR and the summary image")
        elsewhere = root / "elsewhere"
        elsewhere.mkdir()
        yield Served(
            server, config, elsewhere, str(pydicom.dcmread(cr).SOPInstanceUID), str(pydicom.dcmread(ct).SOPInstanceUID),
            cr, ct,
        )
    finally:
        server.kill()


# -- 1. --config before or after the command, or $PNEUMO_CONFIG -------------------------------------


def test_config_after_the_command_and_from_the_environment(served: Served) -> None:
    after = run_pneumo("instances", "--json", "--config", str(served.config), cwd=served.elsewhere)
    assert after.returncode == 0, after.stderr
    from_env = run_pneumo("instances", "--json", cwd=served.elsewhere, env={"PNEUMO_CONFIG": str(served.config)})
    assert from_env.returncode == 0, from_env.stderr
    uids = {json.loads(line)["sop_instance_uid"] for line in after.stdout.splitlines()}
    assert {served.cr_uid, served.ct_uid} <= uids
    assert from_env.stdout == after.stdout
    assert list(served.elsewhere.iterdir()) == []


def test_config_is_accepted_after_every_command() -> None:
    parser = build_parser()
    for path, sub in command_parsers(parser).items():
        assert any("--config" in action.option_strings for action in sub._actions), path
    args = parser.parse_args(["--config", "a.toml", "deliveries", "list", "--config", "b.toml"])
    assert args.config == Path("b.toml")  # after the command wins
    assert parser.parse_args(["--config", "a.toml", "audit", "verify"]).config == Path("a.toml")


# -- 2. help ---------------------------------------------------------------------------------------


def test_help_lists_commands_without_the_internal_one(tmp_path: Path) -> None:
    top = run_pneumo("--help", cwd=tmp_path)
    assert top.returncode == 0
    assert "==SUPPRESS==" not in top.stdout and "acceptor" not in top.stdout
    for command in ("serve", "worker", "instances", "studies", "infer", "model", "deliveries", "fhir", "db", "audit"):
        assert f"\n    {command} " in top.stdout, command
    serve = run_pneumo("serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0
    for promise in ("DICOM", "11112", "8080", "2575", "/fhir", "--config", "PNEUMO_CONFIG", "pneumo.toml", "example"):
        assert promise in serve.stdout, promise
    assert list(tmp_path.iterdir()) == []


def test_every_command_says_what_it_does_and_shows_an_example() -> None:
    for path, sub in command_parsers(build_parser()).items():
        text = sub.format_help()
        assert sub.description and len(sub.description) > 30, path
        assert "example" in text and "pneumo " in text.split("example", 1)[1], path
        for action in sub._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS:
                assert action.help, (path, action.option_strings)


# -- 3. read-only commands never create a store ------------------------------------------------------


@pytest.mark.parametrize("command", [["instances"], ["audit", "verify"], ["deliveries", "list"], ["studies"]])
def test_read_only_command_in_the_wrong_folder_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    result = run_pneumo(*command, cwd=tmp_path)
    assert result.returncode == 2
    assert "no store" in result.stderr
    assert str(tmp_path.resolve() / "var" / "pneumo.db") in result.stderr  # the database it looked for
    assert "no pneumo.toml in" in result.stderr and "--config" in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == [], "a read-only command created files"


def test_read_only_commands_name_the_config_and_database_they_used(served: Served) -> None:
    verify = run_pneumo("audit", "verify", "--config", str(served.config), cwd=served.elsewhere)
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"] is True
    used = [line for line in log_lines(verify.stderr) if line.get("event") == "cli.store"]
    assert used == [used[0]] and used[0]["config"] == str(served.config.resolve())
    assert used[0]["database"] == f"sqlite:///{served.config.parent.resolve() / 'var' / 'pneumo.db'}"


# -- 4. what became of each instance, and why ---------------------------------------------------------


def test_instances_show_kind_outcome_and_reason(served: Served) -> None:
    listed = run_pneumo("instances", "--json", "--config", str(served.config), cwd=served.elsewhere)
    assert listed.returncode == 0, listed.stderr
    rows = {row["sop_instance_uid"]: row for row in map(json.loads, listed.stdout.splitlines())}
    cr, ct = rows[served.cr_uid], rows[served.ct_uid]
    assert (cr["kind"], cr["outcome"], cr["reason"]) == ("image", "ok", None)
    assert cr["label"] in ("PNEUMONIA", "NORMAL") and 0.0 <= cr["probability"] <= 1.0
    assert ct["kind"] == "image" and ct["job_state"] == "done"
    assert ct["outcome"] == "not-applicable" and ct["reason"]  # the rule that excluded it
    generated = [row for row in rows.values() if row["origin"] == "generated"]
    assert sorted(row["kind"] for row in generated) == ["SC", "SR"]
    assert all(row["outcome"] == "generated" for row in generated)

    table = run_pneumo("instances", "--config", str(served.config), cwd=served.elsewhere)
    assert table.returncode == 0, table.stderr
    header, *lines, total = table.stdout.splitlines()
    assert header.split()[:6] == ["SOP", "Instance", "UID", "kind", "AE", "size"] and "outcome" in header
    ct_line = next(line for line in lines if line.startswith(served.ct_uid))
    assert ct_line.split()[1] == "image" and "not-applicable" in ct_line and ct["reason"] in ct_line
    assert {line.split()[1] for line in lines} == {"image", "SR", "SC"}
    assert total == f"{len(rows)} instance(s)"


# -- 5. the server's log: one line per association and per instance ---------------------------------


def test_one_info_line_per_association_and_per_instance(served: Served) -> None:
    def _associations() -> list[dict[str, Any]]:
        lines = [line for line in served.log() if line.get("event") == "dicom.association"]
        return lines if len(lines) >= 2 else []

    associations = wait_until(_associations, what="the association lines")
    stored = next(line for line in associations if line["calling_ae"] == "STORESCU")
    assert stored["level"] == "info" and stored["called_ae"] == "PNEUMO" and stored["address"] == "127.0.0.1"
    assert (stored["result"], stored["end"], stored["instances_stored"], stored["instances_refused"]) == (
        "accepted", "released", 2, 0
    )
    rejected = next(line for line in associations if line["calling_ae"] == "STRANGER")
    assert (rejected["level"], rejected["result"], rejected["end"], rejected["instances_stored"]) == (
        "info", "rejected", "rejected", 0
    )

    instances = {line["sop_instance_uid"]: line for line in served.log() if line.get("event") == "dicom.store"}
    import pydicom

    for uid, path in ((served.cr_uid, served.cr_file), (served.ct_uid, served.ct_file)):
        line = instances[uid]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert line["level"] == "info" and line["status"] == "0x0000" and line["outcome"] == "stored"
        assert line["sop_class_uid"] == ds.SOPClassUID
        assert line["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
        assert line["size"] > 0 and line["assoc_id"] == stored["assoc_id"]
    # UIDs only: no patient data on these lines.
    ds = pydicom.dcmread(served.cr_file, stop_before_pixels=True)
    text = served.server.log_path.read_text()
    for value in (str(ds.PatientName), str(ds.PatientID)):
        if value:
            assert value not in text
    # It says which configuration and database it serves.
    (used,) = [line for line in served.log() if line.get("event") == "cli.store"]
    assert used["config"] == str(served.config.resolve()) and used["database"].endswith("/var/pneumo.db")
    # highdicom's chatter ("copy attributes of module ...") is DEBUG, not in an INFO log.
    assert not [line for line in served.log() if str(line.get("logger", "")).startswith("highdicom")]
    assert "copy attributes" not in text


# -- 6. make install / licence ---------------------------------------------------------------------------


def _make_dry_run(folder: Path) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    result = subprocess.run([make, "-n", "install"], cwd=folder, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_install_runs_only_when_dependencies_changed(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    assert "pip install" in _make_dry_run(tmp_path)  # first time: install
    stamp = tmp_path / ".venv" / ".install-stamp"
    stamp.touch()
    newer = (tmp_path / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    assert "pip install" not in _make_dry_run(tmp_path)  # nothing changed: `make run` starts at once
    os.utime(tmp_path / "constraints.txt", (newer + 10, newer + 10))
    assert "pip install" in _make_dry_run(tmp_path)  # the lock file changed


def test_licence_is_an_spdx_string_with_its_file() -> None:
    from packaging.requirements import Requirement
    from setuptools.config.pyprojecttoml import read_configuration
    from setuptools.warnings import SetuptoolsDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SetuptoolsDeprecationWarning)
        config = read_configuration(REPO / "pyproject.toml", expand=False)
    assert config["project"]["license"] == "Apache-2.0"
    for name in config["project"]["license-files"]:
        assert "Apache License" in (REPO / name).read_text()
    # PEP 639 metadata needs setuptools 77; the build backend must be at least that.
    (backend,) = [Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools")]
    assert not backend.specifier.contains("76.9") and backend.specifier.contains("77.0")


# -- the README tells what the commands do --------------------------------------------------------------


def test_readme_lists_every_command() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    for path in command_parsers(build_parser()):
        if len(path) == 1 and path[0] != "acceptor":
            assert f"`pneumo {path[0]}" in table, path
    assert "PNEUMO_CONFIG" in table and "--config" in table


@pytest.mark.postgres
def test_an_empty_postgresql_database_is_not_a_store(postgres_url: str, tmp_path: Path) -> None:
    """PostgreSQL: the server answers, but the schema holds no Pneumo tables: refused, left empty,
    and the password never printed (trust auth ignores the one given here)."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    password = url.password or "s3cret-pw"  # the test server trusts loopback: any password does
    with_password = url.set(password=password).render_as_string(hide_password=False)
    config = write_config(tmp_path / "pneumo.toml", tmp_path / "var", database_url=with_password)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_pneumo("instances", "--config", str(config), cwd=elsewhere)
    assert result.returncode == 2
    assert "no store" in result.stderr and "holds no Pneumo store" in result.stderr
    assert str(password) not in result.stderr and "***" in result.stderr
    engine = create_engine(postgres_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert list(elsewhere.iterdir()) == []
