"""`inference_model`: an eval-only copy of a CoAtNet prepared for speed, numerically equivalent.

- BatchNorm folded into the neighbouring convolution: the pre-norm BN of an MBConv block into its 1x1
  expansion (a per-channel affine before a 1x1 conv, exact even when that conv is strided or average
  pooling sits between; not when an activation follows the pre-norm), and the BNs after the expansion
  and the depthwise conv into those convs (not when squeeze-excite sits between); the stem's BN into
  its first conv.
- Convolution + GELU (MBConv expansion and depthwise conv, the stem) and Linear + GELU (the FFN) run as
  one oneDNN kernel where torch has it (CPU, float32): GELU of the full-resolution expanded maps is a
  post-op instead of another pass over memory. Elsewhere (CUDA, bf16, tracing for export) the same
  module runs conv then GELU.
- Channels-last memory (NHWC) for every convolution: oneDNN's 1x1 and depthwise kernels run on it
  without reordering, and the Transformer stages' (B, H, W, C) views of it are contiguous. The input is
  converted once, in the stem.
- Optionally (`reuse_memory`, process-wide), malloc keeps freed activations for the next pass.
- MBConv blocks in the paper's form become `InferenceMBConv`; blocks with timm's options (an activation
  after the pre-norm, pooled input, squeeze-excite before the norm) are folded in place as far as exact.
- An MBConv block whose expanded map would exceed 24 MB runs its batch in chunks (see
  `InferenceMBConv.max_expanded_bytes`): no page faults from malloc's mmap()ed large blocks.
- Transformer blocks become `InferenceTransformer` (with oneDNN): every linear runs as a oneDNN kernel
  with its bias inside (addmm first copies the broadcast bias into its output), the output projection
  and FFN's last linear also add the residual in the kernel, and the norms' affine parameters and layer
  scale are folded into the linears next to them.
- Relative-position bias gathered once into a (heads, N, N) buffer instead of at every call
  (`FrozenPositionBias` in place of the attention's plug-in).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..device_plan import device_plan
from ..layers import LayerScale, RelativeAttention2d, SqueezeExcite
from ..utils import reuse_freed_memory
from .blocks import MBConvBlock, Mlp, Stem, TransformerBlock
from .coatnet import CoAtNet


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with bn(x) == x * scale + shift per channel, in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by bn -> one conv."""
    scale, shift = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias = nn.Parameter(bias * scale + shift)
    return fused


def fold_bn_before(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """bn followed by an unpadded 1x1 conv -> one conv (W(a x + b) = (W a) x + W b)."""
    assert conv.kernel_size == (1, 1) and conv.groups == 1
    scale, shift = _bn_affine(bn)
    fused = copy.deepcopy(conv)
    w = conv.weight[:, :, 0, 0]  # (out, in)
    fused.weight = nn.Parameter((w * scale[None, :])[:, :, None, None])
    bias = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    fused.bias = nn.Parameter(bias + w @ shift)
    return fused


def onednn_fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution/linear + pointwise kernels."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return callable(torch.ops.mkldnn._convolution_pointwise) and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def _gelu_algorithm(act: nn.Module) -> str | None:
    """oneDNN's name for `act` as a post-op ("none" is exact erf GELU), or None when it has none."""
    return act.approximate if type(act) is nn.GELU else None


def _tracing() -> bool:
    """Whether a graph is being recorded (TorchScript, ONNX, torch.export): it gets the standard ops."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def _use_onednn(module: nn.Module, x: torch.Tensor) -> bool:
    return (module.onednn and x.device.type == "cpu" and x.dtype == module.weight.dtype == torch.float32
            and not x.requires_grad and not torch.is_autocast_enabled("cpu")
            and not _tracing())


class ConvAct(nn.Module):
    """A convolution (BatchNorm already folded in) followed by an activation, as one kernel where possible.

    (B, C_in, H, W) -> (B, C_out, H', W'). `to_channels_last` converts the input's memory format first
    (the network's first convolution)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None, onednn: bool, to_channels_last: bool = False):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.act = act if act is not None else nn.Identity()
        algorithm = _gelu_algorithm(self.act) if act is not None else "none"
        # oneDNN names: attribute "gelu" with algorithm "none"/"tanh", or "none" for no post-op.
        self.post_op = ("gelu", [None], algorithm) if act is not None else ("none", [None], "")
        self.onednn = onednn and (act is None or algorithm is not None) and isinstance(self.padding, tuple)
        self.to_channels_last = to_channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if _use_onednn(self, x):
            attr, scalars, algorithm = self.post_op
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                attr, scalars, algorithm)
        return self.act(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups))

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, groups={self.groups}, act={type(self.act).__name__}, onednn={self.onednn}")


