"""Minimal ISMRMRD XML header, as fastMRI's :class:`~fastmri.data.SliceDataset` parses it.

fastMRI reads four things from the ``ismrmrd_header`` dataset of every volume
(``SliceDataset._retrieve_metadata``): the encoded matrix size, the reconstructed matrix size
and ``encodingLimits/kspace_encoding_step_1/{center, maximum}``, from which it derives the
zero padding of the phase-encode axis W::

    padding_left  = encoded_W // 2 - center
    padding_right = padding_left + maximum + 1

Real fastMRI headers describe scanner data whose k-space was zero padded along W; synthetic
data is acquired on the full grid, so :func:`build_ismrmrd_header` chooses
``center = W // 2`` and ``maximum = W - 1``, i.e. ``(padding_left, padding_right) = (0, W)``:
no padding, every column is a real sample.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Optional, Sequence

__all__ = ["ISMRMRD_NAMESPACE", "build_ismrmrd_header"]

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"


def _sub(parent: ET.Element, tag: str, text: Optional[object] = None) -> ET.Element:
    # Clark notation "{ns}tag" keeps every element in the ISMRMRD namespace without touching
    # ElementTree's process-wide prefix registry (ET.register_namespace).
    element = ET.SubElement(parent, f"{{{ISMRMRD_NAMESPACE}}}{tag}")
    if text is not None:
        element.text = str(text)
    return element


def _xyz(parent: ET.Element, tag: str, values: Sequence[object]) -> ET.Element:
    element = _sub(parent, tag)
    for axis, value in zip(("x", "y", "z"), values):
        _sub(element, axis, value)
    return element


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int, int]:
    if len(size) != 3 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"{name} must be three positive integers (x, y, z), got {tuple(size)}")
    return int(size[0]), int(size[1]), int(size[2])


def build_ismrmrd_header(
    encoded_size: Sequence[int],
    recon_size: Sequence[int],
    *,
    encoded_fov_mm: Optional[Sequence[float]] = None,
    recon_fov_mm: Optional[Sequence[float]] = None,
    num_slices: Optional[int] = None,
) -> str:
    """Build the ISMRMRD XML header of a fully sampled Cartesian 2-D acquisition.

    ISMRMRD's x is the readout (fastMRI's k-space axis H) and y the phase encode (axis W,
    the one that gets undersampled).

    Args:
        encoded_size: ``(x, y, z)`` k-space matrix, e.g. ``(H_k, W, 1)`` where ``H_k`` includes
            readout oversampling.
        recon_size: ``(x, y, z)`` reconstructed image matrix, e.g. ``(H, W, 1)``; fastMRI
            uses ``(x, y)`` as the crop size of the target.
        encoded_fov_mm: ``(x, y, z)`` field of view of the encoded matrix in mm; defaults to
            1 mm per sample.
        recon_fov_mm: ``(x, y, z)`` field of view of the reconstruction in mm; defaults to
            1 mm per pixel.
        num_slices: if given, recorded as ``encodingLimits/slice`` (fastMRI ignores it).

    Returns:
        The XML document as a string (encode it to bytes to store it in HDF5), in the default
        namespace ``http://www.ismrm.org/ISMRMRD``. Parsed by fastMRI it gives
        ``padding_left = 0`` and ``padding_right = encoded_size[1]``.

    Raises:
        ValueError: if a size is not three positive integers.
    """
    enc = _check_size("encoded_size", encoded_size)
    rec = _check_size("recon_size", recon_size)
    enc_fov = tuple(encoded_fov_mm) if encoded_fov_mm is not None else tuple(map(float, enc))
    rec_fov = tuple(recon_fov_mm) if recon_fov_mm is not None else tuple(map(float, rec))

    root = ET.Element(f"{{{ISMRMRD_NAMESPACE}}}ismrmrdHeader")
    encoding = _sub(root, "encoding")
    encoded_space = _sub(encoding, "encodedSpace")
    _xyz(encoded_space, "matrixSize", enc)
    _xyz(encoded_space, "fieldOfView_mm", enc_fov)
    recon_space = _sub(encoding, "reconSpace")
    _xyz(recon_space, "matrixSize", rec)
    _xyz(recon_space, "fieldOfView_mm", rec_fov)

    limits = _sub(encoding, "encodingLimits")
    # center = W // 2 and maximum = W - 1 make fastMRI's padding (0, W): the whole W axis holds
    # acquired samples (see the module docstring).
    step_1 = _sub(limits, "kspace_encoding_step_1")
    _sub(step_1, "minimum", 0)
    _sub(step_1, "maximum", enc[1] - 1)
    _sub(step_1, "center", enc[1] // 2)
    if num_slices is not None:
        slice_limits = _sub(limits, "slice")
        _sub(slice_limits, "minimum", 0)
        _sub(slice_limits, "maximum", int(num_slices) - 1)
        _sub(slice_limits, "center", int(num_slices) // 2)
    _sub(encoding, "trajectory", "cartesian")

    ET.indent(root)
    return ET.tostring(
        root, encoding="unicode", xml_declaration=True, default_namespace=ISMRMRD_NAMESPACE
    )
