"""The physics of the offline demo data (:mod:`.demo`): contrasts from tissue maps, a smooth
phase per slice, coil sensitivities, noisy k-space through ``fastmri.fft2c``, fastMRI's
targets and its equispaced test mask. Every function draws from its own random stream per
volume (:func:`_rng`), so changing one option (e.g. the number of coils) leaves the others'
draws alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import fastmri
import numpy as np
import torch
from fastmri.data.subsample import EquispacedMaskFractionFunc

from .demo_anatomy import Tissues

if TYPE_CHECKING:
    from .demo import _Config, _Volume

# (csf, gm, wm) weight ranges of the synthetic contrasts; T1 uses the template itself.
_TISSUE_WEIGHTS = {
    "T2": ((0.85, 1.00), (0.50, 0.62), (0.30, 0.40)),
    "FLAIR": ((0.03, 0.10), (0.60, 0.72), (0.40, 0.50)),
    "PD": ((0.75, 0.90), (0.80, 0.92), (0.58, 0.68)),
}
# Independent random streams per volume, so e.g. changing num_coils leaves the phase alone.
_ANATOMY, _CONTRAST, _PHASE, _COILS, _MASK = range(5)
_NOISE = {"singlecoil": 5, "multicoil": 6}


def _fft2c(image: np.ndarray) -> np.ndarray:
    """``fastmri.fft2c`` (centred orthonormal 2-D FFT over the last two axes) of a complex
    array, in double precision."""
    return _complex_call(fastmri.fft2c, image)


def _ifft2c(kspace: np.ndarray) -> np.ndarray:
    """``fastmri.ifft2c`` of a complex array, in double precision."""
    return _complex_call(fastmri.ifft2c, kspace)


def _complex_call(function, array: np.ndarray) -> np.ndarray:
    """``function`` of fastMRI's real-view convention (``(..., H, W, 2)`` tensors) applied to a
    complex numpy array."""
    tensor = torch.view_as_real(torch.from_numpy(np.asarray(array, dtype=np.complex128)))
    return torch.view_as_complex(function(tensor).contiguous()).numpy()


def _rng(cfg: _Config, volume: _Volume, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, volume.index, stream])


def _contrast(tissues: Tissues, contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Magnitude image ``(slices, H, W)`` of one contrast, scaled to a maximum of 1."""
    if contrast == "T1":
        image = tissues.t1 ** rng.uniform(0.85, 1.15)
    else:
        w_csf, w_gm, w_wm = (rng.uniform(*bounds) for bounds in _TISSUE_WEIGHTS[contrast])
        image = w_csf * tissues.csf + w_gm * tissues.gm + w_wm * tissues.wm
    return image / max(float(image.max()), 1e-12)


def _grid(cfg: _Config) -> Tuple[np.ndarray, np.ndarray]:
    """Coordinates ``(H_k, W)`` of the k-space field of view, centred on the object, in
    units of half the larger image side (pixels are square)."""
    height, width = cfg.image_size
    unit = max(height, width) / 2
    y = (np.arange(cfg.kspace_height) - (cfg.kspace_height - 1) / 2) / unit
    x = (np.arange(width) - (width - 1) / 2) / unit
    return np.meshgrid(y, x, indexing="ij")


def _smooth_phase(num_slices: int, cfg: _Config, rng: np.random.Generator) -> np.ndarray:
    """Random quadratic phase per slice, ``(slices, H_k, W)`` radians: what B0 offsets and
    coil phases leave in real images, so the reconstruction problem is genuinely complex."""
    yy, xx = _grid(cfg)
    basis = np.stack([np.ones_like(yy), yy, xx, yy * yy, yy * xx, xx * xx])  # (6, H_k, W)
    coeffs = np.concatenate(
        [
            rng.uniform(-np.pi, np.pi, (num_slices, 1)),
            rng.normal(0.0, 0.5, (num_slices, 2)),
            rng.normal(0.0, 0.3, (num_slices, 3)),
        ],
        axis=1,
    )
    return np.einsum("sk,khw->shw", coeffs, basis)


