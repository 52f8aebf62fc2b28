"""fastMRI's end-to-end VarNet seen through the cascade protocol, so that it can be a teacher or
a student of :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher`.

Sriram, Zbontar, Murrell, Defazio, Zitnick, Yakubova, Knoll, Johnson, "End-to-End Variational
Networks for Accelerated MRI Reconstruction", MICCAI 2020 (the model, fastMRI's
:class:`fastmri.models.VarNet`, reused as it is); the unfolded-branch training it enables is
that of Matcha et al., "SFT-KD-Recon", MIDL 2023.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import fastmri
import torch
from fastmri.models import VarNet
from torch import Tensor, nn

from .dccnn import check_inputs

__all__ = [
    "CascadedVarNet",
    "batch_low_frequencies",
    "check_varnet_inputs",
    "low_frequency_kwargs",
]

#: ``config["architecture"]`` of a :class:`CascadedVarNet` (DC-CNN configs have none).
VARNET_ARCHITECTURE = "cascaded_varnet"
_VARNET_ARGS = ("num_cascades", "sens_chans", "sens_pools", "chans", "pools", "mask_center")


def check_varnet_inputs(masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor]) -> None:
    """Check the fastMRI layout of a VarNet's inputs, with messages naming the shapes.

    ``masked_kspace`` ``(B, coils, H, W, 2)``; ``mask`` ``(B, 1, 1, W, 1)`` (fastMRI's
    sensitivity network reads the sampled centre from it per sample); ``sens_maps``, if given,
    the k-space's shape.

    Raises:
        ValueError: On any mismatch.
    """
    check_inputs(masked_kspace, mask, sens_maps, require_sens_maps=False)
    batch, _, _, width, _ = masked_kspace.shape
    if mask.ndim != 5 or mask.shape[0] != batch or mask.shape[3] != width:
        raise ValueError(
            f"a VarNet needs the mask as (B, 1, 1, W, 1) = (_, 1, 1, {width}, 1) with the batch "
            f"of the k-space ({batch}), got {tuple(mask.shape)}"
        )


class CascadedVarNet(nn.Module):
    """A :class:`fastmri.models.VarNet` exposed through the cascade protocol
    (:class:`~sftkd_fastmri.sft.CascadeModel`).

    Sriram et al., "End-to-End Variational Networks for Accelerated MRI Reconstruction",
    MICCAI 2020. The network is fastMRI's own (``self.varnet``, its parameters under the
    ``varnet.`` prefix, so a VarNet state dict loads into ``self.varnet``); this class only
    names its stages:

    * ``initial_state``: the coil maps of the sensitivity network (or the ``sens_maps``
      passed in, with ``use_given_sens_maps=True``) and the k-space estimate, starting at the
      acquired k-space;
    * ``cascade_step(i, ...)``: VarNet block ``i`` (U-Net regulariser and soft DC);
    * ``final_image``: root-sum-of-squares of the coil images, ``(B, H, W)``.

    The state is the k-space estimate and the maps concatenated along the coil axis,
    ``(B, 2 * coils, H, W, 2)``, so a student branch of
    :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher` that starts from a teacher state runs
    its blocks with the *teacher's* maps. Carrying the maps costs one copy of them per cascade
    (the state is rebuilt by concatenation), small beside a block's FFTs and U-Net. The
    student's own sensitivity network is therefore trained in the SFT stage only by branch 0
    (``train_first_student_cascade=True``, the student's own forward), as its first cascade
    is, and not at all where
    ``use_given_sens_maps=True`` and the batches carry maps (nor is the teacher's; under DDP
    :class:`~sftkd_fastmri.pl_modules.SFTModule` then turns on ``find_unused_parameters``);
    the distillation stage trains all of it.

    The model's forward is the wrapped VarNet's forward (masks converted to ``bool``), so the
    eval output of an SFT wrapper around two of these equals the plain teacher VarNet.

    After SFT, distil into fastMRI's ``VarNetModule`` (through
    :mod:`sftkd_fastmri.pl_modules.fastmri_compat`): the teacher
    ``DistillationCallback(sft_module.teacher, ...)`` (the callback calls the teacher with the
    student's own arguments, which this forward also takes) or its plain
    ``sft_module.teacher.varnet``, the student initialised with
    ``module.varnet.load_state_dict(sft_module.student.varnet.state_dict())``.

    Args:
        varnet: The network (e.g. ``VarNet(num_cascades=12)``).
        num_low_frequencies: Passed to fastMRI's sensitivity network (``None``: read the fully
            sampled centre from each mask).
        use_given_sens_maps: Use the ``sens_maps`` passed to the model (e.g. the ACS estimates
            of :class:`~sftkd_fastmri.data.DCCNNDataTransform`) instead of the sensitivity
            network's. Default ``False``: like fastMRI's VarNet, estimate them and ignore any
            given, so the model drops into pipelines that supply maps for DC-CNNs.
    """

    def __init__(
        self,
        varnet: VarNet,
        num_low_frequencies: Optional[int] = None,
        use_given_sens_maps: bool = False,
    ):
        super().__init__()
        if not isinstance(varnet, nn.Module) or not hasattr(varnet, "sens_net"):
            raise TypeError(
                f"expected a fastmri.models.VarNet (with sens_net and cascades), got "
                f"{type(varnet).__name__}"
            )
        self.varnet = varnet
        self.num_low_frequencies = num_low_frequencies
        self.use_given_sens_maps = bool(use_given_sens_maps)

    #: What a state is (SFT pairs only models whose layouts agree).
    state_layout = "k-space and coil maps (B, 2 * coils, H, W, 2)"

    @property
    def config(self) -> Dict[str, Any]:
        """What rebuilds this network (:meth:`from_config`): fastMRI ``VarNet``'s constructor
        arguments, read off its modules, and this wrapper's own, under
        ``architecture="cascaded_varnet"``. Checkpoints record it, so SFT and distillation
        checkpoints of VarNets reload, export and serve as teachers without the instances.

        Raises:
            AttributeError: the wrapped network is not laid out as fastMRI's ``VarNet``
                (another block or sensitivity model); such a network has no config.
        """
        values = self._varnet_arguments()
        if isinstance(values, str):
            raise AttributeError(values)
        return {
            "architecture": VARNET_ARCHITECTURE,
            **dict(zip(_VARNET_ARGS, values)),
            "num_low_frequencies": self.num_low_frequencies,
            "use_given_sens_maps": self.use_given_sens_maps,
        }

    def _varnet_arguments(self) -> Union[tuple, str]:
        """fastMRI VarNet's constructor arguments read off the network, or why they cannot
        be (a message)."""
        varnet = self.varnet
        try:
            unet = varnet.cascades[0].model.unet
            sens_unet = varnet.sens_net.norm_unet.unet
            return (
                len(varnet.cascades),
                int(sens_unet.chans),
                int(sens_unet.num_pool_layers),
                int(unet.chans),
                int(unet.num_pool_layers),
                bool(varnet.sens_net.mask_center),
            )
        except (AttributeError, IndexError, TypeError) as err:
            return (
                f"the wrapped {type(varnet).__name__} is not laid out as fastMRI's VarNet "
                f"({err}), so it has no config to rebuild it from"
            )

    def config_problem(self) -> Optional[str]:
        """Why this network has no :attr:`config` (``None`` when it has one)."""
        values = self._varnet_arguments()
        return values if isinstance(values, str) else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CascadedVarNet:
        """The network a :attr:`config` describes (fresh weights).

        Raises:
            ValueError: another architecture, or unknown or missing keys.
        """
        config = dict(config)
        architecture = config.pop("architecture", None)
        if architecture != VARNET_ARCHITECTURE:
            raise ValueError(f"not a {VARNET_ARCHITECTURE} config (architecture {architecture!r})")
        own = {
            k: config.pop(k) for k in ("num_low_frequencies", "use_given_sens_maps") if k in config
        }
        unknown = sorted(set(config) - set(_VARNET_ARGS))
        missing = sorted(set(_VARNET_ARGS) - set(config))
        if unknown or missing:
            raise ValueError(
                f"a {VARNET_ARCHITECTURE} config takes {', '.join(_VARNET_ARGS)}; "
                f"unknown: {unknown or 'none'}, missing: {missing or 'none'}"
            )
        return cls(VarNet(**config), **own)

    @property
    def cascades(self) -> nn.ModuleList:
        """The VarNet blocks (``self.varnet.cascades``)."""
        return self.varnet.cascades

    # -- cascade protocol -------------------------------------------------------------------
    #: The protocol's input check: :func:`check_varnet_inputs` (maps optional).
    check_inputs = staticmethod(check_varnet_inputs)

    #: :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher` passes the batch's
    #: ``num_low_frequencies`` to :meth:`initial_state` and to the forward of models that set
    #: this, as fastMRI's ``VarNetModule`` passes it to its VarNet.
    takes_num_low_frequencies = True

    def initial_state(
        self,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
        num_low_frequencies: Optional[Union[Tensor, int]] = None,
    ) -> Tensor:
        """``(B, 2 * coils, H, W, 2)``: the acquired k-space and the coil maps (the given
        ``sens_maps`` with ``use_given_sens_maps``, else the sensitivity network's, from the
        centre of ``num_low_frequencies`` columns: the argument, else the constructor's, else
        found from the mask as fastMRI does)."""
        if self.use_given_sens_maps:
            self._require_maps(sens_maps)
            maps = sens_maps
        else:
            if num_low_frequencies is None:
                num_low_frequencies = self.num_low_frequencies
            low = batch_low_frequencies(num_low_frequencies)
            maps = self.varnet.sens_net(masked_kspace, mask.bool(), low)
        return torch.cat([masked_kspace, maps], dim=1)

    @staticmethod
    def _require_maps(sens_maps: Any) -> None:
        if sens_maps is None:
            # falling back to the sensitivity network would run one that this setting never
            # trained (and gives another output than the one validated)
            raise ValueError(
                "this VarNet is built with use_given_sens_maps=True: it needs the batch's coil "
                "maps as sens_maps (B, coils, H, W, 2), and cannot stand in for a VarNet "
                "called as (masked_kspace, mask, num_low_frequencies)"
            )

    def cascade_step(
        self,
        index: int,
        state: Tensor,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
    ) -> Tensor:
        """VarNet block ``index`` on the k-space half of ``state``; the maps carry over."""
        coils = state.shape[1] // 2
        kspace, maps = state[:, :coils], state[:, coils:]
        kspace = self.varnet.cascades[index](kspace, masked_kspace, mask.bool(), maps)
        return torch.cat([kspace, maps], dim=1)

    def final_image(self, state: Tensor) -> Tensor:
        """Root-sum-of-squares image ``(B, H, W)`` of the state's k-space estimate."""
        kspace = state[:, : state.shape[1] // 2]
        return fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(kspace)), dim=1)

    def forward(
        self,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Union[Tensor, int]] = None,
        num_low_frequencies: Optional[Union[Tensor, int]] = None,
    ) -> Tensor:
        """The VarNet's reconstruction ``(B, H, W)`` (with ``use_given_sens_maps``, the given
        ``sens_maps`` replace the sensitivity network's, and are required).

        Also takes fastMRI VarNet's own arguments ``(masked_kspace, mask,
        num_low_frequencies)``: a third argument that is not a ``(B, coils, H, W, 2)`` tensor
        is the number of low frequencies, so the model can stand in for the VarNet it wraps
        (e.g. as the teacher of a ``VarNetModule`` student). ``num_low_frequencies`` given
        here overrides the constructor's.
        """
        if sens_maps is not None and not (isinstance(sens_maps, Tensor) and sens_maps.ndim == 5):
            sens_maps, num_low_frequencies = None, sens_maps
        if num_low_frequencies is None:
            num_low_frequencies = self.num_low_frequencies
        num_low_frequencies = batch_low_frequencies(num_low_frequencies)
        check_varnet_inputs(masked_kspace, mask, sens_maps)
        if not self.use_given_sens_maps:
            return self.varnet(masked_kspace, mask.bool(), num_low_frequencies)
        state = self.initial_state(masked_kspace, mask, sens_maps)  # requires the maps
        for index in range(len(self.cascades)):
            state = self.cascade_step(index, state, masked_kspace, mask)
        return self.final_image(state)

    def extra_repr(self) -> str:
        return (
            f"num_cascades={len(self.cascades)}, num_low_frequencies={self.num_low_frequencies}, "
            f"use_given_sens_maps={self.use_given_sens_maps}"
        )


