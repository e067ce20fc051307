"""Shared fixtures: real speech from ../shared/data (skipped with a reason where absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; a clone elsewhere (e.g. /tmp) finds the workspace copy.
_CANDIDATES = [ROOT.parent / "shared" / "data", Path("/work/shared/data")]
SHARED_DATA = Path(
    os.environ.get("ASRKD_SHARED_DATA")
    or next((c for c in _CANDIDATES if c.is_dir()), _CANDIDATES[0])
)


@pytest.fixture(autouse=True)
def _few_threads():
    # CI machines have 2 cores; keep tests from oversubscribing them.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def _shared(name: str, manifest: str = "manifest.jsonl") -> Path:
    folder = SHARED_DATA / name
    if not (folder / manifest).is_file():
        pytest.skip(
            f"real speech not found at {folder} (it ships beside the project in CI; "
            "set ASRKD_SHARED_DATA to use a copy elsewhere)"
        )
    return folder


@pytest.fixture
def ljspeech_dir() -> Path:
    return _shared("ljspeech")


@pytest.fixture
def fsdd_dir() -> Path:
    return _shared("fsdd")


@pytest.fixture
def an4_dir() -> Path:
    return _shared("an4", "manifest_train.jsonl")


@pytest.fixture
def speechocean_dir() -> Path:
    return _shared("speechocean762")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def an4_test_manifest(an4_dir: Path, folder: Path, count: int) -> tuple[Path, list[dict]]:
    """The first ``count`` lines of AN4's test manifest, with absolute audio paths, written to
    ``folder / "an4_test.jsonl"``; returns that path and the original rows."""
    rows = read_jsonl(an4_dir / "manifest_test.jsonl")[:count]
    path = folder / "an4_test.jsonl"
    path.write_text("".join(
        json.dumps({**row, "audio_filepath": str(an4_dir / row["audio_filepath"])}) + "\n"
        for row in rows))
    return path, rows


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small default corpus (24/6/6 utterances), built once per test session."""
    from asrkd.data.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, n_train=24, n_val=6, n_test=6, progress=False)
    return out
