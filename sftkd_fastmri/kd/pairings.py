"""Default (student layer, teacher layer) pairings for distilling DC-CNN into DC-CNN (and VarNet
into VarNet).

A pairing of a loss is a list of ``(student_layer, teacher_layer)`` submodule names (see
:class:`~sftkd_fastmri.kd.hooks.FeatureCapture`); element ``k`` of the student's feature list is
compared with element ``k`` of the teacher's. :data:`OUTPUT` (``""``) names the network's final
output. Defaults for DC-CNN (``cascades.{i}.cnn.conv{j}`` / ``relu{j}`` / ``cascades.{i}``, see
:mod:`sftkd_fastmri.models.dccnn`), with ``d_t, d_s`` the teacher's and student's block depths:

=============  =================================================================================
loss           default pairs (every student cascade ``i`` unless stated)
=============  =================================================================================
``at``         teacher ``cascades.{t(i)}.cnn.relu{min(2, d_t-2)}`` with student
               ``cascades.{i}.cnn.relu{min(1, d_s-2)}``: KD-MRI (Murugesan et al., MIDL 2020)
               pairs the teacher's 3rd conv activation with the student's 2nd, in every cascade
               (``relu2`` / ``relu1`` for D5 / D3).
``fitnet``     the middle cascade's output, ``cascades.{n_s // 2}`` with ``cascades.{t(n_s//2)}``
               (the 3rd of 5, as in KD-MRI's FitNets (Romero et al., ICLR 2015) setup).
``sp``, ``cc`` every cascade output ``cascades.{i}`` with ``cascades.{t(i)}``
               (Tung & Mori 2019; Peng et al. 2019 relate samples; any 4-D features
               ``(B, C, H, W)`` work, of any channel count or size).
``fsp``        per cascade two pairs, the block's first and last ReLU: student
               ``(relu0, relu{d_s-2})`` with teacher ``(relu0, relu{d_t-2})``, so the FSP
               matrices (Yim et al., CVPR 2017) are ``chans x chans`` (32 x 32 in the paper
               presets); FSP would be degenerate on the 1- or 2-channel cascade outputs.
``imitation``  the final outputs, ``[("", "")]`` (KD-MRI's output imitation).
=============  =================================================================================

Imitation compares the networks' whole outputs, on the grid the data consistency runs on (the
readout cropped to the target's height, the full phase-encoding width): where fastMRI's k-space
is wider than the target (knee: 368 vs 320 columns), the border outside the scored field of
view is imitated too, as ``|S(x) - T(x)|_1`` reads, while the reconstruction loss and the
metrics see the centre-cropped image only.

Cascade counts may differ: student cascade ``i`` of ``n_s`` is paired with the teacher cascade
at the same relative depth, ``t(i) = floor((i + 1) * n_t / n_s + 1/2) - 1`` (clamped to
``[0, n_t - 1]``; the last cascades always pair; equal counts give ``t(i) = i``). With more
student than teacher cascades, a teacher cascade serves several student cascades.

VarNet pairs (fastMRI's :class:`~fastmri.models.VarNet`, or the ``varnet`` preset whose names
carry the prefix ``varnet.``; Sriram et al., MICCAI 2020) pair the U-Net of each cascade's
regulariser, ``U = cascades.{i}.model.unet``, whose output ``(B, 2, H, W)`` is the cascade's
image-space update (the same shape in any two VarNets given the same input), with the teacher
cascade at the same relative depth:

=============  =================================================================================
``at``         ``U.down_sample_layers.{k}``, ``k = min(1, pools - 1)`` of the network with fewer
               pooling layers: the second encoder block (the first for one pool), at the same
               resolution in both networks, any channel counts.
``fitnet``     the middle cascade's ``U`` (2 channels in both: no regressor).
``sp``, ``cc`` every cascade's ``U``.
``fsp``        per cascade the U-Net's first and last full-resolution blocks,
               ``U.down_sample_layers.0`` and ``U.up_conv.{pools-1}.0`` (``chans`` channels
               each), so FSP needs equal ``chans``, as it needs equal ``chans`` for DC-CNNs.
=============  =================================================================================

Other architectures have defaults only for ``imitation``; the other losses need an explicit
mapping ``{loss: [(student_layer, teacher_layer), ...]}``. A DC-CNN paired with a VarNet has
none either: their layers have nothing in common.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..models.checkpoint import compiled_inner
from ..models.dccnn import ConvBlock, DCCNNCascade
from .hooks import find_module

__all__ = [
    "OUTPUT",
    "Pairing",
    "cascade_map",
    "check_pairing",
    "default_pairings",
    "dccnn_structure",
    "layer_channels",
    "resolve_pairings",
    "varnet_structure",
]

OUTPUT = ""
"""Layer name of the network's final output (the root module, as in ``named_modules()``)."""

