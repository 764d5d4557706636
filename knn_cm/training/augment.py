"""EDM's geometric augmentation with conditioning labels (Karras et al. 2022, Appendix F.2; train.py --augment).

Written from the EDM paper's description and the semantics of its public pipeline (itself StyleGAN2-ADA's,
Karras et al. 2020, Appendix B), not from its code. Each transform is applied to an image with probability
min(1, p * multiplier); the parameters drawn for it become the image's augmentation labels, which condition
the network (``augment_dim``), so it learns the augmented distributions without leaking them into samples:
sampling passes zero labels, the unaugmented distribution.

Transforms, in the order applied, and their labels (EDM's layout: one block per enabled transform, in this
order; a transform with multiplier 0 contributes no label):

| transform | parameter | labels |
|---|---|---|
| ``xflip`` | w in {0, 1}: mirror left-right | [w] |
| ``yflip`` | w in {0, 1}: mirror top-bottom | [w] |
| ``rotate_int`` | w in {0, 1, 2, 3} quarter turns counter-clockwise | [w in {1, 2}, w in {2, 3}] |
| ``translate_int`` | (tx, ty) pixels = round(u size translate_int_max), u ~ U(-1, 1)^2 | [tx / (W max), ty / (H max)] |
| ``scale`` | s = 2^(w scale_std), w ~ N(0, 1), isotropic | [w] |
| ``rotate_frac`` | theta ~ U(-pi, pi) * rotate_frac_max, counter-clockwise | [cos theta - 1, sin theta] |
| ``aniso`` | s = 2^(w aniso_std) along the axis at angle r ~ U(-pi, pi), 1 / s across it | [w cos r, w sin r] |
| ``translate_frac`` | (w0 W std, w1 H std) pixels, w ~ N(0, 1)^2 | [w0, w1] |

Labels are 0 where a transform was not applied, so zero labels mean "not augmented". EDM's CIFAR-10 setting
(docs/hyperparameters.md#edm) is :data:`EDM_CIFAR10`: p 0.12, x-flips always drawn (multiplier 1e8, so half the
images are mirrored), y-flip, scale, fractional rotation, anisotropy and fractional translation at multiplier 1:
9 labels.

Geometry: x to the right and y upwards (so positive ty and positive angles move content up and
counter-clockwise on screen), rotations and scalings about the image centre, and reflect padding (mirror
about the edge pixels, the edge not repeated) wherever a transform reads outside the image. Flips, quarter
turns and integer translations move pixels exactly. The general transforms (scale, fractional rotation,
anisotropy, fractional translation) are composed into one affine map per image and resampled once with
bicubic interpolation; EDM resamples through a 2x-upsampled wavelet filter instead, a difference of
interpolation kernel only. Colour transforms of ADA are not part of EDM's recipe and are not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from knn_cm.device import to_device_async

# Label entries per transform, in the order transforms are applied and labels are laid out.
LABEL_SIZES = {"xflip": 1, "yflip": 1, "rotate_int": 2, "translate_int": 2, "scale": 1, "rotate_frac": 2,
               "aniso": 2, "translate_frac": 2}
TRANSFORMS = tuple(LABEL_SIZES)
# EDM's CIFAR-10 recipe (train.py: --augment 0.12 -> xflip 1e8, yflip, scale, rotate_frac, aniso,
# translate_frac at 1): 9 labels, the networks' augment_dim.
EDM_CIFAR10 = {"p": 0.12, "xflip": 1e8, "yflip": 1.0, "scale": 1.0, "rotate_frac": 1.0, "aniso": 1.0,
               "translate_frac": 1.0}


@dataclass
class Augmentation:
    """What the pipe did to each image of a batch of B images.

    The per-image parameters stay on the host, where they were drawn: decisions on them (which images to
    turn, shift or resample) read host memory and never wait for the device; the device gets its copies once,
    without waiting (:meth:`on_device`).

    Attributes:
        labels: [B, L] float32 augmentation labels on the images' device (L = :attr:`AugmentPipe.label_dim`).
        xflip, yflip: [B] bool, mirrored left-right / top-bottom (host).
        quarter_turns: [B] int64 in 0..3, counter-clockwise quarter turns after the flips (host).
        shift: [B, 2] int64 integer translation (tx right, ty up) in pixels after the quarter turns (host).
        inverse_map: [B, 3, 3] float64, output -> input centred coordinates of the general transform (host).
        resampled: [B] bool, the general transform was applied (inverse_map is not the identity) (host).
    """

    labels: torch.Tensor
    xflip: torch.Tensor
    yflip: torch.Tensor
    quarter_turns: torch.Tensor
    shift: torch.Tensor
    inverse_map: torch.Tensor
    resampled: torch.Tensor

    def __post_init__(self):
        self._device_copies: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def orthogonal_only(self) -> torch.Tensor:
        """[B] bool (host): only flips and quarter turns were applied, a permutation of pixels (an orthogonal map)."""
        return ~self.resampled & (self.shift == 0).all(dim=1)

    def on_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The flips and turns as [B] tensors on ``device`` ("xflip", "yflip", "quarter_turns"), copied once."""
        device = torch.device(device)
        if device not in self._device_copies:
            packed = torch.stack([self.xflip.long(), self.yflip.long(), self.quarter_turns])  # one copy for three
            xflip, yflip, turns = to_device_async(packed, device).unbind(0)
            self._device_copies[device] = {"xflip": xflip.bool(), "yflip": yflip.bool(), "quarter_turns": turns}
        return self._device_copies[device]

    def apply_orthogonal(self, images: torch.Tensor) -> torch.Tensor:
        """The flips and quarter turns of each image applied to ``images`` [B, C, H, W]."""
        flags = self.on_device(images.device)
        images = torch.where(flags["xflip"].reshape(-1, 1, 1, 1), images.flip(3), images)
        images = torch.where(flags["yflip"].reshape(-1, 1, 1, 1), images.flip(2), images)
        return _quarter_turns(images, self.quarter_turns, flags["quarter_turns"])

    def invert_orthogonal(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply_orthogonal`: undo the quarter turns, then the flips."""
        flags = self.on_device(images.device)
        images = _quarter_turns(images, (-self.quarter_turns) % 4, (-flags["quarter_turns"]) % 4)
        images = torch.where(flags["yflip"].reshape(-1, 1, 1, 1), images.flip(2), images)
        return torch.where(flags["xflip"].reshape(-1, 1, 1, 1), images.flip(3), images)


def _quarter_turns(images: torch.Tensor, turns: torch.Tensor, turns_on_device: torch.Tensor) -> torch.Tensor:
    """Each image turned by its ``turns`` (host [B], deciding which turns happen at all; the same values
    on the images' device, choosing per image)."""
    out = images
    for count in (1, 2, 3):
        if bool((turns == count).any()):  # a host read: no wait for the device
            chosen = (turns_on_device == count).reshape(-1, 1, 1, 1)
            out = torch.where(chosen, torch.rot90(images, count, dims=(2, 3)), out)
    return out


def _reflect(coordinate: torch.Tensor, size: int) -> torch.Tensor:
    """Integer coordinates mirrored into [0, size - 1] about the edge pixels (period 2 size - 2)."""
    if size == 1:
        return torch.zeros_like(coordinate)
    period = 2 * size - 2
    folded = coordinate % period
    return torch.where(folded > size - 1, period - folded, folded)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] counter-clockwise rotations by ``angle`` [B] (float64, y up)."""
    cos, sin = angle.cos(), angle.sin()
    out = torch.eye(3, dtype=torch.float64).repeat(angle.shape[0], 1, 1)
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = cos, -sin, sin, cos
    return out


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    out = torch.eye(3, dtype=torch.float64).repeat(sx.shape[0], 1, 1)
    out[:, 0, 0], out[:, 1, 1] = sx, sy
    return out


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    out = torch.eye(3, dtype=torch.float64).repeat(tx.shape[0], 1, 1)
    out[:, 0, 2], out[:, 1, 2] = tx, ty
    return out


class AugmentPipe:
    """EDM's geometric augmentation: ``images, labels = pipe(images, generator)``.

    Args:
        p: the augmentation probability; transform t is applied to an image with probability
            min(1, p * multiplier_t). p = 0 returns the images unchanged with zero labels.
        xflip, yflip, rotate_int, translate_int, scale, rotate_frac, aniso, translate_frac: the multipliers
            (>= 0; 0 disables a transform and drops its labels). EDM's CIFAR-10 values: :data:`EDM_CIFAR10`.
        translate_int_max: largest integer translation, a fraction of the image size (0.125).
        scale_std, aniso_std: log2 standard deviations of the scalings (0.2).
        rotate_frac_max: largest fractional rotation, a fraction of a half turn (1: any angle).
        translate_frac_std: standard deviation of the fractional translation, a fraction of the size (0.125).
    """

    def __init__(self, p: float = 0.12, xflip: float = 0.0, yflip: float = 0.0, rotate_int: float = 0.0,
                 translate_int: float = 0.0, scale: float = 0.0, rotate_frac: float = 0.0, aniso: float = 0.0,
                 translate_frac: float = 0.0, translate_int_max: float = 0.125, scale_std: float = 0.2,
                 rotate_frac_max: float = 1.0, aniso_std: float = 0.2, translate_frac_std: float = 0.125):
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"augment p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.multipliers = {"xflip": xflip, "yflip": yflip, "rotate_int": rotate_int, "translate_int": translate_int,
                            "scale": scale, "rotate_frac": rotate_frac, "aniso": aniso,
                            "translate_frac": translate_frac}
        for name, value in self.multipliers.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"augment multiplier {name} must be a finite number >= 0, got {value!r}")
        for name, value in {"translate_int_max": translate_int_max, "scale_std": scale_std,
                            "rotate_frac_max": rotate_frac_max, "aniso_std": aniso_std,
                            "translate_frac_std": translate_frac_std}.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"augment setting {name} must be a finite number >= 0, got {value!r}")
        self.translate_int_max, self.scale_std, self.aniso_std = translate_int_max, scale_std, aniso_std
        self.rotate_frac_max, self.translate_frac_std = rotate_frac_max, translate_frac_std

    @property
    def enabled(self) -> tuple[str, ...]:
        """The transforms with a multiplier > 0, in order: they make up the label layout."""
        return tuple(name for name in TRANSFORMS if self.multipliers[name] > 0)

    @property
    def label_dim(self) -> int:
        """Entries per label row: the network's ``augment_dim`` (9 for :data:`EDM_CIFAR10`)."""
        return sum(LABEL_SIZES[name] for name in self.enabled)

    def label_slices(self) -> dict[str, slice]:
        """Where each enabled transform's labels sit in a label row."""
        out, start = {}, 0
        for name in self.enabled:
            out[name] = slice(start, start + LABEL_SIZES[name])
            start += LABEL_SIZES[name]
        return out

    def __repr__(self) -> str:
        active = ", ".join(f"{name}={self.multipliers[name]:g}" for name in self.enabled)
        return f"AugmentPipe(p={self.p:g}, {active})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented images [B, C, H, W] (same dtype and device) and their labels [B, label_dim] float32."""
        augmented, augmentation = self.augment(images, generator)
        return augmented, augmentation.labels

    def augment(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, Augmentation]:
        """Like calling the pipe, but returns the full :class:`Augmentation` record (for the targets).

        Random draws come from ``generator`` on the CPU, a fixed number per enabled transform and image.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a tensor [B, C, H, W], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        batch, _, height, width = images.shape

        def uniform(*shape):
            return torch.rand(shape, generator=generator, dtype=torch.float64)

        def applied(name):  # [B] bool: which images get this transform
            return uniform(batch) < self.p * self.multipliers[name]

        labels, zeros = [], torch.zeros(batch, dtype=torch.float64)
        xflip = yflip = torch.zeros(batch, dtype=torch.bool)
        turns = torch.zeros(batch, dtype=torch.int64)
        shift = torch.zeros(batch, 2, dtype=torch.int64)
        inverse_map = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
        enabled = self.enabled

        if "xflip" in enabled:
            xflip = (torch.randint(2, (batch,), generator=generator) == 1) & applied("xflip")
            labels.append(xflip.double().unsqueeze(1))
        if "yflip" in enabled:
            yflip = (torch.randint(2, (batch,), generator=generator) == 1) & applied("yflip")
            labels.append(yflip.double().unsqueeze(1))
        if "rotate_int" in enabled:
            turns = torch.where(applied("rotate_int"), torch.randint(4, (batch,), generator=generator), 0)
            labels.append(torch.stack([(turns == 1) | (turns == 2), (turns == 2) | (turns == 3)], dim=1).double())
        if "translate_int" in enabled:
            draw = uniform(batch, 2) * 2 - 1
            draw = torch.where(applied("translate_int").unsqueeze(1), draw, 0.0)
            sizes = torch.tensor([width, height], dtype=torch.float64) * self.translate_int_max
            shift = (draw * sizes).round().to(torch.int64)
            labels.append(shift.double() / sizes.clamp_min(1e-12))
        if "scale" in enabled:
            w = torch.where(applied("scale"), torch.randn(batch, generator=generator, dtype=torch.float64), zeros)
            s = torch.exp2(w * self.scale_std)
            inverse_map = inverse_map @ _scaling(1 / s, 1 / s)
            labels.append(w.unsqueeze(1))
        if "rotate_frac" in enabled:
            theta = (uniform(batch) * 2 - 1) * math.pi * self.rotate_frac_max
            theta = torch.where(applied("rotate_frac"), theta, zeros)
            inverse_map = inverse_map @ _rotation(-theta)
            labels.append(torch.stack([theta.cos() - 1, theta.sin()], dim=1))
        if "aniso" in enabled:
            w = torch.randn(batch, generator=generator, dtype=torch.float64)
            r = (uniform(batch) * 2 - 1) * math.pi
            chosen = applied("aniso")
            w = torch.where(chosen, w, zeros)
            s = torch.exp2(w * self.aniso_std)
            # Only where applied: R(r) R(-r) is the identity only up to rounding, which would resample.
            aniso = _rotation(r) @ _scaling(1 / s, s) @ _rotation(-r)
            inverse_map = inverse_map @ torch.where(chosen.reshape(-1, 1, 1), aniso, torch.eye(3, dtype=torch.float64))
            labels.append(torch.stack([w * r.cos(), w * r.sin()], dim=1))
        if "translate_frac" in enabled:
            w = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
            w = torch.where(applied("translate_frac").unsqueeze(1), w, 0.0)
            inverse_map = inverse_map @ _translation(-w[:, 0] * width * self.translate_frac_std,
                                                     -w[:, 1] * height * self.translate_frac_std)
            labels.append(w)

        resampled = (inverse_map - torch.eye(3, dtype=torch.float64)).abs().amax(dim=(1, 2)) > 0
        labels = torch.cat(labels, dim=1) if labels else torch.zeros(batch, 0, dtype=torch.float64)
        augmentation = Augmentation(
            labels=to_device_async(labels.to(torch.float32), images.device),
            xflip=xflip, yflip=yflip, quarter_turns=turns, shift=shift, inverse_map=inverse_map, resampled=resampled)
        out = augmentation.apply_orthogonal(images)
        out = self._translate(out, shift)
        out = self._resample(out, inverse_map, resampled)
        return out, augmentation

    @staticmethod
    def _translate(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Integer translation by (tx right, ty up) pixels with reflect padding; exact pixel moves.

        The source rows and columns of every image are computed on the host from ``shift`` [B, 2] (host) and
        gathered on the device in one pass (unshifted images gather themselves).
        """
        if not bool((shift != 0).any()):  # a host read
            return images
        batch, channels, height, width = images.shape
        source_x = _reflect(torch.arange(width).unsqueeze(0) - shift[:, :1], width)   # content moves right by tx
        source_y = _reflect(torch.arange(height).unsqueeze(0) + shift[:, 1:], height)  # and up by ty
        source_x, source_y = to_device_async(torch.cat([source_x, source_y], dim=1), images.device).split(
            [width, height], dim=1)
        out = images.gather(2, source_y.reshape(batch, 1, height, 1).expand(batch, channels, height, width))
        return out.gather(3, source_x.reshape(batch, 1, 1, width).expand(batch, channels, height, width))

    @staticmethod
    def _resample(images: torch.Tensor, inverse_map: torch.Tensor, resampled: torch.Tensor) -> torch.Tensor:
        """The general affine transforms: output pixel p reads the input at inverse_map @ p (centred, y up),
        bicubic, reflect padding; images whose map is the identity are not touched.

        Which images and their sampling grids are worked out on the host; the device gets them in one copy.
        """
        if not bool(resampled.any()):  # a host read
            return images
        chosen = resampled.nonzero().flatten()
        _, _, height, width = images.shape
        cx, cy = (width - 1) / 2, (height - 1) / 2
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
        points = torch.stack([xs - cx, cy - ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)  # [HW, 3]
        source = points @ inverse_map[resampled].transpose(1, 2)                               # [b, HW, 3]
        # Pixel coordinates, then grid_sample's normalisation with align_corners=True (-1, 1 = edge centres),
        # whose reflection padding mirrors about the edge pixels like the integer translation.
        grid_x = (source[..., 0] + cx) / max(width - 1, 1) * 2 - 1
        grid_y = (cy - source[..., 1]) / max(height - 1, 1) * 2 - 1
        grid = torch.stack([grid_x, grid_y], dim=-1).reshape(-1, height, width, 2).to(torch.float32)
        grid = to_device_async(grid, images.device)
        chosen = to_device_async(chosen, images.device)
        selected = images.index_select(0, chosen)
        warped = F.grid_sample(selected.to(torch.float32), grid, mode="bicubic", padding_mode="reflection",
                               align_corners=True)
        return images.index_copy(0, chosen, warped.to(images.dtype))
