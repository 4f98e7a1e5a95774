"""Start sampling from the one-shot teacher's field instead of noise: two registrations compared.

Run:  python examples/start_from_teacher.py [--model diffusereg/acdc-2d]

Registers the end-systole phase of the built-in cardiac phantom to its end-diastole phase with the
shipped model (offline), two ways, and prints Dice (LV, Myo, RV, Overall) and folding for each:
1. from noise, 10 DDIM steps (the paper's sampling);
2. from the bundled teacher's field, strength 0.2 (the last 2 of the 10 steps).
The teacher runs on the preprocessed (model-grid) images: ``init_field`` is given as a function.
Guidance and callbacks work on the steps that run, as from noise. Printed on the project's CPU:
Overall 56.3 (no registration), 86.3 (from noise), 91.8 (from the teacher); NJD 0.090 / 0.033 %.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffusereg import DiffuseRegPipeline
from diffusereg.evaluation import teacher_registrar
from diffusereg.metrics import njd_percent
from diffusereg.phantom import cardiac_phantom
from diffusereg.metrics import structure_dice
from diffusereg.registration import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="diffusereg/acdc-2d", help="a model with a one-shot teacher (MODEL/teacher)")
    args = parser.parse_args()

    pipe = DiffuseRegPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    one_shot = teacher_registrar(load_teacher(args.model))
    phantom = cardiac_phantom(seed=0)

    def teacher_field(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        return one_shot(np.asarray(fixed), np.asarray(moving)).field

    runs = {
        "from noise, 10 steps": {},
        "from the teacher, strength 0.2": {"init_field": teacher_field, "strength": 0.2},
    }
    before = structure_dice(phantom.es_labels.array, phantom.ed_labels.array)
    print(f"{'':34s}{'LV':>7}{'Myo':>7}{'RV':>7}{'Overall':>9}{'NJD %':>8}{'steps':>7}")
    print(f"{'no registration':34s}" + "".join(f"{100 * before[k]:7.1f}" for k in ("LV", "Myo", "RV"))
          + f"{100 * before['Overall']:9.1f}")
    for name, options in runs.items():
        out = pipe(phantom.ed, phantom.es, moving_labels=phantom.es_labels, num_inference_steps=10,
                   generator=torch.Generator().manual_seed(0), output_type="np", **options)
        after = structure_dice(out.warped_labels, phantom.ed_labels.array)
        print(f"{name:34s}" + "".join(f"{100 * after[k]:7.1f}" for k in ("LV", "Myo", "RV"))
              + f"{100 * after['Overall']:9.1f}{njd_percent(out.field):8.3f}{out.num_steps_run:7d}")


if __name__ == "__main__":
    main()