Pairing = List[Tuple[str, str]]


def dccnn_structure(model: nn.Module) -> Optional[Tuple[int, int]]:
    """``(num_cascades, depth)`` if ``model`` is a DC-CNN (duck-typed, also compiled with
    ``torch.compile``), else ``None``."""
    cascades = getattr(compiled_inner(model), "cascades", None)
    if not isinstance(cascades, nn.ModuleList) or len(cascades) == 0:
        return None
    if not all(isinstance(c, DCCNNCascade) for c in cascades):
        return None
    depths = {c.cnn.depth for c in cascades}
    if len(depths) != 1:
        return None
    return len(cascades), depths.pop()


def varnet_structure(model: nn.Module) -> Optional[Tuple[str, int, int]]:
    """``(prefix, num_cascades, pools)`` if ``model`` is fastMRI's VarNet (``prefix`` ``""``)
    or holds one as ``model.varnet`` (``"varnet."``, the ``varnet`` preset), duck-typed and
    also compiled; else ``None``."""
    from fastmri.models.unet import Unet

    inner = compiled_inner(model)
    names = {id(m): n for n, m in inner.named_modules()}
    for net in (getattr(inner, "varnet", None), inner):
        cascades = getattr(net, "cascades", None)
        if not isinstance(cascades, nn.ModuleList) or len(cascades) == 0:
            continue
        unets = [getattr(getattr(c, "model", None), "unet", None) for c in cascades]
        if not all(isinstance(u, Unet) for u in unets) or id(cascades) not in names:
            continue
        pools = {u.num_pool_layers for u in unets}
        if len(pools) == 1:  # the registered name of the cascades, e.g. "varnet.cascades"
            return names[id(cascades)][: -len("cascades")], len(cascades), pools.pop()
    return None


def _varnet_pairings(
    loss: str, student: Tuple[str, int, int], teacher: Tuple[str, int, int]
) -> Optional[Pairing]:
    """The VarNet defaults of the module docstring (``None`` for a loss without one)."""
    (p_s, n_s, pools_s), (p_t, n_t, pools_t) = student, teacher
    tmap = cascade_map(n_s, n_t)

    def unet(prefix: str, i: int) -> str:
        return f"{prefix}cascades.{i}.model.unet"

    if loss == "at":
        k = min(1, min(pools_s, pools_t) - 1)
        return [
            (
                f"{unet(p_s, i)}.down_sample_layers.{k}",
                f"{unet(p_t, tmap[i])}.down_sample_layers.{k}",
            )
            for i in range(n_s)
        ]
    if loss == "fitnet":
        i = n_s // 2
        return [(unet(p_s, i), unet(p_t, tmap[i]))]
    if loss in ("sp", "cc"):
        return [(unet(p_s, i), unet(p_t, tmap[i])) for i in range(n_s)]
    if loss == "fsp":
        pairs: Pairing = []
        for i in range(n_s):
            s, t = unet(p_s, i), unet(p_t, tmap[i])
            pairs.append((f"{s}.down_sample_layers.0", f"{t}.down_sample_layers.0"))
            pairs.append((f"{s}.up_conv.{pools_s - 1}.0", f"{t}.up_conv.{pools_t - 1}.0"))
        return pairs
    return None


