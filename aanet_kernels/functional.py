"""Functional attention-augmented convolution (Bello et al., 2019), built on ``attention_2d``.

``aa_conv2d`` computes the layer (README, "AAConv2d") from explicit weights; the module
``aanet_kernels.nn.AAConv2d`` holds those weights and calls it. The helpers here are public
because users of SAM-style relative positions need them too (``resize_rel_table``,
``sam_relative_logits``) or want to feed ``attention_2d`` from their own projections
(``split_heads``).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from aanet_kernels._checks import (
    autocast_mixes,
    check_dense,
    check_feature_map,
    check_map_size,
    conv_output_grid,
    is_int,
)
from aanet_kernels.ops import attention_2d
from aanet_kernels.relative import relative_logits

_IntPair = int | tuple[int, int]


def resize_rel_table(table: Tensor, length: int) -> Tensor:
    """Resize a relative-position table ``(n, d)`` to ``(length, d)`` by linear interpolation.

    The rule of SAM / ViTDet's ``get_rel_pos``: ``F.interpolate(mode="linear",
    align_corners=False)`` along the offsets. A table of ``2 * n - 1`` rows for offsets
    ``-(n - 1) .. n - 1`` resized to ``2 * m - 1`` rows keeps offset 0 at the centre row and the
    extreme offsets near the ends. Returns ``table`` itself when it already has ``length`` rows.
    """
    if not isinstance(table, Tensor):
        raise TypeError(f"table: expected a torch.Tensor, got {type(table).__name__}")
    check_dense("table", table)
    if table.dim() != 2 or min(table.shape) < 1:
        raise ValueError(
            f"table: expected a 2-D tensor (n, d) with n, d >= 1, got shape {tuple(table.shape)}"
        )
    if not table.is_floating_point():
        raise TypeError(f"table: expected a floating dtype, got {table.dtype}")
    # numbers.Integral: NumPy integers too, as for the map sizes elsewhere.
    if (
        not isinstance(length, int | numbers.Integral | torch.SymInt)
        or isinstance(length, bool)
        or length < 1
    ):
        raise ValueError(f"length: expected a positive int, got {length!r}")
    length = length if isinstance(length, int | torch.SymInt) else int(length)
    # Traced, the length may be symbolic (torch.export's SymInt; under Dynamo it even passes for
    # an int): comparing it with the table's rows would pin the map to its nominal size, so a
    # traced call always interpolates, which at equal sizes gives the table's values.
    traced = isinstance(length, torch.SymInt) or torch.compiler.is_compiling()
    if not traced and table.shape[0] == length:
        return table
    resized = F.interpolate(table.t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t()


def sam_relative_logits(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """The bias tables of SAM / ViTDet's decomposed relative positions, for ``attention_2d``.

    SAM's image encoder adds ``q_i . rel_pos_h[iy - y + H - 1] + q_i . rel_pos_w[ix - x + W - 1]``
    to the logits of key ``(y, x)`` (``add_decomposed_rel_pos``): tables indexed by query minus
    key, where :func:`relative_logits` (Bello et al.) indexes by key minus query, so the same tables
    reversed along the offsets. Tables of another length than ``2 * size - 1`` are resized first,
    as SAM's ``get_rel_pos`` does. Pass SAM's *unscaled* queries here and its scale to
    ``attention_2d(..., scale=head_dim ** -0.5)``, which multiplies ``q . k`` only.
    """
    height, width = check_map_size(height, width)
    rel_h = resize_rel_table(rel_pos_h, 2 * height - 1).flip(0)
    rel_w = resize_rel_table(rel_pos_w, 2 * width - 1).flip(0)
    return relative_logits(q, rel_h, rel_w, height, width)


def split_heads(qkv: Tensor, dk: int, dv: int, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views ``q, k (B, Nh, L, dk / Nh)``, ``v (B, Nh, L, dv / Nh)`` of ``qkv (B, 2dk + dv, H, W)``.

    No data is copied: channel ``c = head * d_head + d`` of position ``l = y * W + x``. With a
    ``channels_last`` ``qkv`` the views have a contiguous last dim; with a contiguous (NCHW) one
    their last dim has stride ``L``. ``attention_2d`` takes either.
    """
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    # Checked here: a zero depth gave empty heads, a negative or float one torch.split's message.
    for name, depth in (("dk", dk), ("dv", dv)):
        if not is_int(depth) or depth < 1:
            raise ValueError(f"{name}: expected a positive int, got {depth!r}")
    dk, dv = int(dk), int(dv)
    if qkv.dim() != 4 or qkv.shape[1] != 2 * dk + dv:
        raise ValueError(
            f"qkv: expected shape (B, 2 * dk + dv, H, W) = (B, {2 * dk + dv}, H, W), "
            f"got {tuple(qkv.shape)}"
        )
    num_heads = _check_heads(dk, dv, num_heads)
    flat = qkv.flatten(2)  # (B, C, L): a view in both NCHW and channels_last layouts
    q, k, v = flat.split([dk, dk, dv], dim=1)

    def heads(t: Tensor) -> Tensor:
        return t.unflatten(1, (num_heads, t.shape[1] // num_heads)).transpose(-1, -2)

    return heads(q), heads(k), heads(v)


def merge_heads(out: Tensor, height: int, width: int, channels_last: bool) -> Tensor:
    """``(B, Nh, L, dvh) -> (B, Nh * dvh, height, width)``, in the memory format asked for."""
    batch, heads, _, dvh = out.shape
    if channels_last:
        # contiguous(), not reshape: with dvh == 1 the reshape is a view whose strides are NCHW's.
        merged = out.permute(0, 2, 1, 3).contiguous().view(batch, height, width, heads * dvh)
        return merged.permute(0, 3, 1, 2)
    return out.transpose(-1, -2).reshape(batch, heads * dvh, height, width)


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` is ``channels_last`` and not also contiguous (C == 1 or H == W == 1 counts as
    NCHW), read from the strides: under ``vmap`` ``is_contiguous`` takes no other memory format."""
    expected = 1
    for dim in (1, 3, 2, 0):  # the order of channels_last strides, innermost first
        if x.shape[dim] != 1:
            if x.stride(dim) != expected:
                return False
            expected *= x.shape[dim]
    return not x.is_contiguous()


def _check_heads(dk: int, dv: int, num_heads: int, origin: str = "") -> int:
    """Raise unless ``num_heads`` is a positive int (a NumPy one too) dividing ``dk`` and ``dv``;
    return it as an int."""
    if not is_int(num_heads) or num_heads < 1:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    num_heads = int(num_heads)
    for name, size in (("dk", dk), ("dv", dv)):
        if size % num_heads:
            raise ValueError(f"{name} = {size}{origin} does not divide by num_heads = {num_heads}")
    return num_heads


def _check_tensor(
    name: str,
    t: object,
    shape: tuple[int | None, ...],
    expected: str,
    x: Tensor,
    optional: bool = False,
) -> None:
    """Raise unless ``t`` is a tensor of ``shape`` (``None``: any size >= 1) of ``x``'s device
    and dtype (another floating one under autocast), or ``None`` where ``optional``;
    ``expected`` spells the shape out for the message.

    The device too, because ``F.conv2d`` of a CPU input with a meta weight returns uninitialised
    CPU memory rather than refusing it (torch 2.11 and 2.14); the dtype, because its error for
    a mismatch ("expected scalar type Double but found Float") names no argument."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name}: expected {what}, got {type(t).__name__}")
    fits = t.dim() == len(shape) and all(
        size >= 1 if want is None else size == want
        for size, want in zip(t.shape, shape, strict=True)
    )
    if not fits:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    if t.dtype != x.dtype and not autocast_mixes(x, t):
        raise TypeError(
            f"{name}: expected dtype {x.dtype} (the dtype of x; another floating dtype only "
            f"under autocast), got {t.dtype}"
        )


def aa_conv2d(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
    *,
    num_heads: int,
    stride: _IntPair = 1,
    padding: _IntPair | str = 0,
    dilation: _IntPair = 1,
    backend: str = "auto",
) -> Tensor:
    """Attention-augmented convolution: ``concat([conv(x), attention(x)], dim=1)``.

    Args:
        x: ``(B, Cin, H, W)``.
        conv_weight, conv_bias: the k x k convolution, ``(Fout - dv, Cin, kh, kw)`` and
            ``(Fout - dv,)``.
        qkv_weight, qkv_bias: the 1x1 projection to ``[q | k | v]``, ``(2 dk + dv, Cin, 1, 1)``.
        out_weight, out_bias: the 1x1 output projection of the merged heads, ``(dv, dv, 1, 1)``.
        rel_h, rel_w: relative embeddings ``(2 h0 - 1, dkh)`` and ``(2 w0 - 1, dkh)`` for some
            nominal attention grid ``h0 x w0``, or both ``None`` for attention without position.
            They are resized with ``resize_rel_table`` to the actual grid when it differs.
        num_heads: ``Nh``; ``dk`` and ``dv`` (read from the weights) must divide by it.
        stride, padding, dilation: of the k x k convolution, as in ``F.conv2d``.
        backend: passed to ``attention_2d``.

    Attention runs on the convolution's output grid ``Ho x Wo`` (so the two halves concatenate).
    When that differs from ``H x W`` (stride > 1), ``x`` is first area-averaged to it with
    ``F.adaptive_avg_pool2d``, which for stride ``s`` and sizes divisible by ``s`` is exactly the
    ``s x s`` average pooling Bello et al. use when downsampling. Attending at the output grid
    costs ``s**4`` times fewer logits than attending at the input grid and pooling afterwards,
    and unlike a strided 1x1 projection it does not drop ``1 - 1 / s**2`` of the pixels.

    The paper scales ``q`` by ``dkh ** -0.5`` before both ``q . k`` and the relative logits. Here
    ``q`` stays an unscaled view of the projection (no copy): ``attention_2d`` applies the scale
    to ``q . k`` (``scale=``) and the small tables are scaled instead, since
    ``(s q) . r == q . (s r)``.

    Layout and copies: ``q``, ``k``, ``v`` are views of the projection (``split_heads``); the
    merged heads and the output follow ``x``'s memory format (``channels_last`` in, out). Eager
    mode copies twice: merging the heads (``dv`` channels, before the output projection) and
    ``torch.cat`` of the two halves, since a convolution cannot write into a channel slice of a
    preallocated output. Under autocast everything runs in the autocast dtype; the bias tables are
    cast to ``q``'s dtype because ``attention_2d`` takes one dtype.

    Returns:
        ``(B, Fout, Ho, Wo)``: the convolution's ``Fout - dv`` channels, then attention's ``dv``.
    """
    check_feature_map(x)
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    cin = x.shape[1]
    _check_tensor(
        "conv_weight", conv_weight, (None, cin, None, None), "(Fout - dv, Cin, kh, kw), Cin from x",
        x,
    )  # fmt: skip
    _check_tensor("conv_bias", conv_bias, conv_weight.shape[:1], "(Fout - dv,)", x, optional=True)
    _check_tensor("out_weight", out_weight, (None, None, 1, 1), "(dv, dv, 1, 1)", x)
    # int(): plain ints for the head split and the scale, also when TorchScript tracing hands
    # sizes over as tensors (weight shapes are fixed, so nothing dynamic is lost).
    dv = int(out_weight.shape[0])
    _check_tensor("out_weight", out_weight, (dv, dv, 1, 1), "(dv, dv, 1, 1)", x)  # square
    _check_tensor(
        "qkv_weight", qkv_weight, (None, cin, 1, 1), "(2 * dk + dv, Cin, 1, 1), Cin from x", x
    )
    dk2 = int(qkv_weight.shape[0]) - dv
    if dk2 < 2 or dk2 % 2:
        raise ValueError(
            f"qkv_weight: expected shape (2 * dk + dv, Cin, 1, 1) with dv = {dv} (from out_weight) "
            f"and dk >= 1, got {tuple(qkv_weight.shape)}"
        )
    dk = dk2 // 2
    num_heads = _check_heads(dk, dv, num_heads, " (from the weights)")
    dkh = dk // num_heads
    rows = 2 * dk + dv
    _check_tensor("qkv_bias", qkv_bias, (rows,), f"(2 * dk + dv,) = ({rows},)", x, optional=True)
    _check_tensor("out_bias", out_bias, (dv,), f"(dv,) = ({dv},)", x, optional=True)
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_h, rel_w: expected both tensors or both None")
    for name, table in (("rel_h", rel_h), ("rel_w", rel_w)):
        _check_tensor(
            name, table, (None, dkh), f"(n, dkh) = (n, {dkh}) with n >= 1", x, optional=True
        )

    # Checked here: F.conv2d's message for a map smaller than the kernel names neither x nor
    # the argument at fault.
    conv_output_grid("x", x.shape[-2:], conv_weight.shape[-2:], stride, padding, dilation)
    conv_out = F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation)
    height, width = conv_out.shape[-2:]
    if torch.jit.is_tracing():
        # As above; a trace is fixed to its map size anyway. (int() would also specialise the
        # sizes that torch.compile keeps dynamic, hence only here.)
        height, width = int(height), int(width)
    x_att = x if x.shape[-2:] == (height, width) else F.adaptive_avg_pool2d(x, (height, width))
    qkv = F.conv2d(x_att, qkv_weight, qkv_bias)
    q, k, v = split_heads(qkv, dk, dv, num_heads)

    scale = dkh**-0.5
    bias_h = bias_w = None
    if rel_h is not None and rel_w is not None:
        table_h = resize_rel_table(rel_h, 2 * height - 1) * scale
        table_w = resize_rel_table(rel_w, 2 * width - 1) * scale
        bias_h, bias_w = relative_logits(q, table_h, table_w, height, width)
        # Under autocast the einsum may land in another dtype than q; the op wants one dtype.
        bias_h, bias_w = bias_h.to(q.dtype), bias_w.to(q.dtype)
    out = attention_2d(
        q, k, v, bias_h, bias_w, height=height, width=width, scale=scale, backend=backend
    )
    attn_out = F.conv2d(merge_heads(out, height, width, _channels_last(x)), out_weight, out_bias)
    return torch.cat([conv_out, attn_out], dim=1)
