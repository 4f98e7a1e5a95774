"""Guidance: steer the sampling of a field towards a user objective.

A guide is a differentiable loss of the current estimate of the clean field ``x0`` (the
field the sampler would return if it stopped now) and of the images. At every active step the
pipeline lets each guide correct that estimate in turn (:meth:`Guide.correct`): one gradient step
``x0 <- x0 - scale * n * dL/dx0`` (``n`` = voxels in the batch), and re-derives the noise
prediction from the corrected ``x0`` before the scheduler step. This is classifier guidance
written in the ``x0`` parametrisation (as in universal / DPS-style guidance): the correction keeps
its size at low noise levels instead of vanishing with ``1 - alpha_bar``. :class:`FoldGuidance`
is a constraint instead: it steps until the estimate has no folds, so it goes last.

Every guide is called as ``guide(field, fixed, moving) -> loss`` with

- ``field``: ``(B, ndim, *S)`` displacement in voxels of the model grid,
- ``fixed``, ``moving``: ``(B, 1, *S)`` images on the model grid, intensities in ``[0, 1]``,
- ``loss``: a scalar tensor (lower is better).

Any callable with that signature is a guide (its scale is 1). Wrap it in :class:`FunctionGuide`
to give it a scale and a range of steps where it is active; built-in guides subclass :class:`Guide`.
A guide that holds masks takes them in the layout of the images it is used with (or of one
batch item); the pipeline calls :meth:`Guide.bind` once per call to bring them to its batch.

:class:`GuidanceSpec` is a guide as written on the command line (``smoothness=1``,
``similarity``, ``folds``, ``organ=3:0.5``), and :func:`build_guides` turns specs into guides.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from diffusereg.losses import gradient_loss, ssim_loss
from diffusereg.spatial import jacobian_determinant, warp

if TYPE_CHECKING:
    from diffusereg.pipelines.layout import ModelGridBatch

__all__ = [
    "GuidanceFunction",
    "Guide",
    "FunctionGuide",
    "SmoothnessGuidance",
    "FoldGuidance",
    "DirectionGuidance",
    "OrganMaskGuidance",
    "SimilarityGuidance",
    "GuidanceSpec",
    "as_guide",
    "build_guides",
]


def _voxel_gradient(loss: GuidanceFunction, field: torch.Tensor, fixed: torch.Tensor,
                    moving: torch.Tensor) -> torch.Tensor:
    """``n * d loss / d field`` with ``n`` the number of voxels in the batch (shape of ``field``)."""
    with torch.enable_grad():
        variable = field.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(variable, fixed, moving), variable)
    return field.shape[0] * math.prod(field.shape[2:]) * gradient


@runtime_checkable
class GuidanceFunction(Protocol):
    """A differentiable objective of the field estimate: ``(field, fixed, moving) -> scalar``."""

    def __call__(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor: ...


class Guide:
    """Base class of guides: a loss of the field estimate, its strength and when it acts.

    Args:
        scale: step size of the correction ``x0 <- x0 - scale * dL/dx0`` (field in voxels).
        start: fraction of the sampling schedule where the guide switches on (0 = first step).
        end: fraction where it switches off (1 = after the last step).
    """

    def __init__(self, scale: float = 1.0, start: float = 0.0, end: float = 1.0) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"guide range must satisfy 0 <= start <= end <= 1, got start={start}, end={end}")
        self.scale = float(scale)
        self.start = float(start)
        self.end = float(end)

    def is_active(self, step: int, num_steps: int) -> bool:
        """Whether the guide acts at ``step`` (0-based) of ``num_steps``."""
        return self.start <= step / num_steps < self.end

    def bind(self, batch: ModelGridBatch, num_samples: int) -> Guide:
        """This guide for one pipeline call on ``batch`` with ``num_samples`` samples per pair
        (guides holding masks return a copy with them in the batch's layout)."""
        return self

    def loss(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``field`` (B, ndim, *S) voxels given ``fixed``/``moving`` (B, 1, *S)."""
        raise NotImplementedError

    def correct(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The estimate after this guide's step: ``field - scale * n * dL/dfield`` (``n`` = voxels
        in the batch, so a loss that is a mean over voxels moves each voxel by ``scale`` times the
        derivative of its own term); ``field`` (B, ndim, *S) voxels, detached."""
        return field - self.scale * _voxel_gradient(self.loss, field, fixed, moving)

    def correct_output(self, field: torch.Tensor) -> torch.Tensor:
        """The returned field, ``(B, ndim, *S)`` voxels of the grid it is returned on (the fixed
        image's own grid for inputs with geometry; slices as the batch for a volume registered
        slice by slice), corrected by a guide active at the last step: unchanged, except for
        constraints that must hold on the result (:class:`FoldGuidance`)."""
        return field

    def __call__(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.loss(field, fixed, moving)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, start={self.start}, end={self.end})"


class FunctionGuide(Guide):
    """A user function ``(field, fixed, moving) -> scalar loss`` used as a guide."""

    def __init__(self, function: GuidanceFunction, scale: float = 1.0, start: float = 0.0, end: float = 1.0) -> None:
        super().__init__(scale, start, end)
        if not callable(function):
            raise TypeError(f"a guide function must be callable (field, fixed, moving) -> loss, got {type(function).__name__}")
        self.function = function

    def loss(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.function(field, fixed, moving)


def as_guide(guide: Guide | GuidanceFunction) -> Guide:
    """Return ``guide`` itself if it is a :class:`Guide`, else wrap the callable with scale 1."""
    return guide if isinstance(guide, Guide) else FunctionGuide(guide)


class SmoothnessGuidance(Guide):
    """Prefer less bending: loss = mean squared forward-difference gradient of the field.

    It makes the whole field smoother; it does not aim at folds (a few voxels with a Jacobian
    determinant <= 0), which :class:`FoldGuidance` removes. The step multiplies the finest
    (checkerboard) pattern of a 2D field by about ``1 - 4 * scale``: scales below 0.5 damp it, 0.25
    removes it, scales above 0.5 amplify it and can fold the field. What each does on ACDC:
    ``docs/pipeline.md`` (``benchmarks/control.py``).
    """

    def __init__(self, scale: float = 0.25, start: float = 0.0, end: float = 1.0) -> None:
        super().__init__(scale, start, end)

    def loss(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return gradient_loss(field)


class FoldGuidance(Guide):
    """Remove folds: raise every Jacobian determinant below ``threshold``.

    Loss = ``mean(relu(threshold - det(I + grad u)))`` with forward differences, the
    discretisation NJD is counted with (:func:`diffusereg.metrics.njd_percent`). Unlike the other
    guides, which take one gradient step per sampling step, this one is a constraint: at every
    active step, and once more on the returned field (:meth:`correct_output`), it repeats gradient steps of
    size ``scale`` on its loss until no determinant is <= 0 or ``max_iterations`` are done. Only
    the voxels near a determinant below ``threshold`` move; a fold-free field is returned as it is.

    Args:
        threshold: determinants below it are pushed up (unitless; 1 = volume kept).
        scale: step size of each iteration, voxels per unit gradient of one voxel's term.
        max_iterations: at most this many steps per sampling step.
    """

    def __init__(self, threshold: float = 0.1, scale: float = 0.2, max_iterations: int = 100,
                 start: float = 0.0, end: float = 1.0) -> None:
        super().__init__(scale, start, end)
        if max_iterations < 1:
            raise ValueError(f"FoldGuidance max_iterations must be >= 1, got {max_iterations}")
        self.threshold = float(threshold)
        self.max_iterations = int(max_iterations)

    def loss(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return F.relu(self.threshold - jacobian_determinant(field, method="forward")).mean()

    def remove_folds(self, field: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``field`` (B, ndim, *S) voxels with its folds removed (or ``max_iterations`` steps
        taken), and the number of voxels that still fold (0 unless the iterations ran out)."""
        for _ in range(self.max_iterations):
            folding = int((jacobian_determinant(field, method="forward") <= 0).sum())
            if not folding:
                return field, 0
            field = field - self.scale * _voxel_gradient(self.loss, field, field, field)
        return field, int((jacobian_determinant(field, method="forward") <= 0).sum())

    def correct(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.remove_folds(field)[0]

    def correct_output(self, field: torch.Tensor) -> torch.Tensor:
        """Folds removed again on the grid the field is returned on: resampling a fold-free field
        to another grid, or averaging samples, can fold it. Warns (``UserWarning``) if folds are
        left after ``max_iterations``: the returned field then still folds."""
        field, left = self.remove_folds(field)
        if left:
            warnings.warn(f"FoldGuidance: {left} voxels of the returned field still fold (Jacobian determinant "
                          f"<= 0) after max_iterations={self.max_iterations}; raise max_iterations or scale",
                          UserWarning, stacklevel=2)
        return field

    def __repr__(self) -> str:
        return (f"FoldGuidance(threshold={self.threshold}, scale={self.scale}, max_iterations={self.max_iterations}, "
                f"start={self.start}, end={self.end})")


class DirectionGuidance(Guide):
    """Prefer a prescribed mean displacement inside a region.

    Args:
        displacement: the wanted mean displacement, one number per axis, voxels, array-axis order.
        mask: optional region, in the layout of the images (or of one batch item); the whole
            image if omitted.

    Loss = ``f * |mean_region(u) - displacement|^2`` with ``f`` the fraction of voxels in the
    region. The factor makes it a mean over voxels like the other guides: a guidance step moves
    every region voxel by the same amount, ``2 * scale * (displacement - mean)``, so the mean goes
    towards the target while the shape of the deformation inside the region is kept. The default
    scale 0.5 moves the mean onto the target at every active step; smaller scales only lean
    towards it (measured in ``docs/pipeline.md``).
    """

    def __init__(self, displacement: Sequence[float], mask: torch.Tensor | None = None, scale: float = 0.5,
                 start: float = 0.0, end: float = 1.0) -> None:
        super().__init__(scale, start, end)
        if len(displacement) == 0:
            raise ValueError("DirectionGuidance needs a displacement vector (voxels, one number per axis)")
        self.displacement = [float(d) for d in displacement]
        self.mask = mask

    def bind(self, batch: ModelGridBatch, num_samples: int) -> DirectionGuidance:
        bound = copy.copy(self)
        bound.mask = None if self.mask is None else batch.mask_to_model(self.mask, num_samples)
        return bound

    def loss(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        ndim = field.shape[1]
        if len(self.displacement) != ndim:
            raise ValueError(f"DirectionGuidance displacement has {len(self.displacement)} components, the field has {ndim}")
        target = torch.tensor(self.displacement, dtype=field.dtype, device=field.device)
        region = torch.ones_like(field[:, :1]) if self.mask is None else self.mask.to(field)
        mean_per_axis = (field * region).sum(dim=(0, *range(2, field.ndim))) / region.sum().clamp_min(1.0)
        return region.mean() * ((mean_per_axis - target) ** 2).sum()


class OrganMaskGuidance(Guide):
    """Register one structure better, using the fixed image's mask of it.

    Args:
        fixed_mask: the structure in the fixed image, 0/1, in the layout of the images (or of one
            batch item).
        moving_mask: the same structure in the moving image, same shape. When given, the loss is
            the mean over voxels of ``(warp(moving_mask, field) - fixed_mask)^2``; otherwise it is
            the mean over voxels of the squared intensity difference between the fixed and the
            warped moving image, counted only inside ``fixed_mask`` dilated by ``margin`` voxels.
        margin: dilation of the fixed mask for the intensity loss, voxels.
        scale: default 1 with ``moving_mask``, 100 without (the intensity loss has smaller
            gradients); tuned on ACDC with ``benchmarks/control.py`` (``docs/pipeline.md``).
    """

    def __init__(self, fixed_mask: torch.Tensor, moving_mask: torch.Tensor | None = None, scale: float | None = None,
                 margin: int = 3, start: float = 0.0, end: float = 1.0) -> None:
        if scale is None:
            scale = 1.0 if moving_mask is not None else 100.0
        super().__init__(scale, start, end)
        self.fixed_mask = fixed_mask
        self.moving_mask = moving_mask
        self.margin = margin

    def bind(self, batch: ModelGridBatch, num_samples: int) -> OrganMaskGuidance:
        bound = copy.copy(self)
        bound.fixed_mask = batch.mask_to_model(self.fixed_mask, num_samples)
        bound.moving_mask = None if self.moving_mask is None else batch.mask_to_model(self.moving_mask, num_samples)
        return bound

    def loss(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        target = self.fixed_mask.to(field)
        if self.moving_mask is not None:
            source = self.moving_mask.to(field)
            return ((warp(source, field) - target) ** 2).mean()
        pool = F.max_pool2d if field.ndim == 4 else F.max_pool3d
        region = pool(target, kernel_size=2 * self.margin + 1, stride=1, padding=self.margin)
        return (region * (warp(moving, field) - fixed) ** 2).mean()


class _SmoothedGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back is blurred by ``blur``."""

    @staticmethod
    def forward(ctx: Any, field: torch.Tensor, blur: torch.nn.Module) -> torch.Tensor:
        ctx.blur = blur
        return field.view_as(field)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.blur(gradient), None


class SimilarityGuidance(Guide):
    """Prefer a warped moving image that looks like the fixed one: loss ``1 - SSIM`` (window 9).

    The gradient of SSIM is noisy from voxel to voxel, so taken as it is a step folds the field;
    with ``sigma > 0`` the gradient is smoothed with a Gaussian of ``sigma`` voxels before the step
    (a smoothed, Sobolev-type gradient: the step moves regions, not single voxels). Pair it with
    :class:`FoldGuidance` for a fold-free result (``docs/pipeline.md`` has both measured).
    """

    def __init__(self, scale: float = 3.0, kernel_size: int = 9, sigma: float = 4.0, start: float = 0.0,
                 end: float = 1.0) -> None:
        super().__init__(scale, start, end)
        self.kernel_size = kernel_size
        self.sigma = float(sigma)

    def loss(self, field: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if self.sigma > 0:
            blur = GaussianFilter(field.ndim - 2, self.sigma).to(field)
            field = _SmoothedGradient.apply(field, blur)
        return ssim_loss(warp(moving, field), fixed, kernel_size=self.kernel_size)


@dataclass(frozen=True)
class GuidanceSpec:
    """One guide as written on the command line.

    ``smoothness=SCALE`` (:class:`SmoothnessGuidance`), ``similarity[=SCALE]``
    (:class:`SimilarityGuidance`, its default scale when omitted), ``folds`` (:class:`FoldGuidance`
    with its defaults) or ``organ=LABEL[:SCALE]`` (:class:`OrganMaskGuidance` on the label value
    ``LABEL`` of both label maps; scale 1 when omitted).
    """

    kind: str
    scale: float
    label: int | None = None

    @classmethod
    def parse(cls, text: str) -> GuidanceSpec:
        """Read ``smoothness=1``, ``similarity``, ``similarity=0.5``, ``folds``, ``organ=3`` or ``organ=3:0.5``."""
        kind, sep, value = text.partition("=")
        usage = "use smoothness=SCALE, similarity[=SCALE], folds or organ=LABEL[:SCALE]"
        try:
            if not sep and kind in DEFAULT_SCALES:
                return cls(kind, DEFAULT_SCALES[kind])
            if sep and kind in ("smoothness", "similarity"):
                return cls(kind, float(value))
            if sep and kind == "organ":
                label, _, scale = value.partition(":")
                return cls(kind, float(scale) if scale else 1.0, int(label))
        except ValueError:
            raise ValueError(f"guidance {text!r}: cannot read the numbers; {usage}") from None
        raise ValueError(f"guidance {text!r} not understood; {usage}")

    def __str__(self) -> str:
        if self.kind == "organ":
            return f"organ={self.label}:{self.scale:g}"
        return "folds" if self.kind == "folds" else f"{self.kind}={self.scale:g}"


DEFAULT_SCALES = {"similarity": SimilarityGuidance().scale, "folds": FoldGuidance().scale}
"""The scale a spec written without a value gets (``similarity``, ``folds``)."""


def build_guides(specs: Sequence[GuidanceSpec], labels: tuple[np.ndarray, np.ndarray] | None) -> list[Guide]:
    """Guides from their specs, ``folds`` last (it removes what folds the others leave); ``labels``
    are the fixed and moving label maps in the layout of the images the guides will be used with
    (needed when a spec is ``organ``).

    Raises:
        ValueError: an ``organ`` spec without label maps, or whose label is missing from one.
    """
    guides: list[Guide] = []
    for spec in sorted(specs, key=lambda spec: spec.kind == "folds"):
        if spec.kind == "smoothness":
            guides.append(SmoothnessGuidance(scale=spec.scale))
        elif spec.kind == "similarity":
            guides.append(SimilarityGuidance(scale=spec.scale))
        elif spec.kind == "folds":
            guides.append(FoldGuidance(scale=spec.scale))
        elif labels is None:
            raise ValueError(f"guidance {spec}: needs --fixed-labels and --moving-labels")
        else:
            fixed_mask, moving_mask = (torch.from_numpy(np.asarray(m) == spec.label) for m in labels)
            if not fixed_mask.any() or not moving_mask.any():
                raise ValueError(f"guidance {spec}: label {spec.label} is missing from a label map (on the model grid)")
            guides.append(OrganMaskGuidance(fixed_mask, moving_mask, scale=spec.scale))
    return guides