def cascade_map(num_student: int, num_teacher: int) -> List[int]:
    """Teacher cascade index for each student cascade, at the same relative depth.

    ``t(i) = floor((i + 1) * n_t / n_s + 1/2) - 1``, clamped to ``[0, n_t - 1]``.

    Example:
        >>> cascade_map(5, 5), cascade_map(3, 5), cascade_map(5, 3)
        ([0, 1, 2, 3, 4], [1, 2, 4], [0, 0, 1, 1, 2])
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"cascade counts must be >= 1, got {num_student} and {num_teacher}")
    return [
        min(num_teacher - 1, max(0, math.floor((i + 1) * num_teacher / num_student + 0.5) - 1))
        for i in range(num_student)
    ]


def default_pairings(loss: str, student: nn.Module, teacher: nn.Module) -> Pairing:
    """Default ``(student_layer, teacher_layer)`` pairs of ``loss`` (see the module docstring).

    Args:
        loss: A loss name (``"at"``, ``"fitnet"``, ``"fsp"``, ``"sp"``, ``"cc"``,
            ``"imitation"``).
        student: The student network.
        teacher: The teacher network.

    Raises:
        ValueError: If there is no default for this loss and these architectures (the message
            says how to give the layers explicitly).
    """
    if loss == "imitation":
        return [(OUTPUT, OUTPUT)]
    s_struct, t_struct = dccnn_structure(student), dccnn_structure(teacher)
    s_varnet, t_varnet = varnet_structure(student), varnet_structure(teacher)
    if s_varnet is not None and t_varnet is not None:
        pairs = _varnet_pairings(loss, s_varnet, t_varnet)
        if pairs is not None:
            return pairs
    if s_struct is None or t_struct is None:
        raise ValueError(
            f"no default layer pairing for KD loss {loss!r} between student "
            f"{type(student).__name__} and teacher {type(teacher).__name__} (defaults exist for "
            "DC-CNN pairs, VarNet pairs, and 'imitation' for any model); pass "
            f"layers={{{loss!r}: [(student_layer, teacher_layer), ...]}} with names from "
            "model.named_modules() (on the command line: --layers "
            f'\'{{"{loss}": [["student_layer", "teacher_layer"]]}}\', or the layers key '
            "of a config)"
        )
    (n_s, d_s), (n_t, d_t) = s_struct, t_struct
    tmap = cascade_map(n_s, n_t)
    if loss == "at":
        j_s, j_t = min(1, d_s - 2), min(2, d_t - 2)
        return [
            (f"cascades.{i}.cnn.relu{j_s}", f"cascades.{tmap[i]}.cnn.relu{j_t}") for i in range(n_s)
        ]
    if loss == "fitnet":
        i = n_s // 2
        return [(f"cascades.{i}", f"cascades.{tmap[i]}")]
    if loss in ("sp", "cc"):
        return [(f"cascades.{i}", f"cascades.{tmap[i]}") for i in range(n_s)]
    if loss == "fsp":
        pairs: Pairing = []
        for i in range(n_s):
            t = tmap[i]
            pairs.append((f"cascades.{i}.cnn.relu0", f"cascades.{t}.cnn.relu0"))
            pairs.append((f"cascades.{i}.cnn.relu{d_s - 2}", f"cascades.{t}.cnn.relu{d_t - 2}"))
        return pairs
    raise ValueError(
        f"no default layer pairing for KD loss {loss!r}; pass "
        f"layers={{{loss!r}: [(student_layer, teacher_layer), ...]}}"
    )


def check_pairing(loss: str, pairs: object) -> Pairing:
    """Validate a user-given pairing of ``loss`` (lists from YAML are accepted).

    Returns:
        The pairs as ``(student_layer, teacher_layer)`` tuples.

    Raises:
        ValueError: If ``pairs`` is not a non-empty list of pairs of names.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(
            f"layers[{loss!r}] must be a non-empty list of (student_layer, teacher_layer) "
            f"pairs, got {pairs!r}"
        )
    out: Pairing = []
    for k, pair in enumerate(pairs):
        if (
            isinstance(pair, str)
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(n, str) for n in pair)
        ):
            raise ValueError(
                f"layers[{loss!r}][{k}] must be a (student_layer, teacher_layer) pair of "
                f"names, got {pair!r}"
            )
        out.append((pair[0], pair[1]))
    return out