class LinearAct(nn.Module):
    """nn.Linear, optionally followed by GELU, as one oneDNN kernel where possible (its bias added in the
    kernel, not broadcast into the output first as addmm does). (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, act: nn.GELU | None, onednn: bool):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if linear.bias is not None else None
        self.act = act if act is not None else nn.Identity()
        self.post_op = ("gelu", act.approximate) if act is not None else ("none", "")
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_onednn(self, x) and x.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post_op[0], [None],
                                                      self.post_op[1])
        return self.act(F.linear(x, self.weight, self.bias))

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + linear(x) (no activation), as one kernel where possible."""
        if (self.post_op[0] == "none" and _use_onednn(self, x) and x.is_contiguous() and residual.is_contiguous()
                and residual.dtype == x.dtype):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return residual + self(x)


def _linear_with_layer_scale(linear: nn.Linear, scale: nn.Module) -> nn.Linear:
    """gamma * linear(x) as one linear (rows and bias scaled)."""
    if not isinstance(scale, LayerScale):
        return linear
    out = copy.deepcopy(linear)
    out.weight.mul_(scale.gamma[:, None])
    if out.bias is not None:
        out.bias.mul_(scale.gamma)
    return out


def _fold_norm_into_linear(norm: nn.Module, linear: nn.Linear) -> tuple[nn.Module, nn.Linear]:
    """linear(norm(x)) with the norm's per-channel affine moved into the linear: (plain norm, linear).
    LayerNorm keeps its normalization without weight and bias; an eval BatchNorm disappears."""
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        scale, shift = norm.weight, norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)
        plain = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
    elif isinstance(norm, nn.BatchNorm2d):
        (scale, shift), plain = _bn_affine(norm), nn.Identity()
    else:
        return norm, linear
    out = copy.deepcopy(linear)
    bias = out.bias if out.bias is not None else torch.zeros(out.out_features)
    out.bias = nn.Parameter(bias + out.weight @ shift, requires_grad=False)
    out.weight = nn.Parameter(out.weight * scale, requires_grad=False)
    return plain, out


class InferenceTransformer(nn.Module):
    """A TransformerBlock for inference, (B, H, W, C_in) -> (B, H', W', C_out), the same function:
    each branch's last linear and its residual add as one oneDNN kernel, the other linears fused with
    their bias (and GELU), layer scale folded into the linears, and the norms' per-channel affine folded
    into the linear after them (where no max pooling sits between; an eval BatchNorm then disappears)."""

    def __init__(self, block: TransformerBlock, onednn: bool):
        super().__init__()
        self.stride, self.pool_type = block.stride, block.pool_type
        self.shortcut = LinearAct(block.shortcut, None, onednn) if block.shortcut is not None else None
        attn = copy.deepcopy(block.attn)
        qkv = attn.qkv
        self.norm1 = block.norm1
        if self.stride == 1 or self.pool_type == "avg":  # a per-channel affine commutes with average pooling
            self.norm1, qkv = _fold_norm_into_linear(block.norm1, qkv)
        attn.qkv = LinearAct(qkv, None, onednn)
        self.proj = LinearAct(_linear_with_layer_scale(attn.proj, block.ls1), None, onednn)
        del attn.proj
        self.attn = attn
        self.norm2, fc1 = _fold_norm_into_linear(block.norm2, block.mlp.fc1)
        fuse_act = type(block.mlp.act) is nn.GELU  # oneDNN's post-op; any other activation runs after
        self.fc1 = LinearAct(fc1, block.mlp.act if fuse_act else None, onednn)
        self.mlp_act = nn.Identity() if fuse_act else block.mlp.act
        self.fc2 = LinearAct(_linear_with_layer_scale(block.mlp.fc2, block.ls2), None, onednn)

    # The same stride, pool_type and shortcut attributes as the block's.
    _pool, _shortcut = TransformerBlock._pool, TransformerBlock._shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj.add(self.attn.attend(self._pool(self.norm1(x))), self._shortcut(x))
        return self.fc2.add(self.mlp_act(self.fc1(self.norm2(x))), x)


