"""Refactors keep behaviour: the same losses and transcripts as recorded before them.

``tests/data/refactor/reference.json`` was written by ``tests/refactor_reference.py`` with the
code before the architecture clean-up (issue 14), on tiny seeded checkpoints and a fixed batch.
The checkpoints are rebuilt here from their seeds; the weights they get were checked equal to
those the reference was recorded with.
"""

from __future__ import annotations

import json

import pytest

from refactor_reference import HERE, measure, write_checkpoints


def test_losses_and_transcripts_match_the_recorded_reference(tmp_path):
    reference = json.loads((HERE / "reference.json").read_text())
    write_checkpoints(tmp_path)
    current = measure(tmp_path)
    assert set(current) == set(reference)
    for decoder, expected in reference.items():
        got = current[decoder]
        for group in ("asr", "kd"):
            assert set(got[group]) == set(expected[group]), (decoder, group)
            for name, value in expected[group].items():
                assert got[group][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                    decoder, group, name)
        assert got["transcripts"] == expected["transcripts"], decoder