def resolve_pairings(
    losses: Iterable[str],
    student: nn.Module,
    teacher: nn.Module,
    layers: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
) -> Dict[str, Pairing]:
    """Pairings for each loss: the explicit ``layers`` entry if given, else the default.

    Every name is checked against ``student`` / ``teacher`` here, so a typo fails before
    training starts.

    Args:
        losses: Loss names.
        student: The student network.
        teacher: The teacher network.
        layers: Optional overrides ``{loss: [(student_layer, teacher_layer), ...]}``.

    Returns:
        ``{loss: [(student_layer, teacher_layer), ...]}`` for every loss in ``losses``.

    Raises:
        ValueError: If ``layers`` names a loss not in ``losses``, is malformed, or a loss has
            no default (see :func:`default_pairings`).
        KeyError: If a layer name does not exist (listing similar names).
    """
    losses = list(losses)
    layers = dict(layers or {})
    stray = sorted(set(layers) - set(losses))
    if stray:
        raise ValueError(
            f"layers given for {stray} which are not among the losses {losses}; "
            "remove them or add the losses"
        )
    resolved: Dict[str, Pairing] = {}
    for loss in losses:
        if loss in layers:
            pairs = check_pairing(loss, layers[loss])
        else:
            pairs = default_pairings(loss, student, teacher)
        for s_name, t_name in pairs:
            find_module(student, s_name, "student")
            find_module(teacher, t_name, "teacher")
        resolved[loss] = pairs
    return resolved


def layer_channels(model: nn.Module, name: str) -> int:
    """Channel count of the ``(B, C, H, W)`` output of layer ``name`` of ``model``.

    * a convolution: its ``out_channels``;
    * a parameter-free module (ReLU, dropout, ...) or a normalisation layer: the channels of the
      nearest preceding convolution among its siblings (its parent's children in order);
    * a DC-CNN cascade or the DC-CNN itself: its image channels (``in_chans``, 1 or 2);
    * a DC-CNN :class:`~sftkd_fastmri.models.ConvBlock`: its output channels.

    Used to build FitNet's 1x1 regressors before training, so the optimiser sees them.

    Raises:
        KeyError: If the layer does not exist.
        ValueError: If the channel count cannot be inferred statically (give FitNet's
            ``student_channels`` / ``teacher_channels`` in the loss options instead).
    """
    module = find_module(model, name)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
        return module.out_channels
    if isinstance(module, DCCNNCascade):
        return module.cnn.conv0.in_channels
    if isinstance(module, ConvBlock):
        return getattr(module, f"conv{module.depth - 1}").out_channels
    if dccnn_structure(module) is not None and isinstance(
        getattr(compiled_inner(module), "in_chans", None), int
    ):
        return compiled_inner(module).in_chans
    parameter_free = not any(True for _ in module.parameters())
    if name and (parameter_free or _is_norm(module)):
        parent_name, _, child = name.rpartition(".")
        parent = find_module(model, parent_name)
        siblings = list(parent.named_children())
        index = [n for n, _ in siblings].index(child)
        for _, previous in reversed(siblings[:index]):
            if isinstance(previous, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
                return previous.out_channels
    raise ValueError(
        f"cannot infer the channel count of layer {name!r} ({type(module).__name__}) of "
        f"{type(model).__name__}; pass student_channels / teacher_channels in the FitNet "
        "loss options"
    )


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
