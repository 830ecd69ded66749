"""observer.clockstore: the observer's learned full-load clocks on disk, read as untrusted."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcsp_hook.observer import clockstore

GPU = "GPU-14e7c949-dd20-cb2f-412c-90057271383a"


def test_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "fcsp"
    assert clockstore.save(state, {GPU: 1486.43}) == ""
    assert clockstore.load(state) == ({GPU: 1486.4}, "")
    assert [p.name for p in state.iterdir()] == [clockstore.FILE]  # no temporary left


def test_no_file_is_no_problem(tmp_path: Path) -> None:
    assert clockstore.load(tmp_path) == ({}, "")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not a JSON map"),
        ("[1486]", "not a JSON map"),
        ("{" + ",".join(f'"GPU-{i}": 1500' for i in range(65)) + "}", "not a JSON map"),
        ('{"GPU-a": 1500, "pad": "' + "x" * 20000 + '"}', "not a JSON map"),
        ('{"nvidia0": 1500}', "'nvidia0': expected a GPU UUID"),
        ('{"GPU-a": true}', "'GPU-a': expected a GPU UUID and MHz"),
        ('{"GPU-a": 99999}', "MHz from 100 to 10000"),
        ('{"GPU-a": "1500"}', "MHz from 100 to 10000"),
    ],
)
def test_a_bad_file_is_ignored_with_the_reason(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / clockstore.FILE).write_text(text)
    clocks, problem = clockstore.load(tmp_path)
    assert clocks == {}
    assert reason in problem


def test_a_failed_save_says_why(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the directory should be")
    problem = clockstore.save(tmp_path / "state", {GPU: 1500.0})
    assert problem.startswith(f"{tmp_path / 'state' / clockstore.FILE}:")
