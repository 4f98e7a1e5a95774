"""diffusereg.data: paper preprocessing and its inverse, ACDC and paired-list datasets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusereg.data import (
    ACDC_VALIDATION_PATIENTS,
    ACDCDataset,
    PairedDataset,
    PaperPreprocessing,
    resample_to_grid,
    scale_intensities,
)
from diffusereg.io import Image, read_image, write_image

from test_io import oblique_direction


def smooth_image(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Image:
    """A smooth positive image (a broad Gaussian bump plus a ramp) on an oblique grid."""
    ndim = len(shape)
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    bump = np.exp(-sum((1.5 * a) ** 2 for a in axes)) + 0.3 * axes[-1] + 1.0
    return Image(bump.astype(np.float32), spacing, (4.0, -7.0, 11.0)[:ndim], oblique_direction(ndim))


def label_image(image: Image) -> Image:
    """Labels 0..3 in concentric shells of the smooth image."""
    return image.with_array(np.digitize(image.array, [1.2, 1.5, 1.8]).astype(np.uint8))


def test_scale_intensities_matches_paper_steps() -> None:
    x = np.random.default_rng(0).normal(5.0, 3.0, size=(4, 5, 6)).astype(np.float32)
    expected = x - x.min()
    expected /= expected.std()
    expected -= expected.min()
    expected /= expected.max()
    scaled = scale_intensities(x)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, expected, atol=1e-6)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    np.testing.assert_array_equal(scale_intensities(np.full((3, 3), 7.0)), np.zeros((3, 3)))


@pytest.mark.parametrize("ndim", [3, 2])
def test_preprocessing_round_trip_padded(ndim: int) -> None:
    """An image smaller than the model grid: every original voxel is covered, so the inverse
    recovers the geometry exactly and the (affinely scaled) image to interpolation accuracy."""
    shape, spacing = ((12, 60, 50), (1.2, 1.1, 6.0)) if ndim == 3 else ((60, 50), (1.2, 1.1))
    fixed = smooth_image(shape, spacing)
    pair = PaperPreprocessing()(fixed, fixed, label_image(fixed), label_image(fixed))
    grid = pair.grid
    assert pair.fixed.shape == grid.model.shape == (32, 128, 128)[-ndim:]
    assert pair.fixed.dtype == np.float32 and pair.fixed.min() == 0.0 and pair.fixed.max() == 1.0
    assert grid.model.spacing == (1.5, 1.5, 3.15)[:ndim]
    assert grid.model.direction == fixed.direction
    np.testing.assert_array_equal(pair.fixed, pair.moving)
    assert set(np.unique(pair.fixed_labels)) <= {0, 1, 2, 3}

    back = grid.image_to_original(pair.fixed)
    assert back.same_geometry(fixed, atol=0.0)
    interior = tuple(slice(1, n - 1) for n in shape)
    original, recovered = fixed.array[interior].ravel(), back.array[interior].ravel()
    slope, intercept = np.polyfit(original, recovered, 1)  # undo the affine intensity scaling
    assert np.abs(slope * original + intercept - recovered).max() < 0.02

    labels_back = grid.image_to_original(pair.fixed_labels, "nearest")
    assert labels_back.array.dtype == np.uint8
    assert np.mean(labels_back.array == label_image(fixed).array) > 0.97


def test_model_grid_is_the_cropped_resampled_grid() -> None:
    """An image larger than the model grid: the model grid's origin shift (oblique direction)
    matches the crop of the resampled arrays."""
    fixed = smooth_image((40, 150, 140), (1.0, 1.2, 2.0))
    preprocessing = PaperPreprocessing()
    grid = preprocessing.model_grid(fixed.grid)
    assert grid.resampled.shape == (25, 120, 93)
    assert grid.start == (-3, -4, -17)  # padded along every axis here
    big = smooth_image((20, 300, 280), (0.8, 0.9, 5.0))
    grid = preprocessing.model_grid(big.grid)
    assert all(s >= 0 for s in grid.start[1:])
    whole = resample_to_grid(big, grid.resampled, "linear")
    on_model = resample_to_grid(big, grid.model, "linear")
    depth = grid.data_region[0]
    cropped = whole[tuple(slice(s + r.start, s + r.stop) for s, r in zip(grid.start, grid.data_region))]
    np.testing.assert_allclose(on_model[depth], cropped, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_field_to_original_constant_field(axis: int) -> None:
    """k model voxels along array axis i become k * model_spacing_i / original_spacing_i original
    voxels where the model grid covers the original grid, and 0 where the crop cut it away."""
    fixed = smooth_image((20, 300, 280), (0.8, 0.9, 5.0))
    grid = PaperPreprocessing().model_grid(fixed.grid)
    field = np.zeros((3, *grid.model.shape), np.float32)
    field[axis] = 2.5
    original_field = grid.field_to_original(field)
    assert original_field.shape == (3, 20, 300, 280)
    covered = grid.image_to_original(np.ones(grid.model.shape, np.uint8), "nearest").array == 1
    assert 0 < covered.mean() < 1
    expected = 2.5 * grid.model.axis_spacing[axis] / fixed.axis_spacing[axis]
    np.testing.assert_allclose(original_field[axis][covered], expected, rtol=1e-6)
    np.testing.assert_array_equal(original_field[axis][~covered], 0.0)
    np.testing.assert_array_equal(np.delete(original_field, axis, axis=0), 0.0)


def test_preprocessing_resamples_moving_onto_fixed_grid() -> None:
    fixed = smooth_image((12, 60, 50), (1.2, 1.1, 6.0))
    moving = Image(fixed.array, fixed.spacing, tuple(np.add(fixed.origin, 3.0)), fixed.direction)
    pair = PaperPreprocessing()(fixed, moving)
    assert pair.fixed_labels is None and pair.moving_labels is None
    assert pair.moving.shape == pair.fixed.shape
    assert not np.array_equal(pair.moving, pair.fixed)
    with pytest.raises(ValueError, match="2D"):
        PaperPreprocessing()(fixed, Image(fixed.array[0], fixed.spacing[:2], fixed.origin[:2], (1.0, 0.0, 0.0, 1.0)))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_thin_volumes_resample_the_same_finite_values_every_time(depth: int) -> None:
    """B-spline on an axis of 2 samples returned other values on every call (issue 32); thin
    images are resampled linearly, so repeats agree and stay within the input's range."""
    rng = np.random.default_rng(0)
    image = Image(rng.random((depth, 16, 16)).astype(np.float32), (12.0, 12.0, 20.0), (0.0, 0.0, 0.0),
                  (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    grid = PaperPreprocessing().model_grid(image.grid).resampled
    first, second = (resample_to_grid(image, grid, "bspline") for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all()
    if depth < 4:  # linear: no overshoot beyond the input's values
        assert first.min() >= 0.0 and first.max() <= image.array.max()
        np.testing.assert_array_equal(first, resample_to_grid(image, grid, "linear"))


def write_pair_files(folder: Path, shape: tuple[int, ...], spacing: tuple[float, ...]) -> dict[str, str]:
    fixed = smooth_image(shape, spacing)
    moving = fixed.with_array(np.roll(fixed.array, 2, axis=-1))
    images = {
        "fixed": fixed,
        "moving": moving,
        "fixed_labels": label_image(fixed),
        "moving_labels": label_image(moving),
    }
    for key, image in images.items():
        write_image(image, folder / f"{key}.nii.gz")
    return {key: f"{key}.nii.gz" for key in images}


def test_paired_dataset_csv_and_json(tmp_path: Path) -> None:
    (tmp_path / "case").mkdir()
    names = write_pair_files(tmp_path / "case", (12, 60, 50), (1.2, 1.1, 6.0))
    row = {key: f"case/{name}" for key, name in names.items()}
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("fixed,moving,fixed_labels,moving_labels\n" + ",".join(row.values()) + "\n")
    json_file = tmp_path / "pairs.json"
    json_file.write_text(json.dumps([{"fixed": row["fixed"], "moving": row["moving"], "name": "only-images"}]))

    volumes = PairedDataset(csv_file)
    item = volumes[0]
    assert len(volumes) == 1 and item["case"] == "pair0001"
    assert item["fixed"].shape == item["moving_labels"].shape == (1, 32, 128, 128)
    slices = PairedDataset(json_file, spatial_dims=2)
    region = slices.preprocessed(0).grid.data_region[0]
    assert len(slices) == region.stop - region.start == 23  # 12 slices of 6 mm -> round(22.86) = 23 of 3.15 mm
    assert set(slices[0]) == {"fixed", "moving", "slice", "case"} and slices[0]["case"] == "only-images"
    assert slices[0]["slice"] == region.start
    nonempty = PairedDataset(csv_file, spatial_dims=2, skip_empty_slices=True)
    assert 0 < len(nonempty) <= 23
    assert all(nonempty[i]["fixed_labels"].any() or nonempty[i]["moving_labels"].any() for i in range(len(nonempty)))


def test_paired_dataset_2d_images(tmp_path: Path) -> None:
    names = write_pair_files(tmp_path, (60, 50), (1.2, 1.1))
    list_file = tmp_path / "pairs.json"
    list_file.write_text(json.dumps([names]))
    dataset = PairedDataset(list_file, spatial_dims=2)
    assert len(dataset) == 1 and dataset[0]["fixed"].shape == (1, 128, 128)
    with pytest.raises(ValueError, match="is a 2D image; use spatial_dims=2"):
        PairedDataset(list_file, spatial_dims=3)


def test_paired_dataset_errors(tmp_path: Path) -> None:
    names = write_pair_files(tmp_path, (60, 50), (1.2, 1.1))
    no_moving = tmp_path / "no_moving.csv"
    no_moving.write_text(f"fixed\n{names['fixed']}\n")
    with pytest.raises(ValueError, match=r"no_moving\.csv: row 1: missing moving"):
        PairedDataset(no_moving)
    missing_file = tmp_path / "missing.json"
    missing_file.write_text(json.dumps([{"fixed": names["fixed"], "moving": "gone.nii.gz"}]))
    with pytest.raises(FileNotFoundError, match=r"missing\.json: row 1: moving file .*gone\.nii\.gz does not exist"):
        PairedDataset(missing_file)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"fixed": names["fixed"], "moving": names["moving"], "mask": "x"}]))
    with pytest.raises(ValueError, match=r"unknown columns \['mask'\]"):
        PairedDataset(unknown)
    with pytest.raises(FileNotFoundError, match="pair list does not exist"):
        PairedDataset(tmp_path / "nothing.csv")


