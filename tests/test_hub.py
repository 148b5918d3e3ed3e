"""A Hugging Face id resolves through huggingface_hub's real cache lookup when offline."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moerun.errors import CheckpointError
from moerun.model.checkpoint import load_checkpoint, resolve

from conftest import SMALL

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, make_checkpoint, monkeypatch) -> Path:
    """A cache as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/SHA}."""
    repo = tmp_path / "models--acme--tiny-oss"
    shutil.copytree(make_checkpoint(SMALL, "both"), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    # huggingface_hub reads these env vars once, at import: set both the env and its constants
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_id_resolves_to_cached_snapshot(hub_cache):
    path = resolve("acme/tiny-oss")
    assert path == hub_cache / "models--acme--tiny-oss" / "snapshots" / COMMIT
    ckpt = load_checkpoint("acme/tiny-oss")
    assert ckpt.layout == "hf" and ckpt.config == SMALL


def test_unknown_hub_id_is_a_clear_error(hub_cache):
    with pytest.raises(CheckpointError, match="acme/other.*not in the Hugging Face cache"):
        resolve("acme/other")
    with pytest.raises(CheckpointError, match="no such folder, and not a Hugging Face id"):
        resolve("./no/such/dir/here")


def test_cli_scores_a_hub_id(hub_cache):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "moerun.cli", "score", "--model", "acme/tiny-oss", "--tokens"]
    cmd.append("1,2")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "perplexity:" in run.stdout
