"""SpineNet: a 3D ResNeXt U-Net with a ConvLSTM across sessions and CenterTrack-like heads.

The module holds the architecture only; training, inference and decoding live elsewhere. A model
is built from a plain config dict (stored in checkpoints), see :data:`PRESETS`.

Shapes (B batch, T sessions, Z, Y, X at the model's voxel size, any size; training patches are
multiples of :attr:`SpineNet.total_stride`, and other sizes cut the last blocks short)::

    x                        (B, T, 1, Z, Y, X)   normalised intensity
    out["heatmap"]           (B, T, 1, Z', Y', X')  logits of "a spine head centre is here"
    out["offset"]            (B, T, 3, Z', Y', X')  sub-voxel offset of the centre, output voxels, z y x
    out["displacement"]      (B, T, 3, Z', Y', X')  position in session t-1 minus position in t, µm
    out["size"]              (B, T, 1, Z', Y', X')  head radius, µm
    where (Z', Y', X') = ceil((Z, Y, X) / output_stride)

Each session sees its own image and the previous session's (CenterTrack: the pair lets the
displacement head compare the two), and a ConvLSTM at the coarsest level carries state from
session to session.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

#: architecture presets; "lean" is the shipped default (CPU-friendly; measurements: docs/model_report.md)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": [8, 8, 16, 16], "blocks": [1, 1, 1], "group_width": 4},
    "lean": {"widths": [16, 32, 48, 64], "blocks": [1, 1, 1], "group_width": 16},
    "base": {"widths": [24, 48, 96, 128], "blocks": [1, 2, 2], "group_width": 16},
    # lean with a second block on the two coarsest levels: more context where voxels are few; a
    # lean model grows into it (grow_config). Tried as stage 4, not shipped (docs/model_report.md,
    # "The shipped weights: how they were made")
    "deep": {"widths": [16, 32, 48, 64], "blocks": [1, 2, 2], "group_width": 16},
    # lean with a residual block at the finest level, before the head trunk: capacity where small,
    # dim heads and close pairs are told apart (the misses of low_snr and crowded); the network takes
    # ~40 % longer on a CPU. A lean model grows into it (grow_config). Tried as stage 10, not shipped
    "fine": {"widths": [16, 32, 48, 64], "blocks": [1, 1, 1], "group_width": 16, "fine_blocks": 1},
}

DEFAULTS: dict[str, Any] = {
    "in_channels": 2,  # this session + the previous one
    "stem_stride": [1, 2, 2],
    "down_strides": [[1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "lstm": True,
    "lstm_kernel": 1,  # the coarsest level already sees far; a 3x3x3 kernel there cost 20% of the time
    "bottleneck": 0.5,  # block width / output width, as in ResNeXt-50
    "head_width": 16,
    # residual blocks at the finest level of the decoder (no bottleneck: the 3x3x3 conv at full
    # width, in groups of group_width); the lean model has none: its head trunk, one plain 3x3x3
    # conv, does that level's work
    "fine_blocks": 0,
}


def build_config(preset: str = "lean", **overrides: Any) -> dict[str, Any]:
    """A complete architecture config: :data:`DEFAULTS`, then the preset, then overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model size {preset!r}; choose from {', '.join(PRESETS)}")
    config = copy.deepcopy(DEFAULTS)
    config.update(copy.deepcopy(PRESETS[preset]))
    config.update(overrides)
    config["preset"] = preset
    return config


def grow_config(config: dict[str, Any], preset: str) -> dict[str, Any]:
    """``config`` with the blocks of ``preset``, for a trained model to grow into (see
    :func:`load_grown`). Only depth can grow: the widths, strides and other settings must be the
    same, and no level may lose a block."""
    target = build_config(preset)
    grows = ("blocks", "fine_blocks", "preset")
    fixed = [key for key in target if key not in grows and target[key] != config.get(key)]
    old_fine = config.get("fine_blocks", 0)  # checkpoints from before fine blocks have none
    if fixed or len(target["blocks"]) != len(config["blocks"]) or target["fine_blocks"] < old_fine or any(
            new < old for new, old in zip(target["blocks"], config["blocks"])):
        differ = ", ".join(fixed) if fixed else (f"blocks {config['blocks']} -> {target['blocks']}, fine blocks "
                                                 f"{old_fine} -> {target['fine_blocks']}")
        raise ValueError(f"a {config.get('preset', 'custom')!r} model cannot grow into {preset!r} ({differ}): "
                         "only blocks can be added; train from scratch instead (leave out --init)")
    grown = copy.deepcopy(config)
    grown["blocks"], grown["fine_blocks"], grown["preset"] = list(target["blocks"]), target["fine_blocks"], preset
    return grown


