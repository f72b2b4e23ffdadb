"""The benchmark scripts still run against the library they measure (they are not imported by it,
so nothing else would notice when an interface they use changes)."""

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py"))


def _run(script: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")


def test_the_benchmark_folder_is_found():
    assert "compare.py" in SCRIPTS and "batches.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_parses_its_options(script, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(script, "--help", monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.slow
def test_batch_preparation_benchmark_runs(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("batches.py", "--workers", "0", "--batches", "1", "--batch-size", "2", monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "0 workers:" in out and "patches/s" in out
