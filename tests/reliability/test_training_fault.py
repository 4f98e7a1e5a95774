"""Training faults: a ``diffusereg train`` process killed with SIGKILL mid-way and resumed with
``--resume`` ends with the weights of a run that was never interrupted (on a CPU, bit for bit).

A tiny teacher on two ACDC patients (2D slices of 32 x 32 at 6 mm), 12 steps, a checkpoint
every 4 steps. Marked slow: three training processes (each importing torch, diffusers and
accelerate) take 40 to 80 s on two busy cores; run it with ``pytest -m slow``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 12
CONFIG = """\
data: {{spatial_dims: 2, spacing: [6.0, 6.0, 3.15], size: [32, 32, 32], acdc_root: '{acdc_root}',
       train_patients: [patient001, patient002], val_patients: [patient010], batch_size: 16}}
model: {{channels: [8, 8, 8, 8], unet_out_channels: 8, final_conv_channels: [8], integration_steps: 0}}
optim: {{lr: 1.0e-3}}
train: {{output_dir: '{output}', max_steps: {steps}, log_every: 1, checkpoint_every: 4}}
validation: {{every: 0, max_pairs: 2, batch_size: 4}}
"""


def start_training(acdc_root: Path, output: Path, *options: str) -> subprocess.Popen:
    """``diffusereg train teacher`` on the tiny config, as its own process (stderr in ``output.log``)."""
    config = output.with_suffix(".yaml")
    config.write_text(CONFIG.format(acdc_root=acdc_root, output=output, steps=STEPS))
    script = Path(sys.executable).with_name("diffusereg")
    log = output.with_suffix(".log").open("a")
    return subprocess.Popen([str(script), "train", "teacher", "--config", str(config), *options],
                            stdout=log, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Wait until ``path`` exists (fail if ``process`` ends first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended (code {process.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


def losses(output: Path) -> list[str]:
    with (output / "log.csv").open(newline="") as stream:
        return [row["loss"] for row in csv.DictReader(stream)]


@pytest.mark.slow
@pytest.mark.acdc
def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(acdc_root: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = start_training(acdc_root, straight)
    victim = start_training(acdc_root, killed)
    wait_for(killed / "checkpoints" / "checkpoint-00000004", victim)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed / "teacher").exists(), "the run finished before it was killed"

    assert start_training(acdc_root, killed, "--resume").wait(timeout=300) == 0, killed.with_suffix(".log").read_text()
    assert reference.wait(timeout=300) == 0, straight.with_suffix(".log").read_text()
    weights = Path("teacher/diffusion_pytorch_model.safetensors")
    expected, resumed = load_file(straight / weights), load_file(killed / weights)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
    assert losses(killed) == losses(straight) and len(losses(straight)) == STEPS
