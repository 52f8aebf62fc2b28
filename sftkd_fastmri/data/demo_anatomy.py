"""Anatomy of the offline demo data (:mod:`.demo`): tissue maps on the target grid from the
MNI152 template that nilearn ships (:class:`MNIBrain`) or from a procedural ellipsoid head
phantom (:class:`Phantom`). Each source gives ``tissues(slices, rng)`` for axial indices in its
``axial_range`` and the pixel size ``pixel_mm``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Tissues:
    """Tissue fractions on the target grid, each ``(slices, H, W)`` in [0, 1]."""

    t1: np.ndarray
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray


def nilearn_available() -> bool:
    try:
        import nilearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


class MNIBrain:
    """MNI152 template (nilearn's packaged copy), cropped to the brain and resampled."""

    name = "brain"

    def __init__(self, image_size: Tuple[int, int]):
        from nilearn import datasets

        # Files inside the nilearn package: these loaders never touch the network.
        images = (
            datasets.load_mni152_template(resolution=1),
            datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1),
        )
        # RAS voxel grid (x, y, z) -> axial stack (z, y, x) with anterior in the top row.
        t1, gm, wm = (
            np.flip(img.get_fdata(dtype=np.float32).transpose(2, 1, 0), 1) for img in images
        )
        mask = t1 > 0  # the template is skull-stripped: exactly zero outside the brain
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask
        gm, wm = gm * mask, wm * mask

        # Axial range with a sizeable brain section (drops the vertex and the lowest
        # cerebellum/brainstem slices, which are mostly background).
        area = mask.sum(axis=(1, 2))
        usable = np.flatnonzero(area >= 0.4 * area.max())
        self.axial_range = (int(usable[0]), int(usable[-1]) + 1)
        z0, z1 = self.axial_range

        # One in-plane box for all slices (a fixed field of view, as in a real exam), grown
        # by a margin and to the aspect ratio of the target grid.
        rows = np.flatnonzero(mask[z0:z1].any(axis=(0, 2)))
        cols = np.flatnonzero(mask[z0:z1].any(axis=(0, 1)))
        centre = ((rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2)
        half = [1.08 * (rows[-1] - rows[0] + 1) / 2, 1.08 * (cols[-1] - cols[0] + 1) / 2]
        aspect = image_size[0] / image_size[1]
        half = [max(half[0], aspect * half[1]), max(half[1], half[0] / aspect)]
        box = [(round(c - h), round(c + h)) for c, h in zip(centre, half)]
        stack = np.stack([t1, csf, gm, wm], axis=1)[z0:z1]  # (Z, 4, Y, X)
        pad = [(0, 0), (0, 0)] + [
            (max(0, -a), max(0, b - n)) for (a, b), n in zip(box, stack.shape[2:])
        ]
        stack = np.pad(stack, pad)
        (r0, r1), (c0, c1) = [(a + p[0], b + p[0]) for (a, b), p in zip(box, pad[2:])]
        crop = torch.from_numpy(np.ascontiguousarray(stack[:, :, r0:r1, c0:c1]))
        # Antialiased area-like downsampling (1 mm voxels -> ~2-3 mm pixels at demo sizes).
        resampled = F.interpolate(crop, size=tuple(image_size), mode="bilinear", antialias=True)
        self._maps = resampled.clamp_(0.0, 1.0).numpy().astype(np.float64)
        self.pixel_mm = (r1 - r0) / image_size[0]

    def tissues(self, slices: np.ndarray, rng: np.random.Generator) -> Tissues:
        maps = self._maps[slices - self.axial_range[0]]
        return Tissues(t1=maps[:, 0], csf=maps[:, 1], gm=maps[:, 2], wm=maps[:, 3])


# Ellipsoids of the phantom, painted in order (later ones replace earlier ones where they
# overlap): tissue, centre (y, x, z), semi-axes (y, x, z), in-plane angle in degrees.
# Coordinates are normalised to [-1, 1] over the target grid and the axial extent; loosely
# after the 3-D Shepp-Logan head (outer CSF shell, cortex, white matter, ventricles, nuclei).
PHANTOM_ELLIPSOIDS = (
    ("csf", (0.00, 0.00, 0.00), (0.90, 0.86, 1.00), 0.0),
    ("gm", (0.01, 0.00, -0.02), (0.85, 0.81, 0.95), 0.0),
    ("wm", (0.02, 0.00, -0.02), (0.70, 0.66, 0.80), 0.0),
    ("csf", (-0.05, 0.00, 0.45), (0.80, 0.025, 0.45), 0.0),
    ("gm", (0.10, -0.32, -0.05), (0.16, 0.08, 0.18), -10.0),
    ("gm", (0.10, 0.32, -0.05), (0.16, 0.08, 0.18), 10.0),
    ("csf", (0.00, -0.15, 0.15), (0.32, 0.09, 0.25), -18.0),
    ("csf", (0.00, 0.15, 0.15), (0.32, 0.09, 0.25), 18.0),
)


class Phantom:
    """Procedural head phantom; every volume gets its own random perturbation."""

    name = "phantom"
    axial_range = (0, 128)

    def __init__(self, image_size: Tuple[int, int]):
        self.image_size = image_size
        self.pixel_mm = 200.0 / image_size[0]

    def tissues(self, slices: np.ndarray, rng: np.random.Generator) -> Tissues:
        height, width = self.image_size
        num = self.axial_range[1]
        # Axial positions from below the ventricles to high convexity slices (the poles of the
        # head hold small, mostly empty sections, as the range kept for the MNI brain).
        z = (-0.7 + 1.45 * (slices + 0.5) / num)[:, None, None]
        y = ((np.arange(height) + 0.5) / height * 2 - 1)[None, :, None]
        x = ((np.arange(width) + 0.5) / width * 2 - 1)[None, None, :]
        edge = 1.0 / max(height, width)  # half a pixel in normalised units

        ellipsoids = list(PHANTOM_ELLIPSOIDS)
        for _ in range(3):  # small random "lesions" inside the white matter
            centre = (rng.uniform(-0.45, 0.45), rng.uniform(-0.45, 0.45), rng.uniform(-0.5, 0.5))
            radius = rng.uniform(0.04, 0.09)
            tissue = str(rng.choice(["gm", "csf"]))
            ellipsoids.append((tissue, centre, (radius, radius, 1.5 * radius), 0.0))

        scale = rng.uniform(0.93, 1.0)  # head size
        tilt = np.deg2rad(rng.normal(0.0, 3.0))  # head rotation in the axial plane
        shape = (len(slices), height, width)
        fractions = {"csf": np.zeros(shape), "gm": np.zeros(shape), "wm": np.zeros(shape)}
        head = None
        for tissue, centre, axes, angle in ellipsoids:
            cy, cx, cz = np.asarray(centre) * scale + rng.normal(0.0, 0.015, 3)
            ay, ax, az = np.asarray(axes) * scale * rng.uniform(0.93, 1.07, 3)
            theta = np.deg2rad(angle + rng.normal(0.0, 4.0)) + tilt
            u = np.cos(theta) * (y - cy) - np.sin(theta) * (x - cx)
            v = np.sin(theta) * (y - cy) + np.cos(theta) * (x - cx)
            # Each slice cuts an ellipse scaled by sqrt(1 - dz^2) (negative past the poles:
            # empty). Its edge is smoothed over about a pixel of in-plane distance (partial
            # volume) in every slice, so sections near the poles stay as sharp as the others.
            section = 1.0 - ((z - cz) / az) ** 2
            section = np.sign(section) * np.sqrt(np.abs(section))
            distance = (section - np.sqrt((u / ay) ** 2 + (v / ax) ** 2)) * min(ay, ax)
            occupancy = 1.0 / (1.0 + np.exp(np.clip(-distance / edge, -50.0, 50.0)))
            # Inner structures stay inside the head (the first, outermost ellipsoid).
            head = occupancy if head is None else head
            occupancy = np.minimum(occupancy, head)
            for key in fractions:
                fractions[key] *= 1.0 - occupancy
            fractions[tissue] += occupancy
        csf, gm, wm = fractions["csf"], fractions["gm"], fractions["wm"]
        return Tissues(t1=0.12 * csf + 0.62 * gm + 0.95 * wm, csf=csf, gm=gm, wm=wm)
