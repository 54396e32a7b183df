from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from conf.settings import load_settings

ISSUE_SHAPE = """
data_dir = "var"
database_url = "sqlite:///var/pneumo.db"
[dicom]
ae_title = "PNEUMO"
port = 11112
[[dicom.peers]]
ae_title = "STORESCU"
host = "127.0.0.1"
port = 11113
[[dicom.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[fhir]
port = 8080
"""


def test_reads_the_documented_shape(tmp_path: Path) -> None:
    path = tmp_path / "pneumo.toml"
    path.write_text(ISSUE_SHAPE)
    settings = load_settings(path)
    assert settings.dicom.ae_title == "PNEUMO" and settings.dicom.port == 11112
    assert settings.dicom.peers[0].ae_title == "STORESCU" and settings.dicom.peers[0].port == 11113
    assert settings.dicom.destinations[0].name == "pacs"
    assert settings.fhir.port == 8080
    assert settings.effective_database_url == "sqlite:///var/pneumo.db"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pneumo.toml"
    path.write_text(ISSUE_SHAPE)
    monkeypatch.setenv("PNEUMO_DICOM__PORT", "2104")
    monkeypatch.setenv("PNEUMO_DATABASE_URL", "postgresql+psycopg://u@127.0.0.1/db")
    settings = load_settings(path)
    assert settings.dicom.port == 2104
    assert settings.dicom.ae_title == "PNEUMO"  # untouched keys still come from the file
    assert settings.effective_database_url.startswith("postgresql+psycopg://")


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None)
    assert settings.effective_database_url == "sqlite:///var/pneumo.db"
    assert settings.dicom.peers == []  # deny by default


@pytest.mark.parametrize(
    "snippet",
    [
        '[dicom]\nae_title = "WAY_TOO_LONG_AE_TITLE"',
        '[dicom]\nae_tittle = "TYPO"',
        '[[dicom.peers]]\nae_title = "A"\n[[dicom.peers]]\nae_title = "A"',
        "[dicom]\nport = 70000",
    ],
)
def test_invalid_files_fail_loudly(tmp_path: Path, snippet: str) -> None:
    path = tmp_path / "pneumo.toml"
    path.write_text(snippet)
    with pytest.raises(ValidationError):
        load_settings(path)


def test_named_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.toml")