class InferenceMBConv(nn.Module):
    """An MBConvBlock with its three BatchNorms folded and GELU fused into the convolutions.
    (B, C_in, H, W) -> (B, C_out, H/stride, W/stride), the same function as the block it was made from."""

    def __init__(self, block: MBConvBlock, onednn: bool, chunk_large_maps: bool = True):
        super().__init__()
        self.chunk_large_maps = chunk_large_maps
        self.stride, self.pool_type = block.stride, block.pool_type
        self.shortcut = block.shortcut
        self.conv1 = ConvAct(fold_bn_after(fold_bn_before(block.pre_norm, block.conv1), block.norm1), block.act, onednn)
        self.conv2 = ConvAct(fold_bn_after(block.conv2, block.norm2), block.act, onednn)
        self.se = block.se
        self.conv3 = block.conv3
        # Squeeze-excite's gate folded into the projection (per-image weights W * gate, one batched
        # matmul) instead of a multiply over the expanded map; the residual add rides along.
        self.fuse_se = onednn and type(block.se) is SqueezeExcite and block.conv3.kernel_size == (1, 1)
        if self.fuse_se and self.shortcut is not None and block.conv3.bias is not None:
            # The projection's bias moves into the shortcut conv's: the sum is the same.
            self.shortcut = copy.deepcopy(self.shortcut)
            bias = block.conv3.bias if self.shortcut.bias is None else self.shortcut.bias + block.conv3.bias
            self.shortcut.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            self.conv3 = copy.deepcopy(block.conv3)
            self.conv3.bias = None

    # The same stride, pool_type and shortcut attributes as the block's.
    _shortcut = MBConvBlock._shortcut

    # Largest expanded map (bytes) computed at once. glibc's malloc serves blocks above 32 MB with fresh
    # mmap() pages and unmaps them on free, so a larger map page-faults in anew on every pass; the batch is
    # cut into chunks below that instead (1.15-1.19x for coatnet_0 dwconv at batch 8, docs/performance.md).
    max_expanded_bytes = 24 * 2**20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        per_image = self.conv1.weight.shape[0] * H * W * x.element_size()
        chunk = max(1, self.max_expanded_bytes // per_image)
        if _tracing() or B <= chunk or not self.chunk_large_maps or x.device.type != "cpu":
            return self._forward(x)
        out = torch.cat([self._forward(part) for part in x.split(chunk)])
        return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) else out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self._shortcut(x)
        x = self.conv2(self.conv1(x))
        if self.fuse_se and not _tracing() and _channels_last(x) and _channels_last(shortcut):
            return self._gated_projection(x, shortcut)
        return shortcut + self.conv3(self.se(x))

    def _gated_projection(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """shortcut + conv3(x * gate(x)) for channels-last x (B, C, H, W): out[b] = x[b] @ (W * gate[b])^T."""
        B, C, H, W = x.shape
        se = self.se
        gate = se.fc2(se.act(se.fc1(x.mean((2, 3), keepdim=True)))).sigmoid().view(B, 1, C)
        weight = self.conv3.weight.view(self.conv3.out_channels, C) * gate  # (B, C_out, C)
        if self.conv3.bias is not None:
            shortcut = shortcut + self.conv3.bias.view(1, -1, 1, 1)
        out_c = weight.shape[1]
        rows = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view of channels-last memory
        base = shortcut.permute(0, 2, 3, 1).reshape(B, H * W, out_c)
        out = torch.baddbmm(base, rows, weight.transpose(1, 2))  # (B, H*W, C_out)
        return out.view(B, H, W, out_c).permute(0, 3, 1, 2)  # channels-last (B, C_out, H, W)


class FrozenPositionBias(nn.Module):
    """A position-bias plug-in for inference: the (heads, N, N) bias of the attention's own map size
    gathered once, other sizes still asked of the plug-in it replaces."""

    def __init__(self, position_bias: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.source = position_bias
        self.size = tuple(size)
        self.register_buffer("frozen", position_bias.bias(self.size).detach().contiguous(), persistent=False)

    def bias(self, size: tuple[int, int]) -> torch.Tensor:
        return self.frozen if tuple(size) == self.size else self.source.bias(size)


def _paper_form(block: MBConvBlock) -> bool:
    """Whether `InferenceMBConv` computes this block: BN -> conv1 -> BN, act -> conv2 -> BN, act -> SE."""
    return (isinstance(block.pre_act, nn.Identity) and not block.pool_input and not block.se_before_norm
            and all(isinstance(n, nn.BatchNorm2d) for n in (block.pre_norm, block.norm1, block.norm2)))


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last)


def _fold_stem(stem: Stem, onednn: bool, channels_last: bool) -> None:
    """Stem layers [conv, BN, GELU, conv, ...] -> [ConvAct(conv+BN, GELU), ..., ConvAct(conv)]."""
    layers, fused, i = list(stem.layers), [], 0
    while i < len(layers):
        conv = layers[i]
        act = None
        if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
            conv, i = fold_bn_after(conv, layers[i + 1]), i + 1
        if i + 1 < len(layers) and not isinstance(layers[i + 1], nn.Conv2d):
            act, i = layers[i + 1], i + 1
        fused.append(ConvAct(conv, act, onednn, to_channels_last=channels_last and not fused))
        i += 1
    stem.layers = nn.Sequential(*fused)


@torch.no_grad()
def inference_model(model: CoAtNet, channels_last: bool = True, fuse_kernels: bool = True,
                    reuse_memory: bool = False) -> CoAtNet:
    """A copy of `model` in eval mode prepared for inference (see the module docstring). Outputs equal the
    original's to about 1e-5 relative; it cannot be trained.

    `channels_last=False, fuse_kernels=False` gives a plain folded graph of standard ops (for export).
    `reuse_memory` (CPU models on glibc): also call `coatnet.utils.reuse_freed_memory()`, a process-wide
    malloc setting that stops every pass from page-faulting in its large activations again (off by default:
    it changes the whole process, and every other model in it gains as well)."""
    model = copy.deepcopy(model).eval()
    # The device-specific choices (oneDNN kernels, chunking, malloc) follow the device the model is on:
    # on CUDA none of them, torch's own kernels (cuDNN, SDPA) instead.
    device_type = next(model.parameters()).device.type
    plan = device_plan(device_type, onednn_fusion=device_type == "cpu" and onednn_fusion_available())
    if reuse_memory and plan.reuse_freed_memory:
        reuse_freed_memory()
    onednn = fuse_kernels and plan.onednn_fusion
    for stage in model.stages:
        for i, block in enumerate(stage.blocks):
            if type(block) is MBConvBlock and _paper_form(block):
                stage.blocks[i] = InferenceMBConv(block, onednn, plan.chunk_large_maps)
            elif type(block) is TransformerBlock and onednn:
                stage.blocks[i] = InferenceTransformer(block, onednn)
    for m in model.modules():
        if type(m) is Stem:
            _fold_stem(m, onednn, channels_last)
        elif type(m) is Mlp and type(m.act) is nn.GELU:
            m.fc1, m.act = LinearAct(m.fc1, m.act, onednn), nn.Identity()
        elif isinstance(m, MBConvBlock):
            # The pre-norm folds forward through average pooling (both linear), not through an activation.
            if isinstance(m.pre_act, nn.Identity):
                m.conv1, m.pre_norm = fold_bn_before(m.pre_norm, m.conv1), nn.Identity()
            m.conv1, m.norm1 = fold_bn_after(m.conv1, m.norm1), nn.Identity()
            if not m.se_before_norm:  # squeeze-excite between conv2 and norm2 blocks that fold
                m.conv2, m.norm2 = fold_bn_after(m.conv2, m.norm2), nn.Identity()
        elif isinstance(m, RelativeAttention2d):
            if m.position_bias is not None:
                m.position_bias = FrozenPositionBias(m.position_bias, m.feature_size)
    for p in model.parameters():
        p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
