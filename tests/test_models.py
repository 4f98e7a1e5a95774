"""Tests for diffusereg.models: shapes, the fusion mask, locality, gradients, saving, ablations, teacher."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from monai.networks.nets.swin_unetr import WindowAttention, compute_mask, window_partition

from diffusereg.models import (
    ConditionalUNetDenoiser,
    DenoiserCondition,
    DiffuseRegDenoiser,
    RegistrationNet,
    fusion_attention_mask,
)
from diffusereg.models.fusion_attention import FusionWindowAttention, relative_position_index
from diffusereg.models.swin_encoder import FusionSwinBlock

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp. Using PyTorch native grid_sample")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and one thread is far steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SHAPES = {2: (32, 32), 3: (32, 32, 32)}


def tiny_denoiser(spatial_dims: int, **kwargs: object) -> DiffuseRegDenoiser:
    torch.manual_seed(0)
    return DiffuseRegDenoiser(spatial_dims=spatial_dims, feature_size=12, **kwargs)  # type: ignore[arg-type]


def tiny_unet(spatial_dims: int) -> ConditionalUNetDenoiser:
    torch.manual_seed(0)
    return ConditionalUNetDenoiser(
        spatial_dims=spatial_dims, channels=(8, 16, 16), attention_levels=(False, False, True), norm_num_groups=8,
        num_head_channels=8, num_res_blocks=1,
    )


def tiny_teacher(spatial_dims: int, integration_steps: int = 7) -> RegistrationNet:
    torch.manual_seed(0)
    return RegistrationNet(
        spatial_dims=spatial_dims, channels=(8, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,),
        integration_steps=integration_steps,
    )


def perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its (possibly zero) initialisation so all paths carry signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(spatial_dims: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(sample, timestep, fixed, moving)`` for a batch on the test grid."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[spatial_dims]
    fixed = torch.rand(batch, 1, *shape, generator=gen)
    moving = torch.rand(batch, 1, *shape, generator=gen)
    sample = torch.randn(batch, spatial_dims, *shape, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)
    return sample, timestep, fixed, moving


# ---------------------------------------------------------------- shapes and interface


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(spatial_dims: int, batch: int) -> None:
    sample, timestep, fixed, moving = inputs(spatial_dims, batch)
    with torch.no_grad():
        for model in (tiny_denoiser(spatial_dims), tiny_unet(spatial_dims)):
            out = model(sample, timestep, fixed, moving)
            assert out.sample.shape == sample.shape
            assert model(sample, timestep, fixed, moving, return_dict=False)[0].shape == sample.shape
        assert tiny_teacher(spatial_dims)(fixed, moving).shape == sample.shape


def test_defaults_resolved_per_spatial_dims() -> None:
    for spatial_dims, expected in ((2, (24, [4, 4])), (3, (48, [2, 4, 4]))):
        config = DiffuseRegDenoiser(spatial_dims=spatial_dims).config
        assert (config.feature_size, config.window_size) == expected
        assert config.depths == [2, 2, 2, 2] and config.num_heads == [3, 6, 12, 24]
        assert config.field_mean == [0.0] * spatial_dims and config.field_std == [1.0] * spatial_dims


def test_scalar_timestep_and_condition_broadcast() -> None:
    model = perturb(tiny_denoiser(2)).eval()
    sample, _, fixed, moving = inputs(2, 3)
    with torch.no_grad():
        scalar = model(sample, 7, fixed, moving).sample
        vector = model(sample, torch.full((3,), 7), fixed, moving).sample
        one_pair = model(sample, 7, condition=model.encode_condition(fixed[:1], moving[:1])).sample
        repeated = model(sample, 7, fixed[:1].expand(3, -1, -1, -1), moving[:1].expand(3, -1, -1, -1)).sample
    torch.testing.assert_close(scalar, vector)
    torch.testing.assert_close(one_pair, repeated)


def test_size_validation_names_multiple() -> None:
    model = tiny_denoiser(2)
    with pytest.raises(ValueError, match="multiple of 32"):
        model.encode_condition(torch.rand(1, 1, 48, 32), torch.rand(1, 1, 48, 32))
    sample, timestep, fixed, moving = inputs(2, 1)
    images_only = DenoiserCondition(fixed, moving)  # what the UNet baseline's encode_condition returns
    with pytest.raises(ValueError, match="either `condition`"):
        model(sample, timestep, fixed, moving, condition=images_only)
    with pytest.raises(ValueError, match="does not fit this model"):
        model(sample, timestep, condition=images_only)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_encode_condition_reuse_is_identical(spatial_dims: int) -> None:
    model = perturb(tiny_denoiser(spatial_dims)).eval()
    sample, timestep, fixed, moving = inputs(spatial_dims, 2)
    with torch.no_grad():
        direct = model(sample, timestep, fixed, moving).sample
        cached = model(sample, timestep, condition=model.encode_condition(fixed, moving)).sample
    assert torch.equal(direct, cached)


# ---------------------------------------------------------------- fusion mask and bias


def test_mask_matrix_pattern_window() -> None:
    window, n = (2, 2), 4
    region = compute_mask([4, 4], window, (1, 1), None)  # 4 shifted windows, -100 across regions
    mask = fusion_attention_mask(window, region, "window")
    assert mask.shape == (4, 1 + 3 * n, 1 + 3 * n)
    assert (mask[:, 0, :] == 0).all() and (mask[:, :, 0] == 0).all()
    expected = torch.where(region != 0, float("-inf"), 0.0).repeat(1, 3, 3)
    assert torch.equal(mask[:, 1:, 1:], expected)
    # the last window mixes 4 regions: a field token sees only the same-region fixed token
    field0, fixed = 1 + 2 * n, slice(1, 1 + n)
    assert torch.equal(mask[3, field0, fixed], torch.tensor([0.0, -torch.inf, -torch.inf, -torch.inf]))
    # unshifted windows: everything open, one mask broadcast over windows
    assert torch.equal(fusion_attention_mask(window, None, "window"), torch.zeros(1, 13, 13))
    assert torch.equal(fusion_attention_mask(window, region, "none"), torch.zeros(1, 13, 13))


@pytest.mark.parametrize("mode", ["window", "adjacent", "none"])
def test_unshifted_mask_is_built_on_the_requested_device(mode) -> None:
    """Unshifted windows have no region mask to take the device from (on a GPU the mask must not
    stay on the CPU)."""
    assert fusion_attention_mask((2, 2), None, mode, device="meta").device.type == "meta"


def test_mask_matrix_pattern_adjacent() -> None:
    window, n = (3, 3), 9
    mask = fusion_attention_mask(window, None, "adjacent")
    field, fixed, moving = slice(1 + 2 * n, None), slice(1, 1 + n), slice(1 + n, 1 + 2 * n)
    assert (mask[0, 0] == 0).all() and (mask[0, :, 0] == 0).all()
    assert (mask[0, field, field] == 0).all()  # same group: whole window
    corner = 1 + 2 * n  # field token at window position (0, 0)
    open_fixed = (mask[0, corner, fixed] == 0).reshape(3, 3)
    assert torch.equal(open_fixed, torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    centre = 1 + 2 * n + 4  # position (1, 1) sees the whole 3x3 neighbourhood
    assert (mask[0, centre, moving] == 0).all()


def test_position_bias_tiled_and_zero_on_time_token() -> None:
    window = (2, 4, 4)
    attn = FusionWindowAttention(dim=12, num_heads=3, window_size=window)
    bias = attn.position_bias(window)
    n = 32
    assert bias.shape == (3, 1 + 3 * n, 1 + 3 * n)
    assert (bias[:, 0] == 0).all() and (bias[:, :, 0] == 0).all()
    block = bias[:, 1 : 1 + n, 1 : 1 + n]
    assert torch.equal(bias[:, 1:, 1:], block.repeat(1, 3, 3))
    monai_attn = WindowAttention(dim=12, num_heads=3, window_size=window)
    assert torch.equal(relative_position_index(window, window), monai_attn.relative_position_index)


# ---------------------------------------------------------------- locality of the fused attention


def _windows(x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return window_partition(x, window).reshape(x.shape[0], -1, window[0] * window[1], x.shape[-1])


def test_fusion_attention_layer_sees_only_its_window_region() -> None:
    torch.manual_seed(0)
    c, window, shift = 8, (2, 2), (1, 1)
    attn = FusionWindowAttention(dim=c, num_heads=2, window_size=window)
    fixed, moving, field = (torch.randn(1, 4, 4, c) for _ in range(3))
    mask = fusion_attention_mask(window, compute_mask([4, 4], window, shift, None), "window")

    def run(fixed_map: torch.Tensor) -> torch.Tensor:
        groups = [_windows(t, window, shift) for t in (fixed_map, moving, field)]
        time = torch.randn(1, 1, 1, c, generator=torch.Generator().manual_seed(3)).expand(1, 4, 1, c)
        return attn(torch.cat([time, *groups], dim=2), mask, window)

    base = run(fixed)
    # shifted window 3 holds pixels (3,3), (3,0), (0,3), (0,0) of the map, four different regions;
    # field token 0 of that window is pixel (3,3)
    outside, inside = fixed.clone(), fixed.clone()
    outside[0, 0, 0] += 5.0  # same shifted window, other region
    outside[0, 1, 1] += 5.0  # another window
    inside[0, 3, 3] += 5.0
    assert torch.equal(run(outside)[0, 3, 0], base[0, 3, 0])
    assert not torch.allclose(run(inside)[0, 3, 0], base[0, 3, 0])


@pytest.mark.parametrize("mode", ["window", "adjacent", "none"])
def test_fusion_block_locality_per_mask(mode: str) -> None:
    """The whole block (shift, partition, attention, MLP) on an 8x8 map, 4x4 windows shifted by 2.

    After the shift, pixel (7, 7) shares a window with pixels (0..1, 0..1) that wrapped around
    from the other border (another region); pixel (5, 5) shares window and region with (2, 2).
    """
    torch.manual_seed(0)
    c = 8
    block = FusionSwinBlock(c, 2, (4, 4), (2, 2), num_groups=3, condition_mask=mode, mlp_ratio=2.0)
    fixed, moving, field = (torch.randn(1, 8, 8, c) for _ in range(3))
    time = torch.randn(1, c)
    base = block(field, (fixed, moving), time)

    def changes(target: tuple[int, int], poked: tuple[int, int]) -> bool:
        f = fixed.clone()
        f[0, poked[0], poked[1]] += 5.0
        out = block(field, (f, moving), time)
        return not torch.allclose(out[0, target[0], target[1]], base[0, target[0], target[1]])

    changed = {"wrapped": changes((7, 7), (1, 1)), "far": changes((5, 5), (2, 2)),
               "neighbour": changes((7, 7), (6, 6)), "other window": changes((5, 5), (6, 6))}
    expected = {
        "window": {"wrapped": False, "far": True, "neighbour": True, "other window": False},
        "adjacent": {"wrapped": False, "far": False, "neighbour": True, "other window": False},
        "none": {"wrapped": True, "far": True, "neighbour": True, "other window": False},
    }[mode]
    assert changed == expected


# ---------------------------------------------------------------- gradients, saving, ablations


@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny_denoiser(2),
        lambda: tiny_denoiser(2, share_image_encoder=True, depths=(2, 1, 1, 1)),
        lambda: tiny_denoiser(3),
        lambda: tiny_unet(2),
        lambda: tiny_teacher(3),
    ],
    ids=["denoiser2d", "denoiser2d-shared", "denoiser3d", "unet2d", "teacher3d"],
)
def test_gradients_reach_every_parameter(make) -> None:  # type: ignore[no-untyped-def]
    model = perturb(make())
    spatial_dims = model.config.spatial_dims
    sample, timestep, fixed, moving = inputs(spatial_dims, 2)
    out = model(fixed, moving) if isinstance(model, RegistrationNet) else model(sample, timestep, fixed, moving).sample
    (out * torch.randn_like(out)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("make", [lambda: tiny_denoiser(2), lambda: tiny_unet(2), lambda: tiny_teacher(2)],
                         ids=["denoiser", "unet", "teacher"])
def test_save_load_round_trip(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = perturb(make()).eval()
    sample, timestep, fixed, moving = inputs(2, 1)

    def run(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(fixed, moving) if isinstance(m, RegistrationNet) else m(sample, timestep, fixed, moving).sample

    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[name], restored[name]) for name in saved)  # bit-identical weights
    # Weights memory-mapped from safetensors may sit at addresses that make the CPU kernels take
    # another (equally exact) summation order, so outputs agree to float32 rounding, not bit for bit.
    torch.testing.assert_close(run(loaded), run(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [{"condition_mask": "none"}, {"condition_mask": "adjacent"}, {"time_in_resblocks": False}, {"fusion": "concat"},
     {"share_image_encoder": True}],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_ablation_switches_change_the_computation(change: dict) -> None:
    base = perturb(tiny_denoiser(2)).eval()
    variant = tiny_denoiser(2, **change).eval()
    shared = {k: v for k, v in base.state_dict().items() if k in variant.state_dict()
              and variant.state_dict()[k].shape == v.shape}
    variant.load_state_dict(shared, strict=False)
    sample, timestep, fixed, moving = inputs(2, 2)
    with torch.no_grad():
        a = base(sample, timestep, fixed, moving).sample
        b = variant(sample, timestep, fixed, moving).sample
    assert b.shape == a.shape and torch.isfinite(b).all()
    assert not torch.allclose(a, b)
    if "fusion" in change:
        assert len(variant.image_encoders) == 0
        assert variant.encode_condition(fixed, moving).features == ()


# ---------------------------------------------------------------- teacher


def pull_warp(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Reference warp(m, u)(x) = m(x + u(x)): voxel field, channel i along array axis i."""
    spatial = image.shape[2:]
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=field.dtype) for s in spatial), indexing="ij"))
    points = grid + field  # (B, ndim, *S) voxel positions, array-axis order
    normalised = [2 * points[:, i] / (s - 1) - 1 for i, s in enumerate(spatial)]
    return F.grid_sample(image, torch.stack(normalised[::-1], dim=-1), align_corners=True, padding_mode="zeros")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_teacher_field_warps_like_monai(spatial_dims: int) -> None:
    net = perturb(tiny_teacher(spatial_dims), std=0.2).eval()
    _, _, fixed, moving = inputs(spatial_dims, 2)
    with torch.no_grad():
        field = net(fixed, moving)
        monai_warped, monai_field = net.voxelmorph(moving, fixed)
    assert field.abs().max() > 0.05
    torch.testing.assert_close(field, monai_field)
    torch.testing.assert_close(pull_warp(moving, field), monai_warped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("integration_steps", [0, 7])
def test_teacher_sign_and_channel_convention(spatial_dims: int, integration_steps: int) -> None:
    """A constant field +2 voxels along the last axis pulls m(x + 2) there, nothing along the others."""
    net = tiny_teacher(spatial_dims, integration_steps)
    out = net.voxelmorph.backbone.net[1].final_conv_out.conv
    with torch.no_grad():
        out.weight.zero_()
        out.bias.copy_(torch.tensor([0.0] * (spatial_dims - 1) + [2.0]))
    _, _, fixed, moving = inputs(spatial_dims, 1)
    with torch.no_grad():
        field = net(fixed, moving)
        warped = Warp(mode="bilinear", padding_mode="zeros")(moving, field)
    inner = (..., *(slice(8, -8) for _ in range(spatial_dims)))
    expected = torch.zeros_like(field)
    expected[:, -1] = 2.0
    torch.testing.assert_close(field[inner], expected[inner])
    torch.testing.assert_close(warped[inner], torch.roll(moving, -2, dims=-1)[inner])


def test_teacher_to_drops_cached_grids() -> None:
    net = tiny_teacher(2)
    _, _, fixed, moving = inputs(2, 1)
    net(fixed, moving)
    warps = [m for m in net.modules() if isinstance(m, Warp)]
    assert any(w.ref_grid is not None for w in warps)
    net.to(torch.float64)
    assert all(w.ref_grid is None for w in warps)
    assert net(fixed.double(), moving.double()).dtype == torch.float64


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_every_prediction_type_gives_back_the_clean_field_and_the_noise(prediction_type: str) -> None:
    from diffusereg.schedulers import clean_and_noise, prediction_target

    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 2, 8, 8, generator=gen)
    alpha_bar = torch.tensor([0.9, 0.01]).reshape(2, 1, 1, 1)
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    prediction = {"epsilon": eps, "sample": x0,
                  "v_prediction": alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(prediction_target(x0, eps, alpha_bar, prediction_type), prediction, atol=0, rtol=0)
    clean, noise = clean_and_noise(prediction, noisy, alpha_bar, prediction_type)
    torch.testing.assert_close(clean, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(noise, eps, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffuseRegDenoiser(spatial_dims=2, feature_size=12, prediction_type="x0")


def test_a_self_conditioned_denoiser_reads_its_estimate() -> None:
    """``self_conditioning=True``: the estimate is an input (zeros when absent), beside the noisy field."""
    model = perturb(tiny_denoiser(2, self_conditioning=True)).eval()
    sample, timestep, fixed, moving = inputs(2, 2)
    estimate = torch.randn_like(sample)
    with torch.no_grad():
        absent = model(sample, timestep, fixed, moving).sample
        zeros = model(sample, timestep, fixed, moving, estimate=torch.zeros_like(sample)).sample
        given = model(sample, timestep, fixed, moving, estimate=estimate).sample
        other_state = model(torch.randn_like(sample), timestep, fixed, moving, estimate=estimate).sample
    torch.testing.assert_close(absent, zeros)
    assert not torch.allclose(given, zeros, atol=1e-4)
    assert not torch.allclose(other_state, given, atol=1e-4)