def batch_low_frequencies(value: Optional[Union[Tensor, int]]) -> Optional[int]:
    """The one number of fully sampled centre columns fastMRI's VarNet takes per batch.

    A DataLoader collates fastMRI's per-sample ``num_low_frequencies`` into a ``(B,)`` tensor,
    which fastMRI's ``VarNet`` cannot read for ``B > 1``; equal values (one mask centre
    fraction and width, as in a batch of one k-space shape) become that number.

    Raises:
        ValueError: the samples of the batch differ (use batch size 1 or one centre fraction).
    """
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, Tensor):
        values = value.reshape(-1).tolist()
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        return int(value)
    if not values:
        return None
    if any(v != values[0] for v in values):
        raise ValueError(
            f"fastMRI's VarNet takes one number of low frequencies per batch; this batch mixes "
            f"{sorted(set(int(v) for v in values))} (masks with several centre fractions): use "
            "batch size 1 or one centre fraction"
        )
    return int(values[0])


def low_frequency_kwargs(model: nn.Module, num_low_frequencies: Any) -> Dict[str, Any]:
    """``num_low_frequencies`` as a keyword for a model that takes it (a VarNet), else
    nothing. Every caller that runs a network on a batch passes the batch's value through
    this, so a VarNet sees the data transform's count of centre columns in training,
    validation, SFT, distillation and evaluation alike, as fastMRI's ``VarNetModule`` gives
    it (found from the mask instead, the count differs where the mask function's is odd or
    random columns touch the centre)."""
    if num_low_frequencies is None or not getattr(model, "takes_num_low_frequencies", False):
        return {}
    return {"num_low_frequencies": num_low_frequencies}
