"""Outputs: every file goes through ``write_atomically``, and a registration whose writing fails
or is interrupted leaves no output behind (no file that looks complete, no ``metrics.json``)."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import SimpleITK as sitk

from diffusereg import io, visualize
from diffusereg import outputs as output_files
from diffusereg.data import PairFiles
from diffusereg.pipelines import load_pipeline
from diffusereg.registration import RegistrationSettings, register_pair


def every_file(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, hidden temporaries included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def labelled_argv(case: PairFiles, output: Path, model: Path) -> list[str | Path]:
    return ["register", case.fixed, case.moving, "-o", output, "--fixed-labels", case.fixed_labels,
            "--moving-labels", case.moving_labels, "--model", model, "--steps", "1"]


def test_every_output_is_written_atomically(case: PairFiles, case_model: Path, tmp_path: Path, cli,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = io.write_atomically

    def recording(path: Path, write: Callable[[Path], None], overwrite: bool = True) -> None:
        written.append(Path(path).name)
        real(path, write, overwrite)

    for module in (io, output_files, visualize):
        monkeypatch.setattr(module, "write_atomically", recording)
    output = tmp_path / "out"
    code, error = cli(*labelled_argv(case, output, case_model), "--samples", "2", "--save-trajectory")
    assert code == 0, error
    outputs = json.loads((output / "metrics.json").read_text())["outputs"]
    assert sorted(written) == sorted(outputs) == every_file(output)
    assert written[-1] == "metrics.json"


def test_interrupted_write_leaves_no_output(case: PairFiles, case_model: Path, tmp_path: Path, cli,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl+C while field.h5 is half written, in a folder holding an earlier finished registration:
    exit code 130 and an empty folder (the earlier outputs were removed before writing began)."""
    output = tmp_path / "out"
    assert cli(*labelled_argv(case, output, case_model))[0] == 0

    def interrupted(transform: sitk.Transform, path: str) -> None:
        Path(path).write_bytes(b"half a transform")
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteTransform", interrupted)
    code, error = cli(*labelled_argv(case, output, case_model))
    assert (code, error.splitlines()[-1]) == (130, "diffusereg register: interrupted")  # after the progress bar
    assert every_file(output) == []


def test_failed_write_leaves_no_output(case: PairFiles, case_model: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while jacobian.nii.gz is written (after warped, field.h5 and field.nii.gz)."""
    real = sitk.WriteImage

    def disk_full(image: sitk.Image, path: str, *args: object) -> None:
        if Path(path).name == "jacobian.nii.gz":
            Path(path).write_bytes(b"half a volume")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(image, path, *args)

    monkeypatch.setattr(sitk, "WriteImage", disk_full)
    output = tmp_path / "out"
    with pytest.raises(OSError, match="No space left on device"):
        register_pair(load_pipeline(str(case_model)), case.fixed, case.moving, output, RegistrationSettings(steps=1))
    assert every_file(output) == []


def test_itk_write_error_is_one_line_naming_the_file(case: PairFiles, case_model: Path, tmp_path: Path, cli,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SimpleITK reports a failed write (e.g. a full disk) as a multi-line RuntimeError: the command
    ends with exit code 2, one line naming the file, and no outputs."""
    real = sitk.WriteImage

    def itk_failure(image: sitk.Image, path: str, *args: object) -> None:
        if Path(path).name == "warped.nii.gz":
            raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:\n"
                               "itk::ERROR: NiftiImageIO: Could not write all the data")
        real(image, path, *args)

    monkeypatch.setattr(sitk, "WriteImage", itk_failure)
    output = tmp_path / "out"
    code, error = cli(*labelled_argv(case, output, case_model))
    message = error.strip().splitlines()[-1]
    assert code == 2
    assert "warped.nii.gz: cannot be written (itk::ERROR: NiftiImageIO: Could not write all the data)" in message
    assert not output.exists() or every_file(output) == []