def _coil_sensitivities(cfg: _Config, rng: np.random.Generator) -> np.ndarray:
    """Smooth complex coil sensitivities ``(coils, H_k, W)`` with ``sum_c |S_c|^2 = 1``.

    Loops on an ellipse around the head; magnitude falls off like the on-axis field of a
    current loop, ``(1 + (d / rho)^2)^(-3/2)``; phase = offset + linear twist along the loop.
    """
    yy, xx = _grid(cfg)
    height, width = cfg.image_size
    unit = max(height, width) / 2
    semi_y = rng.uniform(1.1, 1.3) * height / 2 / unit
    semi_x = rng.uniform(1.1, 1.3) * width / 2 / unit
    angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(cfg.num_coils) / cfg.num_coils
    angles = angles + rng.normal(0.0, 0.1, cfg.num_coils)
    sens = []
    for angle in angles:
        py, px = semi_y * np.sin(angle), semi_x * np.cos(angle)
        distance2 = (yy - py) ** 2 + (xx - px) ** 2
        magnitude = (1.0 + distance2 / rng.uniform(0.5, 0.8) ** 2) ** -1.5
        tangent = -np.sin(angle) * (yy - py) + np.cos(angle) * (xx - px)
        phase = rng.uniform(-np.pi, np.pi) + rng.uniform(-1.5, 1.5) * tangent
        sens.append(magnitude * np.exp(1j * phase))
    sens = np.stack(sens)
    return sens / np.sqrt((np.abs(sens) ** 2).sum(axis=0, keepdims=True))


def _volume_image(anatomy, volume: _Volume, cfg: _Config) -> np.ndarray:
    """Complex image ``(slices, H_k, W)``: contrast times smooth phase, the object centred
    along the readout with background above and below it (the oversampled field of view)."""
    height, width = cfg.image_size
    tissues = anatomy.tissues(volume.source_slices, _rng(cfg, volume, _ANATOMY))
    magnitude = _contrast(tissues, volume.contrast, _rng(cfg, volume, _CONTRAST))
    # Same offset as fastMRI's centre crop, so cropping H_k -> H returns exactly the object.
    top = (cfg.kspace_height - height) // 2
    padded = np.zeros((len(magnitude), cfg.kspace_height, width))
    padded[:, top : top + height] = magnitude
    return padded * np.exp(1j * _smooth_phase(len(magnitude), cfg, _rng(cfg, volume, _PHASE)))


def _simulate_kspace(image: np.ndarray, volume: _Volume, challenge: str, cfg: _Config):
    """Noisy complex64 k-space ``(slices, H_k, W)`` (single-coil: fastMRI emulates it too) or
    ``(slices, coils, H_k, W)`` (multi-coil); complex Gaussian noise of std
    ``noise_std * rms(k-space)`` per sample."""
    if challenge == "multicoil":
        image = image[:, None] * _coil_sensitivities(cfg, _rng(cfg, volume, _COILS))[None]
    kspace = _fft2c(image)
    sigma = cfg.noise_std * np.sqrt(np.mean(np.abs(kspace) ** 2))
    rng = _rng(cfg, volume, _NOISE[challenge])
    noise = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
    return (kspace + sigma / np.sqrt(2) * noise).astype(np.complex64)


def _target(kspace: np.ndarray, challenge: str, height: int) -> np.ndarray:
    """fastMRI target of stored k-space: ``|ifft2c|`` (single-coil) or RSS over coils
    (multi-coil), centre-cropped along the readout to ``height``; float32 ``(slices, H, W)``."""
    image = _ifft2c(kspace.astype(np.complex128))
    top = (image.shape[-2] - height) // 2
    image = image[..., top : top + height, :]
    if challenge == "multicoil":
        return np.sqrt((np.abs(image) ** 2).sum(axis=1)).astype(np.float32)
    return np.abs(image).astype(np.float32)


def _test_mask(cfg: _Config, volume: _Volume) -> Tuple[np.ndarray, int]:
    """fastMRI's equispaced test mask ``(W,)`` bool and its number of low frequencies."""
    width = cfg.image_size[1]
    mask_func = EquispacedMaskFractionFunc([cfg.test_center_fraction], [cfg.test_acceleration])
    seed = int(_rng(cfg, volume, _MASK).integers(2**31))
    mask, num_low = mask_func((1, width, 1), seed=seed)
    return mask.numpy().reshape(width).astype(bool), int(num_low)
