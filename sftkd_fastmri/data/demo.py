"""Offline demo data: fastMRI-layout HDF5 splits built from real brain anatomy.

:func:`write_demo_data` writes small single- and multi-coil datasets that fastMRI's
:class:`~fastmri.data.SliceDataset` reads unchanged, so the whole pipeline runs with no data
download and no network (CI included).

Anatomy (``backend``):

* ``"nilearn"``: axial slices of the MNI152 T1 template and its grey/white-matter
  probability maps, shipped inside the nilearn package (the ``demo`` extra) and read from
  local files; nothing is downloaded.
* ``"phantom"``: a procedural 3-D ellipsoid phantom (Shepp-Logan-like, with tissue classes),
  randomly perturbed per volume; needs nothing beyond numpy.
* ``"auto"``: nilearn when importable, else the phantom with a warning.

Every volume is a contiguous stack of axial slices; train, val and test volumes come from
disjoint, interleaved ranges of the axial index (stored as the ``source_slices`` attribute).
Each volume gets a contrast (T1-, T2-, FLAIR- or PD-like, synthesised from the tissue maps
with random weights), a smooth random phase per slice and, for multi-coil data, smooth coil
sensitivities normalised to ``sum_c |S_c|^2 = 1``. k-space is the centred orthonormal FFT
(``fastmri.fft2c``) of the image zero padded to ``readout_oversampling x H`` along the readout,
plus complex Gaussian noise; targets are computed from the stored k-space.

Folder layout under ``out_dir`` (``{challenge}_{split}``, as fastMRI)::

    singlecoil_train/  singlecoil_val/  singlecoil_test/  singlecoil_test_full/
    multicoil_train/   multicoil_val/   multicoil_test/   multicoil_test_full/
    demo_info.json     (manifest: configuration, backend, file lists)

* ``*_train``, ``*_val``: fully sampled k-space ``(slices, H_k, W)`` (single-coil) or
  ``(slices, coils, H_k, W)`` (multi-coil), complex64, with targets ``reconstruction_esc`` /
  ``reconstruction_rss`` ``(slices, H, W)`` float32 and attributes ``max``, ``norm``,
  ``acquisition``, ``patient_id``.
* ``*_test`` mimics fastMRI's public test/challenge files: no target, k-space already
  undersampled along W (zeros on unsampled columns), a ``mask`` dataset ``(W,)`` and attributes
  ``acceleration`` and ``num_low_frequency``.
* ``*_test_full`` holds the SAME test volumes (same file names) fully sampled and with targets:
  the held-out split for reporting metrics on demo data. fastMRI has no such folder.

Size: the defaults (80 x 64 images, 160-sample readout, 4 coils; train 4 x 10, val 2 x 6,
test 2 x 6 slices) write 20 files, about 7 MB single-coil and 26 MB multi-coil (k-space is
complex64 and noisy, so compression would save little; it is stored uncompressed, as fastMRI).

Re-running: files are written atomically (temporary file + ``os.replace``), so an
interrupted run never leaves a partial ``.h5``. With ``overwrite=False``, a folder written
with the same configuration is completed (existing files are kept, missing ones written);
a different configuration, or ``.h5`` files this writer did not make, raise
:class:`FileExistsError`. ``overwrite=True`` rewrites every demo file and removes demo files
of an earlier configuration; files this writer did not make are never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
from tqdm.auto import tqdm

from .._io import atomic_write_text
from .datasets import TARGET_KEYS
from .demo_anatomy import MNIBrain, Phantom, nilearn_available
from .demo_simulation import _simulate_kspace, _target, _test_mask, _volume_image
from .ismrmrd import build_ismrmrd_header

__all__ = [
    "BACKENDS",
    "CHALLENGES",
    "FOLDER_SPLITS",
    "CONTRASTS",
    "MANIFEST_NAME",
    "SPLITS",
    "TARGET_KEYS",
    "TEST_FULL_SPLIT",
    "DemoDataInfo",
    "write_demo_data",
]

logger = logging.getLogger(__name__)

CHALLENGES = ("singlecoil", "multicoil")
SPLITS = ("train", "val", "test")
TEST_FULL_SPLIT = "test_full"
FOLDER_SPLITS = (*SPLITS, TEST_FULL_SPLIT)
MANIFEST_NAME = "demo_info.json"
BACKENDS = ("auto", "nilearn", "phantom")
# Contrast name -> fastMRI-style ``acquisition`` attribute (fastMRI brain uses AXT1, AXT2,
# AXFLAIR; AXPD follows the same pattern).
CONTRASTS = {"T1": "AXT1", "T2": "AXT2", "FLAIR": "AXFLAIR", "PD": "AXPD"}
DEFAULT_VOLUMES_PER_SPLIT = {"train": 4, "val": 2, "test": 2}
DEFAULT_SLICES_PER_VOLUME = {"train": 10, "val": 6, "test": 6}

_FORMAT_VERSION = 1
_FILE_PREFIX = "file_demo_"
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class DemoDataInfo:
    """What :func:`write_demo_data` wrote.

    Attributes:
        root: the output folder.
        backend: anatomy actually used, ``"nilearn"`` or ``"phantom"``.
        split_dirs: folder name (e.g. ``"singlecoil_train"``) -> path, for every folder.
        num_volumes: split (``"train"``, ``"val"``, ``"test"``, ``"test_full"``) -> volumes.
        num_slices: split -> total slices.
        image_size: ``(H, W)`` of targets and reconstructions.
        kspace_size: ``(H_k, W)`` of k-space, ``H_k = readout_oversampling * H``.
        num_coils: coils of the multi-coil data.
        seed: the seed.
        files_written: ``.h5`` files written by this call.
        files_kept: complete ``.h5`` files found and kept (not rewritten).
        manifest: path of ``demo_info.json``.
    """

    root: Path
    backend: str
    split_dirs: Dict[str, Path]
    num_volumes: Dict[str, int]
    num_slices: Dict[str, int]
    image_size: Tuple[int, int]
    kspace_size: Tuple[int, int]
    num_coils: int
    seed: int
    files_written: int
    files_kept: int
    manifest: Path

    def split_dir(self, challenge: str, split: str) -> Path:
        """Folder of ``challenge`` (``"singlecoil"``/``"multicoil"``) and ``split``."""
        return self.split_dirs[f"{challenge}_{split}"]


@dataclass(frozen=True)
class _Volume:
    split: str
    index: int  # global index, unique across splits (names files like fastMRI's file ids)
    contrast: str
    source_slices: np.ndarray  # (slices,) axial indices into the anatomy source

    def file_name(self, anatomy: str) -> str:
        return f"{_FILE_PREFIX}{anatomy}_{CONTRASTS[self.contrast]}_{self.index:03d}.h5"


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class _Config:
    """Validated options of :func:`write_demo_data` (the manifest stores them)."""

    seed: int
    image_size: Tuple[int, int]
    readout_oversampling: int
    num_coils: int
    volumes: Dict[str, int]
    slices: Dict[str, int]
    contrasts: Tuple[str, ...]
    noise_std: float
    test_acceleration: int
    test_center_fraction: float
    challenges: Tuple[str, ...]
    backend: str  # resolved: "nilearn" or "phantom"

    @property
    def kspace_height(self) -> int:
        return self.readout_oversampling * self.image_size[0]

    def kspace_shape(self, volume: _Volume, challenge: str) -> Tuple[int, ...]:
        coils = (self.num_coils,) if challenge == "multicoil" else ()
        return (len(volume.source_slices), *coils, self.kspace_height, self.image_size[1])

    def to_json(self) -> dict:
        return {
            "format_version": _FORMAT_VERSION,
            "seed": self.seed,
            "backend": self.backend,
            "image_size": list(self.image_size),
            "kspace_size": [self.kspace_height, self.image_size[1]],
            "readout_oversampling": self.readout_oversampling,
            "num_coils": self.num_coils,
            "volumes_per_split": dict(self.volumes),
            "slices_per_volume": dict(self.slices),
            "contrasts": list(self.contrasts),
            "noise_std": self.noise_std,
            "test_acceleration": self.test_acceleration,
            "test_center_fraction": self.test_center_fraction,
            "challenges": list(self.challenges),
        }


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _per_split(value: Union[int, Mapping[str, int], None], default: Mapping[str, int], name: str):
    if value is None:
        value = default
    if _is_int(value, 1):
        value = {split: int(value) for split in SPLITS}
    if (
        not isinstance(value, Mapping)
        or set(value) != set(SPLITS)
        or not all(_is_int(v, 1) for v in value.values())
    ):
        raise ValueError(
            f"{name} must be a positive int or a mapping of {SPLITS} to positive ints, "
            f"got {value!r}"
        )
    return {split: int(value[split]) for split in SPLITS}


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "phantom":
        return backend
    if nilearn_available():
        return "nilearn"
    if backend == "nilearn":
        raise ImportError(
            "backend='nilearn' needs nilearn (the `demo` extra): pip install 'sftkd_fastmri[demo]'"
        )
    warnings.warn(
        "nilearn (the `demo` extra: pip install 'sftkd_fastmri[demo]') is not installed: the "
        "demo data uses the procedural phantom fallback instead of MNI152 brain anatomy",
        UserWarning,
        stacklevel=3,
    )
    return "phantom"


def _validated_config(options: dict) -> _Config:
    size = tuple(options["image_size"])
    if len(size) != 2 or not all(_is_int(s, 8) for s in size):
        raise ValueError(f"image_size must be (H, W), ints >= 8, got {options['image_size']!r}")
    for name, minimum in (("seed", 0), ("readout_oversampling", 1), ("num_coils", 1)):
        if not _is_int(options[name], minimum):
            raise ValueError(f"{name} must be an int >= {minimum}, got {options[name]!r}")
    contrasts = tuple(options["contrasts"])
    if not contrasts or any(c not in CONTRASTS for c in contrasts):
        raise ValueError(
            f"contrasts must be a non-empty subset of {tuple(CONTRASTS)}, got {contrasts}"
        )
    challenges = tuple(dict.fromkeys(options["challenges"]))
    if not challenges or any(c not in CHALLENGES for c in challenges):
        raise ValueError(f"challenges must be a non-empty subset of {CHALLENGES}, got {challenges}")
    if not options["noise_std"] >= 0:
        raise ValueError(f"noise_std must be >= 0, got {options['noise_std']!r}")
    if not _is_int(options["test_acceleration"], 1) or not 0 < options["test_center_fraction"] < 1:
        raise ValueError(
            "test_acceleration must be an int >= 1 and test_center_fraction in (0, 1), got "
            f"{options['test_acceleration']!r}, {options['test_center_fraction']!r}"
        )
    return _Config(
        seed=int(options["seed"]),
        image_size=(int(size[0]), int(size[1])),
        readout_oversampling=int(options["readout_oversampling"]),
        num_coils=int(options["num_coils"]),
        volumes=_per_split(
            options["volumes_per_split"], DEFAULT_VOLUMES_PER_SPLIT, "volumes_per_split"
        ),
        slices=_per_split(
            options["slices_per_volume"], DEFAULT_SLICES_PER_VOLUME, "slices_per_volume"
        ),
        contrasts=contrasts,
        noise_std=float(options["noise_std"]),
        test_acceleration=int(options["test_acceleration"]),
        test_center_fraction=float(options["test_center_fraction"]),
        challenges=challenges,
        backend=_resolve_backend(options["backend"]),
    )


def _plan(cfg: _Config, axial_range: Tuple[int, int], anatomy: str) -> List[_Volume]:
    """Assign disjoint contiguous slice stacks to every volume.

    Volumes of all splits are interleaved along the axial axis (each split spread evenly over
    it, so every split sees the whole brain) and separated by gaps of at least one slice.
    Contrasts cycle over the volumes of each split.
    """
    specs = [(split, i) for split in SPLITS for i in range(cfg.volumes[split])]
    order = sorted(specs, key=lambda s: ((s[1] + 0.5) / cfg.volumes[s[0]], SPLITS.index(s[0])))
    length = axial_range[1] - axial_range[0]
    total = sum(cfg.volumes[s] * cfg.slices[s] for s in SPLITS)
    spacing = length // (total + len(specs))
    if spacing < 1:
        raise ValueError(
            f"{total} slices in {len(specs)} volumes need {total + len(specs)} axial positions "
            f"(slices plus one gap per volume), but the {anatomy} anatomy has {length}; "
            "use fewer volumes or slices per volume"
        )
    gap = (length - total * spacing) / len(specs)
    position = axial_range[0] + gap / 2
    stacks = {}
    for split, i in order:
        stacks[(split, i)] = int(round(position)) + spacing * np.arange(cfg.slices[split])
        position += cfg.slices[split] * spacing + gap
    return [
        _Volume(split, index, cfg.contrasts[i % len(cfg.contrasts)], stacks[(split, i)])
        for index, (split, i) in enumerate(specs)
    ]


def _file_contents(
    kspace: np.ndarray, header: bytes, volume: _Volume, challenge: str, split: str, cfg: _Config
) -> Tuple[Dict[str, np.ndarray], Dict[str, object]]:
    """Datasets and attributes of one file; ``split == "test"`` gives fastMRI's test layout."""
    attrs = {
        "acquisition": CONTRASTS[volume.contrast],
        "patient_id": f"demo_s{cfg.seed}_{volume.index:03d}",
        "contrast": volume.contrast,
        "source_slices": volume.source_slices,
        "demo_backend": cfg.backend,
        "demo_seed": cfg.seed,
    }
    if split == "test":
        mask, num_low = _test_mask(cfg, volume)
        datasets = {"kspace": kspace * mask, "mask": mask, "ismrmrd_header": header}
        attrs.update(acceleration=cfg.test_acceleration, num_low_frequency=num_low)
    else:
        target = _target(kspace, challenge, cfg.image_size[0])
        datasets = {"kspace": kspace, TARGET_KEYS[challenge]: target, "ismrmrd_header": header}
        attrs.update(max=float(target.max()), norm=float(np.linalg.norm(target)))
    return datasets, attrs


