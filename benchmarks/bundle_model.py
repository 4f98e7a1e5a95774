"""Bundle a trained pipeline (and its teacher) into the package as a short-named model.

Run (from the repository root):

    python benchmarks/bundle_model.py --pipeline runs/diffusion_2d/pipeline \
        --card docs/model_card_acdc_2d.md --output src/diffusereg/pretrained/acdc-2d

Writes a ``save_pretrained`` folder with the denoiser stored in float16 (``--dtype float32`` to keep
full precision), the pipeline's teacher component in ``teacher/`` (one-shot baseline, float32)
and the model card as ``README.md``. Prints the sizes and the largest difference between the
bundled (upcast) and the original denoiser weights.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from diffusereg.pipelines import DiffuseRegPipeline


def folder_mib(folder: Path) -> float:
    """Total size of the files under ``folder``, MiB."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, required=True, help="trained pipeline folder (stage 2 output)")
    parser.add_argument("--card", type=Path, required=True, help="Markdown model card")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args()

    pipe = DiffuseRegPipeline.from_pretrained(args.pipeline)
    if pipe.teacher is None:
        raise SystemExit(f"{args.pipeline}: the pipeline has no teacher component (train it with diffusereg train)")
    original = {name: tensor.clone() for name, tensor in pipe.denoiser.state_dict().items()}
    if args.output.exists():
        shutil.rmtree(args.output)
    temporary = args.output.with_name(f".{args.output.name}.tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    pipe.denoiser.to(getattr(torch, args.dtype))
    pipe.save_pretrained(temporary, model_card=args.card.read_text())
    temporary.rename(args.output)

    bundled = DiffuseRegPipeline.from_pretrained(args.output).denoiser.state_dict()
    error = max(float((bundled[name].float() - tensor.float()).abs().max()) for name, tensor in original.items())
    print(f"{args.output}: {folder_mib(args.output):.1f} MiB; denoiser {args.dtype}, "
          f"largest weight change {error:.2e}")


if __name__ == "__main__":
    main()
