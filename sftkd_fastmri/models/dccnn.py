"""DC-CNN: a deep cascade of CNN blocks interleaved with data-consistency layers.

Schlemper et al., "A Deep Cascade of Convolutional Neural Networks for Dynamic MR Image
Reconstruction", IEEE TMI 2018. The notation DxCy (x convolutions per block, y cascades) and
the paper presets follow Matcha et al., "SFT-KD-Recon: Learning a Student-friendly Teacher for
Knowledge Distillation in Magnetic Resonance Image Reconstruction", MIDL 2023.

Every intermediate tensor that knowledge distillation may want is the output of a named
submodule, so forward hooks can read it without a second copy of the network:

* ``cascades.{i}.cnn.conv{j}`` - the j-th convolution of cascade i (pre-activation);
* ``cascades.{i}.cnn.relu{j}`` - its ReLU activation (all but the last convolution);
* ``cascades.{i}.cnn`` - the block output (before the residual and DC);
* ``cascades.{i}`` - the cascade output (after DC), ``(B, C, H, W)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import fastmri
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from .conv import BlockConv2d
from .data_consistency import DataConsistency, complex_to_channels, sens_reduce

__all__ = [
    "BlockReLU",
    "ConvBlock",
    "DCCNN",
    "DCCNNCascade",
    "KEEPS_OUTPUT",
    "OUTPUT_ONLY_HOOK",
    "check_inputs",
    "output_only_hook",
]


#: Attribute that marks a forward hook as reading only its module's output (not the inputs):
#: such hooks on a block's ReLU still let it run in place (see :meth:`ConvBlock.forward`).
OUTPUT_ONLY_HOOK = "_sftkd_reads_output_only"
#: Attribute (on a module class or instance) promising that no layer after the module modifies
#: its output in place, so KD gradient taps may pass a view of it on
#: (:mod:`sftkd_fastmri.kd.deferred`): a block's ReLUs and convolutions.
KEEPS_OUTPUT = "kd_output_kept"


def output_only_hook(hook: Callable) -> Callable:
    """Mark a forward hook ``hook(module, args, output)`` as not reading ``args``.

    A block's ReLU observed only by such hooks still overwrites the convolution output in place
    (its input and output are then the same tensor). Returns ``hook``.
    """
    setattr(hook, OUTPUT_ONLY_HOOK, True)
    return hook


class BlockReLU(nn.ReLU):
    """The ReLU of a :class:`ConvBlock`: ``nn.ReLU`` whose block may request the in-place form
    for one call (``relu(x, True)``); hooks registered on it work as on ``nn.ReLU``.

    Its output is consumed by the block's next convolution alone, so the gradient arriving at
    it is that convolution's fresh input gradient (plus, summed by autograd into a fresh
    tensor, any loss on the activation): :attr:`fresh_output_gradient` lets gradient taps
    (:func:`sftkd_fastmri.kd.deferred.tap_feature`) add into it in place.
    """

    fresh_output_gradient = True
    #: Its output is read, never overwritten (:data:`KEEPS_OUTPUT`).
    kd_output_kept = True

    def forward(self, input: Tensor, inplace: bool = False) -> Tensor:  # noqa: A002
        return F.relu(input, inplace=inplace or self.inplace)


class ConvBlock(nn.Module):
    """``depth`` 3x3 convolutions with bias, ReLU after all but the last, no normalisation.

    Channels: ``in_chans -> chans -> ... -> chans -> in_chans``. The convolutions are
    :class:`~sftkd_fastmri.models.conv.BlockConv2d` (``nn.Conv2d`` with a faster weight gradient
    on the CPU; same parameters and state-dict keys). Submodules are named
    ``conv0 .. conv{depth-1}`` and ``relu0 .. relu{depth-2}`` (separate modules, so each
    activation can be hooked).
    """

    def __init__(self, in_chans: int, chans: int, depth: int):
        super().__init__()
        if depth < 2:
            raise ValueError(f"a block needs at least 2 convolutions, got depth={depth}")
        self.depth = depth
        widths = [in_chans] + [chans] * (depth - 1) + [in_chans]
        for j in range(depth):
            conv = BlockConv2d(widths[j], widths[j + 1], 3, padding=1)
            # Nothing overwrites an observed convolution's output (its ReLU then runs out of
            # place, see forward) nor a ReLU's (the next convolution reads it): KD gradient
            # taps may pass a view of either on.
            setattr(conv, KEEPS_OUTPUT, True)
            self.add_module(f"conv{j}", conv)
            if j < depth - 1:
                self.add_module(f"relu{j}", BlockReLU())

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W) -> (B, in_chans, H, W)``.

        Where nothing observes a convolution's output (no hook on the convolution, no global
        module hook) and its ReLU is observed at most by output-only forward hooks
        (:func:`output_only_hook`, as the distillation feature capture registers), the ReLU
        overwrites the convolution's output in place, which the convolution's backward does
        not need: one full-size activation less to allocate and write per layer. Otherwise
        every layer keeps its own output, as the submodule names promise.
        """
        for j in range(self.depth):
            conv = getattr(self, f"conv{j}")
            x = conv(x)
            if j < self.depth - 1:
                relu = getattr(self, f"relu{j}")
                if isinstance(relu, BlockReLU):
                    x = relu(x, _unobserved(conv) and _unobserved(relu, output_hooks_ok=True))
                else:  # a block pickled whole by an older version holds nn.ReLU modules
                    x = relu(x)
        return x


