"""DiffuseRegPipeline with a tiny randomly initialised denoiser: shapes, seeds, hooks, guidance."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusereg.callbacks import EarlyStopping, TrajectoryRecorder
from diffusereg.guidance import (
    DirectionGuidance,
    FoldGuidance,
    FunctionGuide,
    GuidanceSpec,
    OrganMaskGuidance,
    SimilarityGuidance,
    SmoothnessGuidance,
    build_guides,
)
from diffusereg.losses import gradient_loss, ssim_loss
from diffusereg.metrics import njd_percent
from diffusereg.models import DiffuseRegDenoiser
from diffusereg.pipelines import DiffuseRegPipeline
from diffusereg.models import RegistrationNet
from diffusereg.schedulers import default_scheduler, scheduler_of_kind, scheduler_prediction_type
from diffusereg.spatial import jacobian_determinant, warp
from tiny import tiny_denoiser

SIZE = 32


@pytest.fixture(scope="module")
def pipe2d() -> DiffuseRegPipeline:
    pipe = DiffuseRegPipeline(denoiser=tiny_denoiser(2), scheduler=default_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def disc(center: tuple[float, float], radius: float, size: int = SIZE) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    return (((yy - center[0]) ** 2 + (xx - center[1]) ** 2) <= radius**2).float()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    fixed = 0.2 + 0.7 * disc((16, 16), 8)
    moving = 0.2 + 0.7 * disc((18, 15), 6)
    return fixed, moving


def seed(n: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def with_scheduler(pipe: DiffuseRegPipeline, kind: str) -> DiffuseRegPipeline:
    pipe.scheduler = scheduler_of_kind(pipe.scheduler, kind)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_fields_have_the_input_layout(pipe2d, pair, scheduler):
    fixed, moving = pair
    with_scheduler(pipe2d, scheduler)
    single = pipe2d(fixed, moving, num_inference_steps=3, generator=seed())
    assert single.field.shape == (2, SIZE, SIZE) and single.warped.shape == (SIZE, SIZE)
    assert single.num_steps_run == 3 and torch.isfinite(single.field).all()

    batched = pipe2d(torch.stack([fixed] * 3)[:, None], torch.stack([moving] * 3)[:, None], num_inference_steps=2,
                     generator=seed(), output_type="np")
    assert isinstance(batched.field, np.ndarray) and batched.field.shape == (3, 2, SIZE, SIZE)
    with_scheduler(pipe2d, "ddim")


def test_2d_model_registers_a_volume_slice_by_slice(pipe2d, pair):
    fixed, moving = pair
    volume_f, volume_m = torch.stack([fixed] * 4), torch.stack([moving] * 4)
    labels = (volume_m > 0.5).long()
    out = pipe2d(volume_f, volume_m, moving_labels=labels, num_inference_steps=2, generator=seed())
    assert out.field.shape == (3, 4, SIZE, SIZE)
    assert torch.count_nonzero(out.field[0]) == 0, "a 2D model must not move anything across slices"
    assert out.warped.shape == (4, SIZE, SIZE)
    assert out.warped_labels.dtype == torch.int64 and set(out.warped_labels.unique().tolist()) <= {0, 1}


def test_3d_model_takes_the_volume_whole(pair):
    pipe = DiffuseRegPipeline(denoiser=tiny_denoiser(3), scheduler=default_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    fixed = torch.rand(SIZE, SIZE, SIZE, generator=seed(1))
    out = pipe(fixed, fixed.flip(0), num_inference_steps=1, generator=seed())
    assert out.field.shape == (3, SIZE, SIZE, SIZE)


def test_same_seed_same_field_other_seed_other_field(pipe2d, pair):
    fixed, moving = pair
    for scheduler in ("ddim", "ddpm"):
        with_scheduler(pipe2d, scheduler)
        a = pipe2d(fixed, moving, num_inference_steps=3, generator=seed(7)).field
        b = pipe2d(fixed, moving, num_inference_steps=3, generator=seed(7)).field
        c = pipe2d(fixed, moving, num_inference_steps=3, generator=seed(8)).field
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    with_scheduler(pipe2d, "ddim")


def test_callback_stops_at_step_3_of_10(pipe2d, pair):
    fixed, moving = pair
    seen = []

    def stop_after_three(pipe, step, timestep, kwargs):
        seen.append(step)
        assert set(kwargs) == {"x0", "warped"}
        assert kwargs["x0"].shape == (1, 2, SIZE, SIZE) and kwargs["warped"].shape == (1, SIZE, SIZE)
        if step == 2:
            pipe.interrupt = True
        return kwargs

    out = pipe2d(fixed, moving, num_inference_steps=10, callback_on_step_end=stop_after_three,
                 callback_on_step_end_tensor_inputs=["x0", "warped"], generator=seed())
    assert out.num_steps_run == 3
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError, match=r"callback tensor inputs \['field_t'\] unknown"):
        pipe2d(fixed, moving, callback_on_step_end=stop_after_three, callback_on_step_end_tensor_inputs=["field_t"])


def test_callback_replacing_the_estimate_changes_the_result(pipe2d, pair):
    """A volume's estimates reach the callback in the output layout, (samples, 3, D, H, W), and a
    replaced estimate at the last step is the result."""
    fixed, moving = pair
    volume_f, volume_m = torch.stack([fixed] * 3), torch.stack([moving] * 3)
    plain = pipe2d(volume_f, volume_m, num_inference_steps=4, num_samples=2, generator=seed()).field

    def push(pipe, step, timestep, kwargs):
        assert kwargs["x0"].shape == (2, 3, 3, SIZE, SIZE)
        if step == 3:
            kwargs["x0"] = kwargs["x0"] + torch.tensor([0.0, 1.0, -2.0]).reshape(1, 3, 1, 1, 1)
        return kwargs

    pushed = pipe2d(volume_f, volume_m, num_inference_steps=4, num_samples=2, callback_on_step_end=push,
                    generator=seed()).field
    assert torch.allclose(pushed - plain, torch.tensor([0.0, 1.0, -2.0]).reshape(3, 1, 1, 1).expand_as(plain),
                          atol=1e-5)


def test_image_features_are_computed_once_per_call(pipe2d, pair, monkeypatch):
    fixed, moving = pair
    calls = []
    original = pipe2d.denoiser.encode_condition
    monkeypatch.setattr(pipe2d.denoiser, "encode_condition", lambda f, m: calls.append(1) or original(f, m))
    pipe2d(fixed, moving, num_inference_steps=5, generator=seed())
    assert len(calls) == 1


def test_num_samples_gives_a_spread_map(pipe2d, pair):
    fixed, moving = pair
    out = pipe2d(fixed, moving, num_inference_steps=3, num_samples=4, generator=seed())
    assert out.sample_spread.shape == out.field.shape
    assert out.sample_spread.mean() > 0
    single = pipe2d(fixed, moving, num_inference_steps=3, generator=seed())
    assert single.sample_spread is None


def test_trajectory_recorder_has_one_entry_per_step(pipe2d, pair):
    fixed, moving = pair
    recorder = TrajectoryRecorder()
    out = pipe2d(fixed, moving, num_inference_steps=4, callback_on_step_end=recorder, generator=seed())
    assert recorder.steps == [0, 1, 2, 3]
    assert recorder.fields[0].shape == (1, 2, SIZE, SIZE) and recorder.warped[0].shape == (1, SIZE, SIZE)
    assert torch.equal(recorder.fields[-1][0], out.field)


def _guided(pipe, pair, guide, steps=4):
    fixed, moving = pair
    plain = pipe(fixed, moving, num_inference_steps=steps, generator=seed()).field
    guided = pipe(fixed, moving, num_inference_steps=steps, guidance=[guide], generator=seed()).field
    return plain[None], guided[None]


def test_smoothness_guidance_lowers_gradient_energy(pipe2d, pair):
    plain, guided = _guided(pipe2d, pair, SmoothnessGuidance(scale=0.05))
    assert gradient_loss(guided) < 0.5 * gradient_loss(plain)


def test_smoothness_guidance_damps_the_finest_pattern_below_scale_one_half_and_amplifies_it_above():
    index = torch.arange(64)
    checkerboard = ((-1.0) ** (index[:, None] + index[None, :]))[None, None].expand(1, 2, 64, 64).clone()
    image = torch.zeros(1, 1, 64, 64)

    def factor(scale: float) -> float:
        corrected = SmoothnessGuidance(scale=scale).correct(checkerboard, image, image)
        return float((corrected / checkerboard)[..., 8:-8, 8:-8].mean())

    assert abs(factor(0.25)) < 0.1 and 0 < factor(0.1) < 1 and factor(1.0) < -2.5


def test_direction_guidance_moves_the_mean_displacement_to_the_target(pipe2d, pair):
    mask = disc((16, 16), 8)
    target = torch.tensor([2.0, -1.0])
    plain, guided = _guided(pipe2d, pair, DirectionGuidance(displacement=target.tolist(), mask=mask, scale=0.3))

    def error(field):
        mean = (field[0] * mask).sum(dim=(1, 2)) / mask.sum()
        return (mean - target).norm()

    assert error(guided) < 0.5 * error(plain)


def test_organ_mask_guidance_improves_overlap_of_the_organ(pipe2d, pair):
    fixed_mask, moving_mask = disc((16, 16), 8), disc((18, 15), 6)
    plain, guided = _guided(pipe2d, pair, OrganMaskGuidance(fixed_mask, moving_mask=moving_mask, scale=0.5))

    def mismatch(field):
        return ((warp(moving_mask[None, None], field) - fixed_mask) ** 2).mean()

    assert mismatch(guided) < mismatch(plain)


def test_similarity_guidance_and_a_user_function_raise_similarity(pipe2d, pair):
    fixed, moving = pair

    def dissimilarity(field):
        return ssim_loss(warp(moving[None, None], field), fixed[None, None])

    plain, guided = _guided(pipe2d, pair, SimilarityGuidance(scale=0.5))
    assert dissimilarity(guided) < dissimilarity(plain)

    def mse(field, f, m):
        return ((warp(m, field) - f) ** 2).mean()

    plain, guided = _guided(pipe2d, pair, FunctionGuide(mse, scale=1.0))
    assert dissimilarity(guided) < dissimilarity(plain)


def test_fold_guidance_removes_every_fold_and_leaves_a_fold_free_field_as_it_is():
    torch.manual_seed(0)
    folding = 3.0 * torch.randn(2, 2, 24, 24)
    image = torch.rand(2, 1, 24, 24)
    assert (jacobian_determinant(folding) <= 0).float().mean() > 0.2
    repaired = FoldGuidance().correct(folding, image, image)
    assert not (jacobian_determinant(repaired) <= 0).any()
    smooth = 0.5 * torch.sin(torch.linspace(0, 3, 24))[None, None, :, None].expand(2, 2, 24, 24).clone()
    assert torch.equal(FoldGuidance().correct(smooth, image, image), smooth)


def test_fold_guidance_warns_when_folds_are_left_on_the_returned_field():
    torch.manual_seed(0)
    folding = 3.0 * torch.randn(2, 2, 24, 24)
    with pytest.warns(UserWarning, match=r"voxels of the returned field still fold .* max_iterations=1"):
        left = FoldGuidance(max_iterations=1).correct_output(folding)
    assert (jacobian_determinant(left, method="forward") <= 0).any()


def test_similarity_guidance_with_fold_guidance_after_it_returns_a_fold_free_field(pipe2d, pair):
    fixed, moving = pair
    folds = lambda field: int((jacobian_determinant(field[None]) <= 0).sum())  # noqa: E731
    strong = SimilarityGuidance(scale=300.0, sigma=0.0)
    plain, guided = _guided(pipe2d, pair, strong)
    assert folds(guided[0]) > 0
    repaired = pipe2d(fixed, moving, num_inference_steps=4, generator=seed(),
                      guidance=[strong, FoldGuidance()]).field
    assert folds(repaired) == 0


def test_similarity_guidance_smooths_its_gradient():
    torch.manual_seed(0)
    fixed, moving = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    field = torch.zeros(1, 2, 32, 32)

    def roughness(guide):
        step = field - guide.correct(field, fixed, moving)
        return float(gradient_loss(step) / step.pow(2).mean())

    assert roughness(SimilarityGuidance(sigma=2.0)) < 0.2 * roughness(SimilarityGuidance(sigma=0.0))


def test_guidance_specs_read_what_the_command_line_writes():
    assert GuidanceSpec.parse("similarity") == GuidanceSpec("similarity", SimilarityGuidance().scale)
    assert GuidanceSpec.parse("similarity=0.5").scale == 0.5
    for text in ("smoothness=1", "similarity=3", "folds", "organ=3:0.5"):
        assert str(GuidanceSpec.parse(text)) == text
    guides = build_guides([GuidanceSpec.parse(text) for text in ("folds", "similarity")], None)
    assert [type(guide) for guide in guides] == [SimilarityGuidance, FoldGuidance]  # folds last
    for bad in ("folds=2", "smoothness", "blur=1", "organ=x"):
        with pytest.raises(ValueError, match="guidance"):
            GuidanceSpec.parse(bad)


def test_guidance_acts_only_in_its_range(pipe2d, pair):
    fixed, moving = pair
    plain = pipe2d(fixed, moving, num_inference_steps=4, generator=seed()).field
    never = pipe2d(fixed, moving, num_inference_steps=4, generator=seed(),
                   guidance=[SmoothnessGuidance(scale=0.05, start=1.0, end=1.0)]).field
    assert torch.equal(plain, never)


def test_early_stopping_stops_once_the_estimate_settles():
    class Recorder:
        interrupt = False

    pipe = Recorder()
    stopper = EarlyStopping(tolerance=0.1, patience=2)
    estimates = [torch.full((1, 2, 4, 4), v) for v in (0.0, 1.0, 1.05, 1.08, 1.09)]
    for step, x0 in enumerate(estimates):
        stopper(pipe, step, 0, {"x0": x0})
        if pipe.interrupt:
            break
    assert stopper.stopped_at == 3
    assert stopper.changes == pytest.approx([1.0, 0.05, 0.03], rel=1e-5)


def test_early_stopping_in_the_pipeline_reports_fewer_steps(pipe2d, pair):
    fixed, moving = pair
    stopper = EarlyStopping(tolerance=1e6, patience=1)
    out = pipe2d(fixed, moving, num_inference_steps=8, callback_on_step_end=stopper, generator=seed())
    assert out.num_steps_run == 2 and stopper.stopped_at == 1


def test_recorder_and_bad_inputs(pipe2d, pair):
    fixed, moving = pair
    recorder = TrajectoryRecorder(every=2)
    pipe2d(fixed, moving, num_inference_steps=5, callback_on_step_end=[recorder], generator=seed())
    assert recorder.steps == [0, 2, 4]
    with pytest.raises(ValueError, match="same shape"):
        pipe2d(fixed, moving[:16], num_inference_steps=1)
    with pytest.raises(ValueError, match="NaN"):
        pipe2d(fixed * float("nan"), moving, num_inference_steps=1)
    with pytest.raises(ValueError, match="multiple of"):
        pipe2d(fixed[:30, :30], moving[:30, :30], num_inference_steps=1)


def _hub_cache(tmp_path: Path, saved: Path, repo_id: str) -> Path:
    """Lay out ``saved`` as huggingface_hub lays out a downloaded model repo."""
    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(saved, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return cache


@pytest.mark.slow
def test_hub_offline_load_equals_local_load(pipe2d, pair, tmp_path):
    fixed, moving = pair
    saved = tmp_path / "saved"
    pipe2d.save_pretrained(saved)
    assert (saved / "README.md").exists()
    assert list(saved.rglob("*.safetensors")) and not list(saved.rglob("*.bin"))
    local = DiffuseRegPipeline.from_pretrained(saved)
    local.set_progress_bar_config(disable=True)
    expected = local(fixed, moving, num_inference_steps=2, generator=seed()).field
    assert torch.equal(expected, pipe2d(fixed, moving, num_inference_steps=2, generator=seed()).field)

    cache = _hub_cache(tmp_path, saved, "diffusereg-test/tiny")
    np.save(tmp_path / "fixed.npy", fixed.numpy())
    np.save(tmp_path / "moving.npy", moving.numpy())
    script = (
        "import sys, numpy as np, torch\n"
        "from diffusereg import DiffuseRegPipeline\n"
        f"pipe = DiffuseRegPipeline.from_pretrained('diffusereg-test/tiny', cache_dir=r'{cache}')\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        f"f = np.load(r'{tmp_path / 'fixed.npy'}'); m = np.load(r'{tmp_path / 'moving.npy'}')\n"
        "out = pipe(f, m, num_inference_steps=2, generator=torch.Generator().manual_seed(0))\n"
        f"np.save(r'{tmp_path / 'hub_field.npy'}', out.field.numpy())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    assert np.array_equal(np.load(tmp_path / "hub_field.npy"), expected.numpy())


def _files_with_geometry(tmp_path: Path):
    """A tiny 2D pipeline and fixed/moving files (plus a label Image) on an anisotropic, oblique,
    off-origin grid of shape (D, H, W) = (6, 30, 28)."""
    import SimpleITK as sitk

    from diffusereg.io import Image, write_image

    pipe = DiffuseRegPipeline(denoiser=tiny_denoiser(2), scheduler=default_scheduler("ddim"),
                              model_spacing=(1.5, 1.5, 3.15), model_size=(32, 32, 32))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    shape = (6, 30, 28)
    direction = tuple(sitk.VersorTransform((0.0, 0.0, 1.0), 0.3).GetMatrix())
    geometry = dict(spacing=(1.6, 1.4, 8.0), origin=(-20.0, 13.5, 4.0), direction=direction)
    fixed = Image(array=rng.random(shape).astype(np.float32), **geometry)
    moving = Image(array=rng.random(shape).astype(np.float32), **geometry)
    labels = Image(array=(rng.random(shape) > 0.5).astype(np.int16), **geometry)
    write_image(fixed, tmp_path / "fixed.nii.gz")
    write_image(moving, tmp_path / "moving.mha")
    return pipe, tmp_path / "fixed.nii.gz", tmp_path / "moving.mha", labels


def test_images_with_geometry_come_back_on_the_fixed_grid(tmp_path):
    """File inputs: preprocessing to the model grid, outputs on the fixed image's own grid."""
    from diffusereg.io import read_image

    pipe, fixed, moving, labels = _files_with_geometry(tmp_path)
    out = pipe(fixed, moving, moving_labels=labels, num_inference_steps=2, generator=seed())
    assert out.field.shape == (3, 6, 30, 28)
    assert out.warped.shape == (6, 30, 28) and out.warped_labels.shape == (6, 30, 28)
    assert set(out.warped_labels.unique().tolist()) <= {0, 1}
    assert out.grid.same_as(read_image(fixed).grid)
    assert torch.count_nonzero(out.field[0]) == 0  # 2D model: nothing moves across slices