def load_grown(net: SpineNet, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a smaller model's weights into ``net`` built from :func:`grow_config`; returns the
    names of the blocks it adds. Each added block starts as the identity (the scale of its last
    BatchNorm is zero and its input is not negative: it comes out of a ReLU, or at the finest level
    is the sum of two that do), so the grown model computes exactly what
    the smaller one did, and training starts from there (the zero-initialised residual of Goyal
    et al., 2017)."""
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    added = sorted({key.rsplit(".", 3)[0] for key in missing if key.startswith(("down.", "up.0."))})
    stray = [key for key in missing if not any(key.startswith(block + ".") for block in added)]
    if unexpected or stray:
        raise ValueError(f"weights do not fit the grown model (unexpected {unexpected[:3]}, missing {stray[:3]})")
    modules = dict(net.named_modules())
    for name in added:
        block = modules[name]
        if not isinstance(block, ResNeXtBlock) or not isinstance(block.shortcut, nn.Identity):
            raise ValueError(f"{name} is not an added residual block")
        nn.init.zeros_(block.expand[1].weight)
    return added


def _epilogue_ready(x: torch.Tensor) -> bool:
    """Whether a convolution's bias, residual and ReLU can run inside cuDNN's convolution: CUDA
    inference with cuDNN on, in a type cuDNN's fused graphs take."""
    return (x.is_cuda and not torch.is_grad_enabled() and torch.backends.cudnn.enabled
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _run_dtype(x: torch.Tensor) -> torch.dtype:
    """The type a CUDA convolution runs in: autocast's where it is on (the fused cuDNN operations
    are not on its lists, so their operands are cast here), else the input's."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        on, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    else:
        on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return dtype if on else x.dtype


def _as_dtype(module: nn.Module, conv: nn.Conv3d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv``'s weight and bias in ``dtype``, cast once and kept on ``module`` (a fused model's
    weights do not change; an in-place change bumps their version and casts them again)."""
    key = (dtype, conv.weight.device, conv.weight._version, conv.bias._version)
    cached = module.__dict__.get("_epilogue_cast")
    if cached is None or cached[0] != key:
        cached = (key, conv.weight.to(dtype), conv.bias.to(dtype))
        module.__dict__["_epilogue_cast"] = cached
    return cached[1], cached[2]


def _epilogue_failed(module: nn.Module, exc: RuntimeError) -> None:
    """A fused cuDNN convolution this cuDNN cannot run (no engine for the graph): the module goes
    back to the plain path for good. Out of memory is not that: the caller retries smaller."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        raise exc
    module.epilogue = False
    log.warning("cuDNN could not fuse a convolution's bias and ReLU (%s); running them apart",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


class ConvBNReLU(nn.Sequential):
    #: set by fuse_for_inference on those with a ReLU: on CUDA, in inference, the bias (the folded
    #: BatchNorm) and the ReLU run inside cuDNN's convolution, not as two passes over its output
    #: (the bias alone was a strided elementwise kernel after every convolution, a fifth of the
    #: GPU's work in a run; docs/model_report.md, "What limits it now")
    epilogue: bool = False

    def __init__(self, cin: int, cout: int, kernel=3, stride=1, groups: int = 1, relu: bool = True):
        padding = tuple(k // 2 for k in _triple(kernel))
        layers = [nn.Conv3d(cin, cout, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm3d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.epilogue and _epilogue_ready(x):
            conv, dtype = self[0], _run_dtype(x)
            weight, bias = _as_dtype(self, conv, dtype)
            try:
                return torch.cudnn_convolution_relu(x.to(dtype), weight, bias, conv.stride, conv.padding,
                                                    conv.dilation, conv.groups)
            except RuntimeError as exc:
                _epilogue_failed(self, exc)
        return super().forward(x)


class ResNeXtBlock(nn.Module):
    """Bottleneck: 1x1x1 reduce, grouped 3x3x3 (maybe strided), 1x1x1 expand, residual."""

    #: set by fuse_for_inference: on CUDA, in inference, the expanding convolution's bias, the
    #: residual addition and the ReLU run inside cuDNN's convolution (one pass, not three)
    epilogue: bool = False

    def __init__(self, cin: int, cout: int, stride=1, group_width: int = 8, bottleneck: float = 0.5):
        super().__init__()
        mid = max(group_width, round(cout * bottleneck))
        groups = 1 if group_width <= 0 else max(1, mid // group_width)
        self.reduce = ConvBNReLU(cin, mid, 1)
        self.grouped = ConvBNReLU(mid, mid, 3, stride, groups=groups)
        self.expand = ConvBNReLU(mid, cout, 1, relu=False)
        strided = any(s != 1 for s in _triple(stride))
        self.shortcut = (
            ConvBNReLU(cin, cout, 1, stride, relu=False) if strided or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.epilogue and _epilogue_ready(x):
            try:
                return self._forward_fused(x)
            except RuntimeError as exc:
                _epilogue_failed(self, exc)
        out = self.expand(self.grouped(self.reduce(x)))
        if torch.is_grad_enabled():
            return F.relu(out + self.shortcut(x), inplace=True)
        out += self.shortcut(x)  # inference: no new tensor (memory traffic is a third of CPU time)
        return out.relu_()

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """relu(expand(h) + shortcut(x)) as one cuDNN convolution with its bias and residual: a
        convolved shortcut runs without its bias, which joins the expanding convolution's."""
        dtype = _run_dtype(x)
        x = x.to(dtype)
        h = self.grouped(self.reduce(x))
        conv = self.expand[0]
        weight, bias = _as_dtype(self.expand, conv, dtype)
        if isinstance(self.shortcut, nn.Identity):
            z = x
        else:
            short = self.shortcut[0]
            short_weight, short_bias = _as_dtype(self.shortcut, short, dtype)
            z = F.conv3d(x, short_weight, None, short.stride, short.padding, short.dilation, short.groups)
            bias = bias + short_bias
        return torch.cudnn_convolution_add_relu(h, weight, z, 1.0, bias, conv.stride, conv.padding,
                                                conv.dilation, conv.groups)


class ConvLSTMCell(nn.Module):
    """A 3D convolutional LSTM cell; state is (h, c), each (B, C, Z, Y, X)."""

    def __init__(self, channels: int, kernel: int = 1):
        super().__init__()
        self.gates = nn.Conv3d(2 * channels, 4 * channels, kernel, padding=kernel // 2)
        with torch.no_grad():  # forget gate biased open, so state is kept from the start
            self.gates.bias.zero_()
            self.gates.bias[channels : 2 * channels].fill_(1.0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None):
        if state is None:
            state = (torch.zeros_like(x), torch.zeros_like(x))
        h, c = state
        i, f, g, o = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class SpineNet(nn.Module):
    """3D ResNeXt encoder, ConvLSTM at the coarsest level, U-Net decoder, four heads."""

    HEADS: ClassVar[dict[str, int]] = {"heatmap": 1, "offset": 3, "displacement": 3, "size": 1}

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = copy.deepcopy(config)
        widths, blocks, gw, bn = config["widths"], config["blocks"], config["group_width"], config["bottleneck"]
        strides = config["down_strides"]
        if len(widths) != len(strides) + 1 or len(blocks) != len(strides):
            raise ValueError("config needs len(widths) == len(down_strides) + 1 == len(blocks) + 1")
        self.stem = ConvBNReLU(config["in_channels"], widths[0], 3, config["stem_stride"])
        self.down = nn.ModuleList()
        for i, stride in enumerate(strides):
            layers = [ResNeXtBlock(widths[i], widths[i + 1], stride, gw, bn)]
            layers += [ResNeXtBlock(widths[i + 1], widths[i + 1], 1, gw, bn) for _ in range(blocks[i] - 1)]
            self.down.append(nn.Sequential(*layers))
        self.lstm = ConvLSTMCell(widths[-1], config["lstm_kernel"]) if config["lstm"] else None
        self.lateral = nn.ModuleList(ConvBNReLU(widths[i + 1], widths[i], 1) for i in range(len(strides)))
        # the finest level costs most (a quarter of the input's voxels): there the head trunk, one
        # plain 3x3x3 conv, does a block's job at half its cost (docs/model_report.md, "Design choices
        # measured here"); a depthwise block is cheaper still to run, but its backward pass is 20-50x
        # slower in oneDNN (untrainable on CPU)
        fine = [ResNeXtBlock(widths[0], widths[0], 1, gw, 1.0) for _ in range(config.get("fine_blocks", 0))]
        self.up = nn.ModuleList([nn.Sequential(*fine) if fine else nn.Identity()]
                                + [ResNeXtBlock(widths[i], widths[i], 1, gw, bn) for i in range(1, len(strides))])
        hw = config["head_width"]
        self.head_trunk = ConvBNReLU(widths[0], hw, 3)
        self.heads = nn.ModuleDict({name: nn.Conv3d(hw, n, 1) for name, n in self.HEADS.items()})
        with torch.no_grad():  # CenterNet prior: few voxels are centres
            self.heads["heatmap"].bias.fill_(-4.0)
        # channels-last is what oneDNN's grouped 3D convolutions need to be fast (20x on CPU)
        self.to(memory_format=torch.channels_last_3d)

    # -- geometry -------------------------------------------------------------------------
    @property
    def output_stride(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.config["stem_stride"])

    @property
    def total_stride(self) -> tuple[int, int, int]:
        total = list(self.output_stride)
        for stride in self.config["down_strides"]:
            total = [a * b for a, b in zip(total, stride)]
        return tuple(total)

    # -- forward --------------------------------------------------------------------------
    def forward_sessions(self, x: torch.Tensor, previous: torch.Tensor | None = None, state=None, *,
                         point_heads: bool = False, pairs: torch.Tensor | None = None,
                         cut_at: Sequence[Sequence[int]] | None = None, field_grid: Sequence[int] | None = None):
        """K consecutive sessions at once. Returns (outputs, state).

        ``x`` (B, K, 1, Z, Y, X); ``previous`` (B, 1, Z, Y, X), the session before them, or None
        when ``x`` starts the series (its first session is then paired with itself and its
        displacement means nothing); ``state`` the ConvLSTM state after ``previous``. Outputs are
        (B, K, C, Z', Y', X') per head. Encoder and decoder run on all B*K sessions as one batch
        (oneDNN picks its fast kernels only for batches > 1); only the ConvLSTM steps in order.

        With ``point_heads`` (inference) only the heatmap is computed at every voxel; the other
        heads are left to :meth:`heads_at`, at the few peaks, and ``outputs["trunk"]`` (B, K,
        head_width, Z', Y', X') holds the features they read.

        Sessions cut from a larger field (inference on a drifting series: each session is run on
        its own field, not on the union of all fields): ``pairs`` (B, K, 1, Z, Y, X) holds each
        session's previous session, read where this one is cut (it replaces ``previous``), and
        the ConvLSTM state covers the whole field, ``field_grid`` voxels of the coarsest level
        ((h, c), each (B, C, *field_grid); None: zeros). ``cut_at`` gives each session's place in
        it, K (z, y, x) offsets in coarsest-level voxels: a session reads and updates the state
        under its own cut only, and the state elsewhere is carried unchanged.
        """
        b, k = x.shape[:2]
        if pairs is None:
            first = x[:, :1] if previous is None else previous[:, None]
            prev = torch.cat([first, x[:, :-1]], dim=1)
        else:
            prev = pairs
        # (B*K, 2, Z, Y, X) with channels-last memory, in one copy
        pair = torch.stack([x[:, :, 0], prev[:, :, 0]], dim=-1).flatten(0, 1).permute(0, 4, 1, 2, 3)
        feats = [self.stem(pair)]
        for down in self.down:
            feats.append(down(feats[-1]))
        y = feats[-1]
        if self.lstm is not None:
            per_session = y.unflatten(0, (b, k))
            hidden = []
            for i in range(k):
                if cut_at is None:
                    h, state = self.lstm(per_session[:, i], state)
                else:
                    h, state = self._lstm_cut(per_session[:, i], state, cut_at[i], field_grid)
                hidden.append(h)
            y = torch.stack(hidden, dim=1).flatten(0, 1)
        for i in reversed(range(len(self.down))):
            y = self.up[i](_add_upsampled(feats[i], self.lateral[i](y)))
        trunk = self.head_trunk(y)
        names = ["heatmap"] if point_heads else list(self.heads)
        outputs = {name: self.heads[name](trunk).unflatten(0, (b, k)) for name in names}
        if point_heads:
            outputs["trunk"] = trunk.unflatten(0, (b, k))
        return outputs, state

    def _lstm_cut(self, features: torch.Tensor, state, offset: Sequence[int], field_grid: Sequence[int] | None):
        """One ConvLSTM step for a session cut from a larger field: ``features`` (B, C, z, y, x)
        sit at ``offset`` (coarsest-level voxels) in the field's state."""
        if state is None:
            if field_grid is None:
                raise ValueError("a cut session's first step needs the field_grid of its state")
            full = features.new_zeros((*features.shape[:2], *field_grid))
            state = (full, full.clone())
        h_field, c_field = state
        region = (slice(None), slice(None), *(slice(int(o), int(o) + n) for o, n in zip(offset, features.shape[2:])))
        if any(r.stop > n for r, n in zip(region[2:], h_field.shape[2:])):
            raise ValueError(f"a cut of {tuple(features.shape[2:])} at {tuple(offset)} leaves the state's "
                             f"field {tuple(h_field.shape[2:])}")
        h, (h_new, c_new) = self.lstm(features, (h_field[region], c_field[region]))
        if torch.is_grad_enabled():  # no in-place writes into tensors autograd may need
            h_field, c_field = h_field.clone(), c_field.clone()
        h_field[region] = h_new
        c_field[region] = c_new
        return h, (h_field, c_field)

    def heads_at(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads other than the heatmap at chosen voxels: ``features`` (P, head_width), taken
        from ``outputs["trunk"]`` of :meth:`forward_sessions`, -> {name: (P, C)}, in float32.
        Computing them at the peaks only saved a twentieth of the network's CPU time. A product and
        a sum rather than ``F.linear``: the peaks are few, and on CUDA a matrix product makes cuBLAS
        keep a workspace (32 MiB on Hopper) allocated after the run."""
        with torch.no_grad():
            features = features.float()[:, None, :]
            return {name: (features * head.weight.flatten(1).float()).sum(-1) + head.bias.float()
                    for name, head in self.heads.items() if name != "heatmap"}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, T, 1, Z, Y, X) -> dict of (B, T, C, Z', Y', X'); the series starts at x[:, 0]."""
        if x.ndim != 6:
            raise ValueError(f"expected (B, T, 1, Z, Y, X), got shape {tuple(x.shape)}")
        return self.forward_sessions(x)[0]


def _add_upsampled(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``fine + coarse`` upsampled by nearest neighbour (both (N, C, Z, Y, X), channels-last memory).

    Each coarse voxel covers a block of ``stride`` fine voxels; where a size is not a multiple of
    the stride (a strided convolution gives ``ceil(fine / stride)``), the last blocks are cut at
    the fine edge, so the network takes inputs of any size, not only multiples of its total
    stride. The upsampled tensor is never built in inference: ``coarse`` is broadcast over each
    block of ``fine`` it covers and added in place. Upsampling and adding were a fifth of the CPU
    time.
    """
    n, c, z, y, x = fine.shape
    size = fine.shape[2:]
    factors = [-(-f // k) for f, k in zip(size, coarse.shape[2:])]
    if [-(-f // s) for f, s in zip(size, factors)] != list(coarse.shape[2:]):
        raise ValueError(f"cannot upsample {tuple(coarse.shape)} onto {tuple(fine.shape)}")
    exact = [f * k for f, k in zip(factors, coarse.shape[2:])] == [z, y, x]
    last = fine.permute(0, 2, 3, 4, 1)  # a view of channels-last memory
    if not exact or not last.is_contiguous():
        if torch.is_grad_enabled():
            up = F.interpolate(coarse, scale_factor=factors, mode="nearest")
            return fine + up[:, :, :z, :y, :x]
        for oz, oy, ox in itertools.product(*(range(s) for s in factors)):
            part = fine[:, :, oz :: factors[0], oy :: factors[1], ox :: factors[2]]
            part += coarse[:, :, : part.shape[2], : part.shape[3], : part.shape[4]]
        return fine
    blocks = last.view(n, z // factors[0], factors[0], y // factors[1], factors[1], x // factors[2], factors[2], c)
    spread = coarse.permute(0, 2, 3, 4, 1)[:, :, None, :, None, :, None, :]
    if torch.is_grad_enabled():
        # on a GPU autograd's own reduction reads the gradient once; the slices up to 1.75 times
        added = _BlockAdd.apply(blocks, spread) if fine.device.type == "cpu" else blocks + spread
        return added.view(n, z, y, x, c).permute(0, 4, 1, 2, 3)
    blocks += spread
    return fine


class _BlockAdd(torch.autograd.Function):
    """``blocks + spread`` for :func:`_add_upsampled` in training: ``blocks`` (N, z, fz, y, fy, x,
    fx, C), ``spread`` (N, z, 1, y, 1, x, 1, C). The gradient of ``spread`` is the sum of each
    block's, taken as sums of the blocks' slices, one block axis at a time: on 2 CPU cores 12 ms
    where autograd's own reduction over the broadcast axes took 113 (the finest level of a batch of
    8 patches of 3 sessions), 9 % of a step's forward and backward in all (4 % of a ``train``
    step). Used on the CPU only."""

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        return blocks + spread

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad
        for axis in (2, 4, 6):
            if total.shape[axis] > 1:
                first, second, *more = total.unbind(axis)
                summed = first + second
                for part in more:
                    summed += part
                total = summed.unsqueeze(axis)
        return grad, total


def fuse_for_inference(net: SpineNet, cudnn_epilogues: bool = True) -> SpineNet:
    """Fold every BatchNorm into the convolution before it (eval mode only): same outputs, less
    memory traffic. With ``cudnn_epilogues``, on CUDA the biases, residuals and ReLUs then run
    inside cuDNN's convolutions (:func:`use_cudnn_epilogues`). Returns ``net`` itself, modified in
    place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if net.training:
        raise ValueError("fuse_for_inference needs a model in eval mode")
    for module in net.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module[1], nn.BatchNorm3d):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
    use_cudnn_epilogues(net, cudnn_epilogues)
    return net.to(memory_format=torch.channels_last_3d)


def use_cudnn_epilogues(net: SpineNet, on: bool = True) -> SpineNet:
    """On CUDA, run the biases, residual additions and ReLUs of a fused model's blocks inside cuDNN's
    convolutions (``torch.cudnn_convolution_relu`` and ``_add_relu``), or not (``on=False``; the
    benchmarks compare the two). Other devices, and training, are not affected."""
    for module in net.modules():
        if isinstance(module, ConvBNReLU):
            module.epilogue = on and len(module) == 3 and isinstance(module[1], nn.Identity)
        elif isinstance(module, ResNeXtBlock):
            module.epilogue = on and all(isinstance(part[1], nn.Identity) for part in module.modules()
                                         if isinstance(part, ConvBNReLU))
    return net


def _triple(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value, value)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