_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _unobserved(module: nn.Module, output_hooks_ok: bool = False) -> bool:
    """No hook can see the module's tensors: no global module hooks, no pre- or backward hooks
    of the module, and no forward hooks (or, with ``output_hooks_ok``, only output-only ones)."""
    forward_hooks = module._forward_hooks.values()
    return (
        all(getattr(hook, OUTPUT_ONLY_HOOK, False) and output_hooks_ok for hook in forward_hooks)
        and not module._forward_pre_hooks
        and not getattr(module, "_backward_hooks", None)
        and not getattr(module, "_backward_pre_hooks", None)
        and not any(getattr(_nn_module, name, None) for name in _GLOBAL_HOOK_DICTS)
    )


class DCCNNCascade(nn.Module):
    """One cascade: CNN block (optionally residual, optionally zero-padded) followed by DC.

    Args:
        chans_in: image channels, 1 or 2.
        chans: hidden channels of the block.
        depth: convolutions per block.
        residual: add the block output to its input (Schlemper) or replace it (the
            SFT-KD-Recon authors' code).
        dc_mode: ``"hard"`` or ``"soft"``.
        pad: zero-padding in pixels around the image before the block, cropped back after it
            (the authors' code pads by 5).
    """

    def __init__(
        self,
        chans_in: int,
        chans: int,
        depth: int,
        residual: bool = True,
        dc_mode: str = "hard",
        pad: int = 0,
        init_lambda: float = 1.0,
    ):
        super().__init__()
        self.residual = residual
        self.pad = pad
        self.cnn = ConvBlock(chans_in, chans, depth)
        self.dc = DataConsistency(chans_in, dc_mode, init_lambda)

    def forward(
        self, image: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor]
    ) -> Tensor:
        """``(B, C, H, W)`` image -> ``(B, C, H, W)`` data-consistent image."""
        x = F.pad(image, [self.pad] * 4) if self.pad else image
        x = self.cnn(x)
        if self.pad:
            x = x[..., self.pad : -self.pad, self.pad : -self.pad]
        if self.residual:
            x = image + x
        return self.dc(x, masked_kspace, mask, sens_maps)


class DCCNN(nn.Module):
    """Deep cascade of CNNs with data consistency (DC-CNN, Schlemper et al., IEEE TMI 2018).

    Works on fastMRI k-space, single-coil or multi-coil (SENSE data consistency with given
    coil sensitivities). The forward pass returns the magnitude image, like fastMRI's VarNet.

    It also implements the cascade protocol used by :mod:`sftkd_fastmri.sft`:
    :meth:`initial_state`, :attr:`cascades`, :meth:`cascade_step`, :meth:`final_image`.

    Args:
        num_cascades: number of cascades (the "C" of DxCy).
        depth: convolutions per cascade block (the "D" of DxCy).
        chans: hidden channels.
        in_chans: 2 = complex image as (real, imag) channels; 1 = real image (the imaginary
            part is dropped after every DC, as in the SFT-KD-Recon authors' code).
        residual: residual blocks (Schlemper) or plain replacement (authors' code).
        dc_mode: ``"hard"`` or ``"soft"`` data consistency.
        pad: zero padding around the image before each block.
        init_lambda: initial soft-DC weight.
    """

    def __init__(
        self,
        num_cascades: int = 5,
        depth: int = 5,
        chans: int = 32,
        in_chans: int = 2,
        residual: bool = True,
        dc_mode: str = "hard",
        pad: int = 0,
        init_lambda: float = 1.0,
    ):
        super().__init__()
        for name, value, low in (
            ("num_cascades", num_cascades, 1),
            ("depth", depth, 2),
            ("chans", chans, 1),
            ("pad", pad, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(residual, bool):
            raise ValueError(f"residual must be true or false, got {residual!r}")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans not in (1, 2):
            raise ValueError(f"in_chans must be 1 or 2, got {in_chans!r}")
        if (
            isinstance(init_lambda, bool)
            or not isinstance(init_lambda, (int, float))
            or not 0 < init_lambda < math.inf
        ):  # NaN fails too: every output would be NaN
            raise ValueError(f"init_lambda must be a finite number > 0, got {init_lambda!r}")
        self.config: Dict[str, Any] = dict(
            num_cascades=num_cascades,
            depth=depth,
            chans=chans,
            in_chans=in_chans,
            residual=residual,
            dc_mode=dc_mode,
            pad=pad,
            init_lambda=init_lambda,
        )
        self.in_chans = in_chans
        self.cascades = nn.ModuleList(
            DCCNNCascade(in_chans, chans, depth, residual, dc_mode, pad, init_lambda)
            for _ in range(num_cascades)
        )

    # -- cascade protocol -------------------------------------------------------------------
    @property
    def state_layout(self) -> str:
        """What a state is (SFT pairs only models whose layouts agree)."""
        return f"image (B, {self.in_chans}, H, W)"

    def initial_state(
        self, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor] = None
    ) -> Tensor:
        """Zero-filled (SENSE-combined) image ``(B, C, H, W)``."""
        del mask  # the acquired k-space is already zero where unsampled
        return complex_to_channels(
            sens_reduce(fastmri.ifft2c(masked_kspace), sens_maps), self.in_chans
        )

    def cascade_step(
        self,
        index: int,
        state: Tensor,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
    ) -> Tensor:
        """Advance the image ``state`` through cascade ``index`` (block + DC)."""
        return self.cascades[index](state, masked_kspace, mask, sens_maps)

    def final_image(self, state: Tensor) -> Tensor:
        """Magnitude image ``(B, H, W)`` of a state ``(B, C, H, W)``."""
        if state.shape[1] == 1:
            return state[:, 0].abs()
        return fastmri.complex_abs(state.permute(0, 2, 3, 1))

    # -- forward --------------------------------------------------------------------------
    def forward_state(
        self, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor] = None
    ) -> Tensor:
        """Run every cascade and return the final state ``(B, C, H, W)``."""
        check_inputs(masked_kspace, mask, sens_maps)
        state = self.initial_state(masked_kspace, mask, sens_maps)
        for i in range(len(self.cascades)):
            state = self.cascade_step(i, state, masked_kspace, mask, sens_maps)
        return state

    def forward(
        self, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor] = None
    ) -> Tensor:
        """Args:
            masked_kspace: ``(B, coils, H, W, 2)`` acquired k-space (coils = 1: single-coil).
            mask: broadcastable to the k-space (e.g. ``(B, 1, 1, W, 1)``).
            sens_maps: ``(B, coils, H, W, 2)``; required when coils > 1.

        Returns:
            ``(B, H, W)`` magnitude image.
        """
        return self.final_image(self.forward_state(masked_kspace, mask, sens_maps))

    def extra_repr(self) -> str:
        c = self.config
        return f"D{c['depth']}C{c['num_cascades']}, chans={c['chans']}, in_chans={c['in_chans']}"