def _header(cfg: _Config, volume: _Volume, pixel_mm: float) -> bytes:
    (height, width), kspace_height = cfg.image_size, cfg.kspace_height
    return build_ismrmrd_header(
        (kspace_height, width, 1),
        (height, width, 1),
        encoded_fov_mm=(kspace_height * pixel_mm, width * pixel_mm, 1.0),
        recon_fov_mm=(height * pixel_mm, width * pixel_mm, 1.0),
        num_slices=len(volume.source_slices),
    ).encode("utf-8")


# --------------------------------------------------------------------------- writing


def _write_h5_atomic(path: Path, datasets: Mapping[str, np.ndarray], attrs: Mapping) -> None:
    """Write to a hidden temporary file in the same folder, then rename: a crash leaves either
    the old file or the new one, never a partial ``.h5`` that looks valid."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with h5py.File(tmp, "w-") as hf:
            for key, value in datasets.items():
                hf.create_dataset(key, data=value)
            hf.attrs.update(dict(attrs))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


#: Each demo file records a digest of the configuration that wrote it, so a run resumed
#: after an interrupted ``overwrite`` never keeps a file of the earlier configuration.
CONFIG_ATTR = "sftkd_demo_config"


def _config_digest(cfg: _Config) -> str:
    text = json.dumps(cfg.to_json(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_complete(
    path: Path, keys: Sequence[str], kspace_shape: Tuple[int, ...], digest: str
) -> bool:
    try:
        with h5py.File(path, "r") as hf:
            return (
                all(k in hf for k in keys)
                and hf["kspace"].shape == kspace_shape
                and hf.attrs.get(CONFIG_ATTR) == digest
            )
    except (OSError, KeyError):
        return False


def _write_volume(root: Path, volume: _Volume, anatomy, cfg: _Config, overwrite: bool):
    """Write one volume's files (every challenge; test volumes to ``*_test_full`` and
    ``*_test``), keeping complete ones unless ``overwrite``. Returns (written, kept)."""
    splits = (TEST_FULL_SPLIT, "test") if volume.split == "test" else (volume.split,)
    image, written, kept = None, 0, 0
    digest = _config_digest(cfg)
    for challenge in cfg.challenges:
        todo = []
        for split in splits:
            path = root / f"{challenge}_{split}" / volume.file_name(anatomy.name)
            keys = (
                "kspace",
                "ismrmrd_header",
                "mask" if split == "test" else TARGET_KEYS[challenge],
            )
            shape = cfg.kspace_shape(volume, challenge)
            if overwrite or not _is_complete(path, keys, shape, digest):
                todo.append((split, path))
        kept += len(splits) - len(todo)
        if not todo:
            continue
        if image is None:  # shared by both challenges: same anatomy, contrast and phase
            image = _volume_image(anatomy, volume, cfg)
        kspace = _simulate_kspace(image, volume, challenge, cfg)
        for split, path in todo:
            header = _header(cfg, volume, anatomy.pixel_mm)
            datasets, attrs = _file_contents(kspace, header, volume, challenge, split, cfg)
            _write_h5_atomic(path, datasets, {**attrs, CONFIG_ATTR: digest})
            written += 1
    return written, kept


def _read_manifest(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FileExistsError(
            f"{path}: unreadable demo manifest ({err}); pass overwrite=True or use another folder"
        ) from err


def _write_json_atomic(path: Path, content: dict) -> None:
    # _io's writer names its temporary by host and process, and the next write removes one
    # a failed write left
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


def _check_previous(root: Path, config: dict, overwrite: bool) -> None:
    """Refuse to mix configurations (a manifest that differs, or demo files without one)."""
    if overwrite or not root.is_dir():
        return
    previous = _read_manifest(root / MANIFEST_NAME)
    if previous is None:
        strays = sorted(root.glob(f"*_*/{_FILE_PREFIX}*.h5"))
        if strays:
            raise FileExistsError(
                f"{root} holds demo files but no {MANIFEST_NAME} (e.g. {strays[0]}), so they "
                "cannot be checked against this configuration; pass overwrite=True or choose "
                "another out_dir"
            )
    elif previous.get("config") != config:
        raise FileExistsError(
            f"{root} holds demo data of another configuration ({root / MANIFEST_NAME}); pass "
            "overwrite=True to replace it or choose another out_dir"
        )


def _is_ours(name: str) -> Tuple[bool, bool]:
    """(temporary file of this writer, demo volume of this writer) for an entry name."""
    temporary = name.startswith(f".{_FILE_PREFIX}") and name.endswith(_TMP_SUFFIX)
    return temporary, name.startswith(_FILE_PREFIX) and name.endswith(".h5")


def _check_folder(folder: Path, expected: Sequence[str], overwrite: bool) -> None:
    """Refuse entries of a split folder that this configuration would not write: fastMRI's
    SliceDataset reads every entry, so demo data never shares a folder with other files."""
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        temporary, volume = _is_ours(entry.name)
        if not (temporary or entry.name in expected or (overwrite and volume)):
            raise FileExistsError(
                f"{entry}: not a file of this demo configuration; SliceDataset reads every "
                f"entry of {folder}, so move it or use another out_dir"
                + ("" if overwrite or not volume else " (or pass overwrite=True)")
            )


def _clean_folder(folder: Path, expected: Sequence[str], overwrite: bool, keep: bool) -> None:
    """Remove our stale temporary files and, with ``overwrite``, demo volumes not in
    ``expected``; remove the folder if it ends up empty and is not ``keep``."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        temporary, volume = _is_ours(entry.name)
        if temporary or (overwrite and volume and entry.name not in expected):
            entry.unlink()
    if not keep and not any(folder.iterdir()):
        folder.rmdir()


