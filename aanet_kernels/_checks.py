"""Input validation shared by every backend: each error names the argument and what was expected."""

from __future__ import annotations

import numbers
import sys

import numpy as np
import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_MAX = sys.float_info.max
# The largest scale the kernels of fp16/bf16/fp32 inputs can hold: they compute in float32.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_feature_map(x: object) -> None:
    """Raise ``ValueError`` unless ``x`` is a 4-D tensor ``(B, Cin, H, W)``."""
    if isinstance(x, torch.fx.Proxy):
        # Not "expected a 4-D tensor, got Proxy": the input is fine, the tracer is the problem.
        raise TypeError(
            "x: a torch.fx Proxy; torch.fx.symbolic_trace cannot trace into AAConv2d or "
            "aa_conv2d (they check x's shape and pick a backend from it). Keep AAConv2d a leaf "
            "module (a Tracer whose is_leaf_module is true for it; torchvision's "
            "create_feature_extractor takes tracer_kwargs={'leaf_modules': [AAConv2d]}), or "
            "use torch.export or torch.compile"
        )
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 4-D tensor (B, Cin, H, W), got {got}")


def check_map_size(height: int, width: int) -> tuple[int, int]:
    """Raise ``ValueError`` unless ``height`` and ``width`` are positive ints; return them as
    ints (a NumPy integer converted, an int or a SymInt untouched)."""
    # numbers.Integral: NumPy scalars are taken too (and converted); a SymInt is a map
    # size that torch.compile(dynamic=True) or torch.export traces symbolically.
    sizes_ok = all(
        isinstance(n, int | numbers.Integral | torch.SymInt) and not isinstance(n, bool) and n >= 1
        for n in (height, width)
    )
    if not sizes_ok:
        raise ValueError(f"height, width: expected positive ints, got {height!r}, {width!r}")
    height, width = (n if isinstance(n, int | torch.SymInt) else int(n) for n in (height, width))
    return height, width


def as_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool or a NumPy bool, else ``TypeError`` naming ``name`` (0, 1 and
    strings are refused: ``"False"`` would be true)."""
    if not isinstance(value, bool | np.bool_):
        kind = type(value)
        where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        raise TypeError(f"{name}: expected a bool, got {where}{kind.__qualname__}")
    return bool(value)


def check_floating_dtype(name: str, dtype: object) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``dtype`` is None or a supported float dtype."""
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name}: expected None or one of {names}, got {dtype!r}")


def is_int(value: object) -> bool:
    """An int or a NumPy integer (``numbers.Integral``), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """``value`` (an int, or a pair of ints) as a pair of ints ``>= minimum``; raises
    ``ValueError`` naming ``name`` otherwise."""
    pair = (value, value) if is_int(value) else value
    ok = isinstance(pair, tuple | list) and len(pair) == 2 and all(is_int(v) for v in pair)
    if not ok or min(pair) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def conv_output_grid(
    name: str,
    size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: object,
    padding: object,
    dilation: object,
) -> tuple[int, int]:
    """The ``(Ho, Wo)`` that ``F.conv2d`` produces from an ``(H, W)`` map (``stride``,
    ``padding`` and ``dilation`` as ``F.conv2d`` takes them, checked and named). Raises
    ``ValueError`` blaming ``name`` when the grid is empty, where ``F.conv2d``'s own message
    names neither the argument nor the layer."""
    strides, dilations = int_pair("stride", stride, 1), int_pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same', 'valid' or ints >= 0, got {padding!r}")
        if padding == "same" and strides != (1, 1):
            raise ValueError(f"padding: 'same' needs stride 1, got stride {strides}")
        pads = None if padding == "same" else (0, 0)
    else:
        pads = int_pair("padding", padding, 0)
    if pads is None:
        return size
    grid = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, kernel_size, strides, pads, dilations, strict=True)
    )
    # any(), not min(): on symbolic sizes each test is a guard that holds for every valid map,
    # where min() would also guard on which side is the smaller (a recompile when it flips).
    if any(n < 1 for n in grid):
        empty = tuple(max(n, 0) for n in grid)
        raise ValueError(
            f"{name}: a {tuple(size)} map gives an empty {empty} output with kernel "
            f"{tuple(kernel_size)}, padding {pads} and dilation {dilations}"
        )
    return grid  # type: ignore[return-value]


def autocast_mixes(like: Tensor, t: Tensor) -> bool:
    """Whether autocast is on for ``like``'s device and ``t`` is floating, so that ``t`` may keep
    another floating dtype than ``like``'s. (Not through ``torch.amp.is_autocast_available``:
    torch 2.11's Dynamo cannot trace it. Meta tensors have no autocast, and
    ``is_autocast_enabled`` refuses their device type.)"""
    device = like.device.type
    return t.dtype in SUPPORTED_DTYPES and device != "meta" and torch.is_autocast_enabled(device)


def check_dense(name: str, t: Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is a dense (strided) tensor: a sparse one would reach the
    dispatcher's "Could not run ... with arguments from the 'SparseCPU' backend", a nested one an
    "Internal error" from its shape."""
    if t.is_nested or t.layout != torch.strided:
        layout = "nested" if t.is_nested else str(t.layout)
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a {layout} one")


