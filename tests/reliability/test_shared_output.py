"""Faults under load: a full disk while writing, and two registrations into one output folder
(``docs/reliability.md``, "Under load"; the numbers are from ``benchmarks/reliability_load.py``)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusereg import io
from diffusereg.data import PairFiles
from diffusereg.outputs import LOCK_NAME, output_lock


def argv(case: PairFiles, output: Path, model: Path) -> list[str | Path]:
    return ["register", case.fixed, case.moving, "-o", output, "--model", model, "--steps", "1"]


def test_full_disk_gives_one_line_no_partial_file_no_metrics_and_untouched_inputs(
        case: PairFiles, case_model: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while metrics.json, the last file, is written (Python's own write)."""
    real = Path.write_text
    inputs = {path: path.read_bytes() for path in (case.fixed, case.moving)}

    def disk_full(self: Path, text: str, *args: object, **kwargs: object) -> int:
        if self.name == "metrics.json":
            real(self, text[:10])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    output = tmp_path / "out"
    code, error = cli(*argv(case, output, case_model))
    assert code == 2
    assert error.splitlines()[-1] == (f"diffusereg register: error: {output / 'metrics.json'}: cannot be written "
                                      "(No space left on device)")
    assert sorted(p.name for p in output.rglob("*")) == []  # no partial file, no temporary, no lock
    assert {path: path.read_bytes() for path in inputs} == inputs


def test_a_folder_in_use_is_refused_and_left_alone(case: PairFiles, case_model: Path, tmp_path: Path, cli) -> None:
    output = tmp_path / "out"
    assert cli(*argv(case, output, case_model))[0] == 0
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    with output_lock(output):
        code, error = cli(*argv(case, output, case_model))
        assert code == 2
        assert f"{output}: another registration (process {os.getpid()}) is writing into this folder" in error
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before  # lock gone, outputs kept


def test_a_lock_file_left_by_a_killed_process_does_not_block(case: PairFiles, case_model: Path, tmp_path: Path,
                                                             cli) -> None:
    """The lock is the system's (flock), released when its process dies; the file alone holds nothing."""
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_NAME).write_text("999999")
    assert cli(*argv(case, output, case_model))[0] == 0
    assert not (output / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_processes_into_one_folder_leave_one_complete_set(case: PairFiles, case_model: Path,
                                                               tmp_path: Path) -> None:
    """Started together: each either finishes or refuses with the busy message; the folder holds
    exactly the files one registration's metrics.json lists."""
    output = tmp_path / "out"
    commands = [subprocess.Popen([sys.executable, "-m", "diffusereg.cli", *map(str, argv(case, output, case_model)),
                                  "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"}) for seed in (1, 2)]
    results = [(command.wait(timeout=300), command.stderr.read()) for command in commands]
    assert any(code == 0 for code, _ in results), results
    for code, error in results:
        assert code == 0 or (code == 2 and "is writing into this folder" in error), error
    metrics = json.loads((output / "metrics.json").read_text())
    assert sorted(p.name for p in output.iterdir()) == sorted(metrics["outputs"])