def write_demo_data(
    out_dir: Union[str, os.PathLike],
    *,
    seed: int = 0,
    image_size: Tuple[int, int] = (80, 64),
    readout_oversampling: int = 2,
    num_coils: int = 4,
    volumes_per_split: Union[int, Mapping[str, int], None] = None,
    slices_per_volume: Union[int, Mapping[str, int], None] = None,
    contrasts: Sequence[str] = tuple(CONTRASTS),
    noise_std: float = 0.01,
    test_acceleration: int = 4,
    test_center_fraction: float = 0.08,
    challenges: Sequence[str] = CHALLENGES,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> DemoDataInfo:
    """Write fastMRI-layout demo splits (layout in the module docstring).

    Args:
        out_dir: output folder; split folders ``{challenge}_{split}`` are created inside.
        seed: every random choice derives from it: the same seed gives identical arrays, a
            different seed different data (the anatomical slices of each split stay the same).
        image_size: target ``(H, W)``; non-square on purpose by default.
        readout_oversampling: k-space height ``H_k = readout_oversampling * H``; the extra
            field of view is background, so cropping the image back to ``H`` is exact
            (as fastMRI's 640-sample readouts for 320-pixel images).
        num_coils: coils of the multi-coil data.
        volumes_per_split: volumes per split, an int for all or a mapping with keys
            ``"train"``, ``"val"``, ``"test"``; default ``{"train": 4, "val": 2, "test": 2}``.
        slices_per_volume: slices per volume, likewise; default ``{"train": 10, "val": 6,
            "test": 6}``.
        contrasts: contrasts cycled over the volumes of each split, keys of ``CONTRASTS``
            (``"T1"``, ``"T2"``, ``"FLAIR"``, ``"PD"``).
        noise_std: std of the complex k-space noise relative to the RMS of the volume's
            noiseless k-space (``0`` for none).
        test_acceleration: acceleration of the ``*_test`` masks (fastMRI's
            :class:`~fastmri.data.subsample.EquispacedMaskFractionFunc`).
        test_center_fraction: fully sampled centre fraction of the ``*_test`` masks.
        challenges: ``"singlecoil"`` and/or ``"multicoil"``.
        backend: ``"nilearn"`` (MNI152 anatomy shipped with nilearn), ``"phantom"``
            (procedural), or ``"auto"`` (nilearn if importable, else phantom with a warning).
        overwrite: rewrite every demo file, accepting a different configuration; demo files
            of the earlier configuration are removed.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`DemoDataInfo` with folders, backend and counts.

    Raises:
        ValueError: invalid options, or more slices than the anatomy has axial positions.
        ImportError: ``backend="nilearn"`` without nilearn installed.
        FileExistsError: without ``overwrite``, ``out_dir`` holds demo data of another
            configuration; with or without it, a split folder holds files this writer did
            not make.
    """
    cfg = _validated_config(
        dict(
            seed=seed,
            image_size=image_size,
            readout_oversampling=readout_oversampling,
            num_coils=num_coils,
            volumes_per_split=volumes_per_split,
            slices_per_volume=slices_per_volume,
            contrasts=contrasts,
            noise_std=noise_std,
            test_acceleration=test_acceleration,
            test_center_fraction=test_center_fraction,
            challenges=challenges,
            backend=backend,
        )
    )
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; expected a folder to write the demo data into")
    _check_previous(root, cfg.to_json(), overwrite)
    anatomy = (MNIBrain if cfg.backend == "nilearn" else Phantom)(cfg.image_size)
    plan = _plan(cfg, anatomy.axial_range, anatomy.name)

    folders = {}
    for challenge in cfg.challenges:
        for split in FOLDER_SPLITS:
            source = "test" if split == TEST_FULL_SPLIT else split
            folders[f"{challenge}_{split}"] = [
                v.file_name(anatomy.name) for v in plan if v.split == source
            ]
    # Check every folder before touching any, so a refusal leaves everything as it was.
    for name, members in folders.items():
        _check_folder(root / name, members, overwrite)
    for challenge in CHALLENGES:
        for split in FOLDER_SPLITS:
            name = f"{challenge}_{split}"
            # Folders of a challenge not asked for lose only earlier demo volumes (overwrite).
            _clean_folder(root / name, folders.get(name, ()), overwrite, keep=name in folders)
            if name in folders:
                (root / name).mkdir(parents=True, exist_ok=True)
    manifest = {
        "generator": f"{__name__}.write_demo_data",
        "complete": False,  # set once every file exists: a killed run is resumed, not trusted
        "config": cfg.to_json(),
        "source_slices": {v.file_name(anatomy.name): v.source_slices.tolist() for v in plan},
        "folders": folders,
    }
    _write_json_atomic(root / MANIFEST_NAME, manifest)

    written = kept = 0
    with tqdm(plan, desc="demo volumes", unit="volume", disable=not progress) as bar:
        for volume in bar:
            counts = _write_volume(root, volume, anatomy, cfg, overwrite)
            written, kept = written + counts[0], kept + counts[1]
    manifest["complete"] = True
    _write_json_atomic(root / MANIFEST_NAME, manifest)
    logger.info("demo data (%s) in %s: %d files written, %d kept", cfg.backend, root, written, kept)

    volumes = {**cfg.volumes, TEST_FULL_SPLIT: cfg.volumes["test"]}
    slices = {**cfg.slices, TEST_FULL_SPLIT: cfg.slices["test"]}
    return DemoDataInfo(
        root=root,
        backend=cfg.backend,
        split_dirs={name: root / name for name in folders},
        num_volumes=volumes,
        num_slices={split: volumes[split] * slices[split] for split in volumes},
        image_size=cfg.image_size,
        kspace_size=(cfg.kspace_height, cfg.image_size[1]),
        num_coils=cfg.num_coils,
        seed=cfg.seed,
        files_written=written,
        files_kept=kept,
        manifest=root / MANIFEST_NAME,
    )