def test_fold_guidance_holds_on_the_grid_the_field_is_returned_on(pipe2d, pair, tmp_path):
    """Resampling to the fixed grid and averaging samples can fold a fold-free field; the returned one has no folds."""
    strong = SimilarityGuidance(scale=300.0, sigma=0.0)
    pipe, fixed, moving, _ = _files_with_geometry(tmp_path)
    out = pipe(fixed, moving, num_inference_steps=2, generator=seed(), guidance=[strong, FoldGuidance()])
    assert njd_percent(pipe(fixed, moving, num_inference_steps=2, generator=seed(), guidance=[strong]).field) > 0
    assert njd_percent(out.field) == 0.0 and torch.count_nonzero(out.field[0]) == 0
    mean = pipe2d(*pair, num_inference_steps=2, num_samples=3, generator=seed(), guidance=[strong, FoldGuidance()])
    assert njd_percent(mean.field[None]) == 0.0


def test_a_denoiser_predicting_the_clean_field_is_read_as_such(pair):
    """``prediction_type="sample"``: an untrained denoiser outputs 0 (its last layer starts at zero), i.e.
    a clean z-scored field of 0, so every estimate is the training mean; read as noise it would not be."""
    fixed, moving = pair
    denoiser = tiny_denoiser(2, field_mean=[0.5, -0.25], field_std=[2.0, 2.0], prediction_type="sample")
    pipe = DiffuseRegPipeline(denoiser=denoiser, scheduler=default_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    recorder = TrajectoryRecorder()
    out = pipe(fixed, moving, num_inference_steps=3, callback_on_step_end=recorder, generator=seed())
    expected = torch.tensor([0.5, -0.25]).reshape(2, 1, 1).expand(2, SIZE, SIZE)
    assert torch.equal(out.field, expected)
    assert torch.equal(recorder.fields[0][0], expected)


def test_half_precision_weights_sample_in_float32(pipe2d, pair):
    """Weights in bfloat16 (as ``from_pretrained(..., dtype=torch.bfloat16)`` gives on a GPU): the
    images and the noisy field are cast to the weights' dtype at the model, the field stays float32."""
    fixed, moving = pair
    reference = pipe2d(fixed, moving, num_inference_steps=3, generator=seed()).field
    half = DiffuseRegPipeline(denoiser=tiny_denoiser(2).to(torch.bfloat16), scheduler=default_scheduler("ddim"))
    half.set_progress_bar_config(disable=True)
    field = half(fixed, moving, num_inference_steps=3, generator=seed()).field
    assert field.dtype == torch.float32 and field.shape == reference.shape
    assert torch.allclose(field, reference, atol=0.02 * reference.abs().max().item() + 1e-6)


def test_init_field_with_low_strength_stays_at_the_given_field(pipe2d, pair):
    """strength 0.1 of 10 steps runs the last step only (t = 199 of 2000): with the untrained denoiser
    (noise prediction 0) the estimate is the given field plus its noise, std * sqrt(1 - a) / sqrt(a),
    about 0.02 * 0.32 voxels."""
    fixed, moving = pair
    start = torch.stack([torch.full((SIZE, SIZE), 0.7), torch.full((SIZE, SIZE), -0.4)])
    out = pipe2d(fixed, moving, num_inference_steps=10, init_field=start, strength=0.1, generator=seed())
    assert out.num_steps_run == 1
    assert torch.allclose(out.field, start, atol=0.05)
    half = pipe2d(fixed, moving, num_inference_steps=10, init_field=start, strength=0.5, generator=seed())
    assert half.num_steps_run == 5
    full = pipe2d(fixed, moving, num_inference_steps=10, init_field=start, strength=1.0, generator=seed())
    assert full.num_steps_run == 10 and (full.field - start).abs().mean() > 0.1  # from (almost) pure noise


def test_init_field_of_a_volume_uses_the_returned_layout(pipe2d, pair):
    fixed, moving = pair
    volume_f, volume_m = fixed.expand(3, SIZE, SIZE), moving.expand(3, SIZE, SIZE)
    start = torch.zeros(3, 3, SIZE, SIZE)
    start[1], start[2] = 0.5, -0.25  # (slice axis, H, W) channels; the slice channel must be 0 for a 2D model
    out = pipe2d(volume_f, volume_m, num_inference_steps=10, init_field=start, strength=0.1, generator=seed())
    assert out.field.shape == start.shape and torch.allclose(out.field, start, atol=0.05)
    with pytest.raises(ValueError, match=r"init_field must have the shape .*\(3, 3, 32, 32\), got \(2, 32, 32\)"):
        pipe2d(volume_f, volume_m, init_field=start[1:, 0], strength=0.5)


def test_init_field_and_strength_refuse_what_they_cannot_do(pipe2d, pair, tmp_path):
    fixed, moving = pair
    with pytest.raises(ValueError, match="strength needs an init_field"):
        pipe2d(fixed, moving, strength=0.5)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 0"):
        pipe2d(fixed, moving, init_field=torch.zeros(2, SIZE, SIZE), strength=0)
    with pytest.raises(ValueError, match="NaN"):
        pipe2d(fixed, moving, init_field=torch.full((2, SIZE, SIZE), float("nan")), strength=0.5)
    with pytest.raises(ValueError, match="init_field='teacher'.*this one has none"):
        pipe2d(fixed, moving, init_field="teacher", strength=0.5)


def tiny_teacher() -> RegistrationNet:
    torch.manual_seed(1)
    teacher = RegistrationNet(spatial_dims=2, channels=(4, 4, 4, 4), unet_out_channels=4, final_conv_channels=(4,),
                              integration_steps=0).eval()
    with torch.no_grad():  # a visible field: the last layer starts near zero
        out = teacher.voxelmorph.backbone.net[1].final_conv_out.conv
        out.bias.fill_(0.01)
    return teacher


def test_the_teacher_is_a_component_saved_and_loaded_and_a_start(pair, tmp_path):
    """``init_field="teacher"`` starts from the teacher component's field: with strength 0.1 of 10
    steps and a denoiser whose estimate stays at what it is given, the result is that field."""
    fixed, moving = pair
    pipe = DiffuseRegPipeline(denoiser=tiny_denoiser(2), scheduler=default_scheduler("ddim"), teacher=tiny_teacher())
    pipe.save_pretrained(tmp_path / "with_teacher")
    loaded = DiffuseRegPipeline.from_pretrained(tmp_path / "with_teacher")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.teacher, RegistrationNet)
    start = loaded.teacher(fixed[None, None], moving[None, None])[0]
    assert start.abs().mean() > 1e-3
    out = loaded(fixed, moving, num_inference_steps=10, init_field="teacher", strength=0.1, generator=seed())
    given = loaded(fixed, moving, num_inference_steps=10, init_field=start, strength=0.1, generator=seed())
    assert torch.equal(out.field, given.field)
    without = tmp_path / "without_teacher"
    DiffuseRegPipeline(denoiser=tiny_denoiser(2), scheduler=default_scheduler("ddim")).save_pretrained(without)
    assert DiffuseRegPipeline.from_pretrained(without).teacher is None


@pytest.mark.parametrize("model", ["diffusereg/acdc-2d", "diffusereg/acdc-2d-paper"])
def test_saved_scheduler_and_denoiser_agree_on_the_prediction_type(model):
    """A bundled model's scheduler is handed what its denoiser predicts (the clean field for a
    denoiser that refines its estimate)."""
    bundled = DiffuseRegPipeline.from_pretrained(model)
    expected = scheduler_prediction_type(bundled.denoiser.config.prediction_type)
    assert bundled.scheduler.config.prediction_type == expected