def test_acdc_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ACDC root folder does not exist"):
        ACDCDataset(tmp_path / "nowhere")
    patient = tmp_path / "patient010"
    patient.mkdir()
    (patient / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: DCM\n")
    with pytest.raises(FileNotFoundError, match=r"patient010_frame01\.nii\.gz: missing; incomplete ACDC patient"):
        ACDCDataset(tmp_path, split="val")


def test_acdc_fixed_frame_chooses_the_direction(tmp_path: Path) -> None:
    """``fixed_frame="ES"`` makes the ES frame and its labels the fixed ones; ED stays the default."""
    patient = tmp_path / "patient007"
    patient.mkdir()
    (patient / "Info.cfg").write_text("ED: 1\nES: 9\nGroup: NOR\n")
    image = smooth_image((4, 16, 16), (1.5, 1.5, 8.0))
    for frame in (1, 9):
        write_image(image, patient / f"patient007_frame{frame:02d}.nii.gz")
        write_image(label_image(image), patient / f"patient007_frame{frame:02d}_gt.nii.gz")
    default, swapped = ACDCDataset(tmp_path, "all"), ACDCDataset(tmp_path, "all", fixed_frame="ES")
    assert (default.fixed_frame, swapped.fixed_frame) == ("ED", "ES")
    assert (default.files[0].fixed.name, default.files[0].moving.name) == ("patient007_frame01.nii.gz",
                                                                          "patient007_frame09.nii.gz")
    assert (swapped.files[0].fixed.name, swapped.files[0].moving_labels.name) == ("patient007_frame09.nii.gz",
                                                                                  "patient007_frame01_gt.nii.gz")
    assert swapped.files[0].fixed_labels.name == "patient007_frame09_gt.nii.gz"
    with pytest.raises(ValueError, match="fixed_frame must be 'ED' or 'ES'"):
        ACDCDataset(tmp_path, "all", fixed_frame="ED->ES")


@pytest.mark.acdc
def test_acdc_split_and_lengths(acdc_root: Path) -> None:
    train, val = ACDCDataset(acdc_root, "train"), ACDCDataset(acdc_root, "val")
    assert (len(train), len(val), len(ACDCDataset(acdc_root, "all"))) == (90, 10, 100)
    assert [p.name for p in val.patients] == list(ACDC_VALIDATION_PATIENTS)
    groups = [p.group for p in val.patients]
    assert sorted(groups) == sorted(["DCM", "HCM", "MINF", "NOR", "RV"] * 2)
    assert not {p.name for p in train.patients} & set(ACDC_VALIDATION_PATIENTS)
    train_groups = [p.group for p in train.patients]
    assert all(train_groups.count(g) == 18 for g in set(groups))


@pytest.mark.acdc
def test_acdc_volume_item_and_case(acdc_root: Path) -> None:
    dataset = ACDCDataset(acdc_root, "all", patients=[1])
    item = dataset[0]
    assert (item["patient"], item["group"]) == ("patient001", "DCM")
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        assert item[key].shape == (1, 32, 128, 128)
    assert item["fixed"].dtype == torch.float32 and item["fixed_labels"].dtype == torch.int64
    assert 0.0 <= float(item["fixed"].min()) and float(item["moving"].max()) <= 1.0
    assert set(item["fixed_labels"].unique().tolist()) <= {0, 1, 2, 3}
    case = dataset.case(0)
    labels_back = case.preprocessed.grid.image_to_original(case.preprocessed.fixed_labels, "nearest")
    assert labels_back.same_geometry(case.fixed_labels, atol=0.0)
    heart, heart_back = case.fixed_labels.array > 0, labels_back.array > 0
    assert 2 * (heart & heart_back).sum() / (heart.sum() + heart_back.sum()) > 0.95


@pytest.mark.acdc
def test_acdc_2d_slices(acdc_root: Path) -> None:
    volumes = ACDCDataset(acdc_root, "val")
    slices = ACDCDataset(acdc_root, "val", spatial_dims=2)
    expected = 0
    for i in range(len(volumes)):
        region = volumes.preprocessing.model_grid(read_image(volumes.files[i].fixed).grid).data_region[0]
        expected += region.stop - region.start
    assert len(slices) == expected
    item = slices[5]
    assert item["fixed"].shape == item["fixed_labels"].shape == (1, 128, 128)
    assert isinstance(item["slice"], int) and item["patient"] == "patient010"
    nonempty = ACDCDataset(acdc_root, "val", spatial_dims=2, skip_empty_slices=True)
    assert 0 < len(nonempty) < len(slices)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.mark.acdc
def test_acdc_identity_dice_on_model_grid(acdc_root: Path) -> None:
    """Dice of ES (moving) vs ED (fixed) labels with no registration, paper preprocessing,
    all 100 training patients (reference, ACDC testing set: LV 62.32, Myo 49.04, RV 66.86)."""
    start = time.perf_counter()
    dataset = ACDCDataset(acdc_root, "all")
    structures = {
        "LV": lambda x: x == 3,
        "Myo": lambda x: x == 2,
        "RV": lambda x: x == 1,
        "LVepi": lambda x: (x == 2) | (x == 3),
        "Heart": lambda x: x > 0,
    }
    scores = {name: [] for name in structures}
    for i in range(len(dataset)):
        fixed, moving = dataset.preprocessed_labels(i)
        for name, select in structures.items():
            scores[name].append(dice(select(moving), select(fixed)))
    means = {name: 100.0 * float(np.mean(values)) for name, values in scores.items()}
    means["Overall"] = float(np.mean(list(means.values())))
    print("\nidentity Dice (%), 100 ACDC training patients, model grid: "
          + ", ".join(f"{name} {value:.2f}" for name, value in means.items())
          + f" ({time.perf_counter() - start:.1f} s)")
    assert len(scores["LV"]) == 100
    assert all(40.0 < means[name] < 80.0 for name in ("LV", "Myo", "RV"))
    assert means["LVepi"] > means["LV"] and means["Heart"] > means["RV"]