def check_attention_2d_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias_h: Tensor | None,
    bias_w: Tensor | None,
    height: int,
    width: int,
    scale: float = 1.0,
) -> tuple[int, int]:
    """Raise ``ValueError``/``TypeError`` if the inputs break the ``attention_2d`` contract;
    return ``(height, width)`` as ints (see :func:`check_map_size`)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        check_dense(name, t)
        if t.dim() != 4:
            raise ValueError(
                f"{name}: expected a 4-D tensor (B, Nh, L, d), "
                f"got {t.dim()}-D shape {tuple(t.shape)}"
            )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q: expected a floating dtype in {SUPPORTED_DTYPES}, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("bias_h", bias_h), ("bias_w", bias_w)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        check_dense(name, t)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"{name}: expected device {q.device} (the device of q), got {t.device}"
            )
    height, width = check_map_size(height, width)
    # numbers.Real: NumPy scalars are taken too, compared as Python floats (a NumPy float32
    # would compare in float32, where the largest float is inf and inf passes).
    real = isinstance(scale, int | float | numbers.Real) and not isinstance(scale, bool)
    if real and not isinstance(scale, int | float):
        scale = float(scale)
    # A comparison, not math.isfinite: Dynamo with dynamic=True cannot trace math.isfinite even on
    # a constant, and NaN fails both comparisons. Against the largest float, not inf: an int
    # beyond it (10**400) compares finite and then overflows float().
    if not real or not -_FLOAT_MAX <= scale <= _FLOAT_MAX:
        raise ValueError(f"scale: expected a finite real number, got {scale!r}")
    if q.dtype != torch.float64 and not -_FLOAT32_MAX <= scale <= _FLOAT32_MAX:
        raise ValueError(
            f"scale: expected a magnitude of at most {_FLOAT32_MAX:.6g} for {q.dtype} inputs "
            f"(their logits are computed in float32, where it would be inf), got {scale!r}"
        )
    batch, heads, length, dkh = q.shape
    if length != height * width:
        raise ValueError(
            f"q: L = {length} does not equal height * width = {height} * {width} = {height * width}"
        )
    if k.shape != q.shape:
        raise ValueError(
            f"k: expected shape {tuple(q.shape)} (the shape of q), got {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v: expected shape ({batch}, {heads}, {length}, dvh) to match q's (B, Nh, L), "
            f"got {tuple(v.shape)}"
        )
    if dkh < 1 or v.shape[3] < 1:
        raise ValueError(f"q, v: head dims must be at least 1, got dkh={dkh}, dvh={v.shape[3]}")
    for name, t, size, label in (
        ("bias_h", bias_h, height, "height"),
        ("bias_w", bias_w, width, "width"),
    ):
        if t is None:
            continue
        ok = (
            t.dim() == 4
            and t.shape[0] in (1, batch)
            and t.shape[1] in (1, heads)
            and t.shape[2] == length
            and t.shape[3] == size
        )
        if not ok:
            raise ValueError(
                f"{name}: expected shape ({batch}, {heads}, {length}, {size}) "
                f"= (B, Nh, L, {label}), "
                f"B and Nh may be 1 to broadcast, got {tuple(t.shape)}"
            )
    return height, width