def _check_mask(mask: Tensor, masked_kspace: Tensor) -> None:
    """The mask must broadcast to the k-space without enlarging it, and be the same for every
    coil: a 4-D batch of masks ``(B, 1, W, 1)`` (fastMRI's single-coil masks, collated) would
    otherwise be read with its batch axis on the coil axis."""
    expected = "expected (B, 1, 1, W, 1), (1, 1, 1, W, 1) or (B, 1, H, W, 1)"
    try:
        shape = torch.broadcast_shapes(mask.shape, masked_kspace.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to k-space "
            f"{tuple(masked_kspace.shape)}; {expected}"
        ) from err
    padded = (1,) * (5 - mask.dim()) + tuple(mask.shape)
    if shape != masked_kspace.shape or mask.dim() > 5 or padded[1] != 1:
        hint = ""
        if mask.dim() == 4 and mask.shape[0] == masked_kspace.shape[0] and mask.shape[0] > 1:
            hint = " (a batch of single-coil fastMRI masks: add the coil axis, mask.unsqueeze(1))"
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit k-space "
            f"{tuple(masked_kspace.shape)}: it must broadcast to it without enlarging it and "
            f"hold one mask for all coils; {expected}{hint}"
        )


def check_inputs(
    masked_kspace: Tensor,
    mask: Tensor,
    sens_maps: Optional[Tensor],
    *,
    require_sens_maps: bool = True,
) -> None:
    """Check the fastMRI layout of a cascade model's inputs, with messages naming the shapes.

    ``masked_kspace`` ``(B, coils, H, W, 2)``; ``mask`` broadcastable to it (e.g.
    ``(B, 1, 1, W, 1)``); ``sens_maps`` the k-space's shape, required when ``coils > 1``
    unless ``require_sens_maps=False`` (a model that estimates them).

    Raises:
        ValueError: On any mismatch.
    """
    if masked_kspace.ndim != 5 or masked_kspace.shape[-1] != 2:
        raise ValueError(
            "masked_kspace must be (B, coils, H, W, 2) (coils = 1 for single-coil), "
            f"got {tuple(masked_kspace.shape)}"
        )
    _check_mask(mask, masked_kspace)
    if sens_maps is not None and sens_maps.shape != masked_kspace.shape:
        raise ValueError(
            f"sens_maps {tuple(sens_maps.shape)} must match k-space {tuple(masked_kspace.shape)}"
        )
    if require_sens_maps and sens_maps is None and masked_kspace.shape[1] != 1:
        raise ValueError(
            f"k-space has {masked_kspace.shape[1]} coils: multi-coil data need sens_maps"
        )
