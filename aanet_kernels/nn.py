"""``AAConv2d``: a drop-in attention-augmented replacement for ``nn.Conv2d``, and helpers to upgrade
existing (pretrained) CNNs with it."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter, is_lazy

from aanet_kernels._checks import (
    as_bool,
    autocast_mixes,
    check_feature_map,
    check_floating_dtype,
    conv_output_grid,
    int_pair,
    is_int,
)
from aanet_kernels.backends import check_backend_name
from aanet_kernels.functional import _IntPair, aa_conv2d, resize_rel_table


def _positive_int(name: str, value: int) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def resolve_channels(name: str, value: int | float, out_channels: int, num_heads: int) -> int:
    """``dk`` or ``dv`` as a channel count: an int is taken as is, a float is a fraction of
    ``out_channels`` (the paper's kappa / upsilon) rounded to the nearest multiple of
    ``num_heads``. Raises if the count is not a positive multiple of ``num_heads``."""
    # NumPy scalars are taken as the int or float they hold.
    if is_int(value):
        value = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    else:
        raise TypeError(
            f"{name}: expected an int (channels) or a float (fraction of out_channels), "
            f"got {type(value).__name__}"
        )
    if not 0 < value < math.inf:  # NaN fails too
        raise ValueError(
            f"{name}: expected a positive channel count or a finite positive fraction, "
            f"got {value!r}"
        )
    if isinstance(value, float):
        count = round(value * out_channels / num_heads) * num_heads
        if count == 0:
            raise ValueError(
                f"{name}={value} of out_channels={out_channels} is {value * out_channels:.3g} "
                f"channels, which rounds to 0 channels per head with num_heads={num_heads}; "
                f"pass a larger fraction, fewer heads, or an int"
            )
        return count
    if value % num_heads:
        raise ValueError(
            f"{name}={value} does not divide by num_heads={num_heads} "
            f"({name} / num_heads is the depth of each head)"
        )
    return value


class AAConv2d(LazyModuleMixin, nn.Module):
    """Attention-augmented convolution (Bello et al., ICCV 2019), a drop-in for ``nn.Conv2d``.

    ``Y = concat([Conv_kxk(X) (out_channels - dv channels), MHA(X) (dv channels)], dim=1)``, the
    layer of Bello et al. (section 3), computed by ``aanet_kernels.functional.aa_conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, bias, dilation: as in ``nn.Conv2d``;
            ``bias`` applies to all three convolutions (k x k, qkv 1x1, output 1x1).
        padding: of the k x k convolution; ``None`` means ``dilation * (kernel_size // 2)``
            ("same" for odd kernels), else anything ``nn.Conv2d`` takes.
        dk, dv: total key and value depths: an int is a channel count, a float a fraction of
            ``out_channels`` (kappa and upsilon in the paper; the default is kappa = 2 upsilon =
            0.2) rounded to the nearest multiple of ``num_heads``. Both must be positive multiples
            of ``num_heads`` and ``dv < out_channels``.
        num_heads: attention heads ``Nh``.
        relative: add the 2D relative-position logits (``rel_h``, ``rel_w``) to the attention.
        backend: the ``attention_2d`` backend (``"auto"`` follows ``use_backend`` and the env var).
        input_size: nominal input ``(H, W)`` (or one int for square maps) for the relative tables.

    Relative tables: ``rel_h (2 h0 - 1, dkh)`` and ``rel_w (2 w0 - 1, dkh)`` cover the attention
    grid ``h0 x w0`` that the nominal input gives (the convolution's output grid). With
    ``input_size`` they are built at construction; without it, at the first forward call, from
    that call's input (call the layer once, or load a state_dict, before building the optimizer,
    as for ``nn.LazyConv2d``). Inputs of any other size use the tables resized by linear
    interpolation (``functional.resize_rel_table``, the rule of SAM / ViTDet's ``get_rel_pos``).
    A state dict whose tables cover another grid (a checkpoint trained at another input size) is
    resized the same way on load, so the layer computes at its own nominal size what the saved
    layer computed at that size.

    Stride: attention runs at the output resolution, on the input average-pooled to the output
    grid (the paper's downsampling); see ``aa_conv2d`` for why.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        stride: _IntPair = 1,
        padding: _IntPair | str | None = None,
        dk: int | float = 0.2,
        dv: int | float = 0.1,
        num_heads: int = 8,
        relative: bool = True,
        backend: str = "auto",
        bias: bool = True,
        *,
        dilation: _IntPair = 1,
        input_size: _IntPair | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = _positive_int("in_channels", in_channels)
        out_channels = _positive_int("out_channels", out_channels)
        num_heads = _positive_int("num_heads", num_heads)
        kernel = int_pair("kernel_size", kernel_size, 1)
        strides = int_pair("stride", stride, 1)
        dilations = int_pair("dilation", dilation, 1)
        if padding is None:
            padding = (dilations[0] * (kernel[0] // 2), dilations[1] * (kernel[1] // 2))
        elif not isinstance(padding, str):
            padding = int_pair("padding", padding, 0)
        relative, bias = as_bool("relative", relative), as_bool("bias", bias)
        check_backend_name(backend)
        check_floating_dtype("dtype", dtype)
        self.dk = resolve_channels("dk", dk, out_channels, num_heads)
        self.dv = resolve_channels("dv", dv, out_channels, num_heads)
        if self.dv >= out_channels:
            raise ValueError(
                f"dv: expected fewer than out_channels={out_channels} channels (the convolution "
                f"keeps out_channels - dv of them), got dv={self.dv}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads, self.relative, self.backend = num_heads, relative, backend
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            in_channels, out_channels - self.dv, kernel, strides, padding, dilations,
            bias=bias, **factory,
        )  # fmt: skip
        self.qkv_conv = nn.Conv2d(in_channels, 2 * self.dk + self.dv, 1, bias=bias, **factory)
        self.attn_out = nn.Conv2d(self.dv, self.dv, 1, bias=bias, **factory)
        # Checked with or without relative tables: a layer without them has no use for it, but
        # (0, 4) or a string is a mistake all the same.
        grid = None
        if input_size is not None:
            grid = self._attention_grid("input_size", int_pair("input_size", input_size, 1))
        if not relative:
            self.register_parameter("rel_h", None)
            self.register_parameter("rel_w", None)
        elif grid is None:
            self.rel_h = UninitializedParameter(**factory)
            self.rel_w = UninitializedParameter(**factory)
        else:
            self.rel_h = nn.Parameter(torch.empty(2 * grid[0] - 1, self.dkh, **factory))
            self.rel_w = nn.Parameter(torch.empty(2 * grid[1] - 1, self.dkh, **factory))
            self.reset_parameters()

    @property
    def dkh(self) -> int:
        return self.dk // self.num_heads

    @property
    def nominal_size(self) -> tuple[int, int] | None:
        """The attention grid ``(h0, w0)`` the relative tables cover (``None`` until built)."""
        if self.rel_h is None or is_lazy(self.rel_h):
            return None
        return (self.rel_h.shape[0] + 1) // 2, (self.rel_w.shape[0] + 1) // 2

    def _attention_grid(self, name: str, size: tuple[int, int]) -> tuple[int, int]:
        """The convolution's output grid for an ``(H, W)`` input; ``name`` is blamed if empty."""
        c = self.conv
        return conv_output_grid(name, size, c.kernel_size, c.stride, c.padding, c.dilation)

    def reset_parameters(self) -> None:
        """Draw the relative tables anew from N(0, dkh ** -0.5), the initialisation of Bello et
        al.'s code (lazy tables are drawn when built). As for every ``nn.Module``, only the
        layer's own parameters: its three convolutions have their own ``reset_parameters``, which
        is how FSDP and ``to_empty`` after a meta-device build initialise a model."""
        if self.rel_h is None or is_lazy(self.rel_h):
            return
        with torch.no_grad():
            self.rel_h.normal_(0.0, self.dkh**-0.5)
            self.rel_w.normal_(0.0, self.dkh**-0.5)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Tables of another length (another nominal grid, same head depth) are resized to this
        # layer's, as forward would resize them for an input of this size.
        for name in ("rel_h", "rel_w"):
            own, saved = self._parameters.get(name), state_dict.get(prefix + name)
            # A lazy saved table (a layer saved before its first forward) is left to PyTorch,
            # which explains it; saved.dim() here raised a bare "uninitialized parameter" error.
            if own is None or is_lazy(own) or not isinstance(saved, Tensor) or is_lazy(saved):
                continue
            if saved.dim() != 2:
                continue
            if saved.shape[1] == own.shape[1] and saved.shape[0] != own.shape[0]:
                state_dict[prefix + name] = resize_rel_table(saved.detach(), own.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def initialize_parameters(self, x: Tensor) -> None:  # type: ignore[override]
        """Build lazy relative tables for the attention grid of ``x`` (first call only)."""
        if self.rel_h is not None and is_lazy(self.rel_h):
            check_feature_map(x)
            grid = self._attention_grid("x", tuple(x.shape[-2:]))
            with torch.no_grad():
                self.rel_h.materialize((2 * grid[0] - 1, self.dkh))
                self.rel_w.materialize((2 * grid[1] - 1, self.dkh))
            self.reset_parameters()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # ``Module.to(memory_format=...)`` asks every tensor for ``.dim()``, which a lazy table
        # refuses. A lazy table only needs the device and dtype the conversion picks, so convert
        # the rest as usual and learn those from an empty probe tensor.
        lazy = {n: p for n, p in self._parameters.items() if p is not None and is_lazy(p)}
        for name in lazy:
            del self._parameters[name]
        try:
            super()._apply(fn, recurse)
        finally:
            for name, param in lazy.items():
                probe = fn(torch.empty(0, device=param.device, dtype=param.dtype))
                self._parameters[name] = UninitializedParameter(
                    device=probe.device, dtype=probe.dtype
                )
        return self

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x)
        # Here, not in aa_conv2d: for the function either x or the weights may be wrong, for the
        # layer it is x.
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x: expected in_channels = {self.in_channels} channels (B, {self.in_channels}, "
                f"H, W), got shape {tuple(x.shape)}"
            )
        c = self.conv
        if x.device != c.weight.device:
            raise ValueError(
                f"x: expected device {c.weight.device} (the layer's parameters), got {x.device}"
            )
        if x.dtype != c.weight.dtype and not autocast_mixes(x, c.weight):
            raise TypeError(
                f"x: expected dtype {c.weight.dtype} (the layer's parameters; convert x, or the "
                f"layer with .to(dtype)), got {x.dtype}"
            )
        return aa_conv2d(
            x, c.weight, c.bias, self.qkv_conv.weight, self.qkv_conv.bias,
            self.attn_out.weight, self.attn_out.bias, self.rel_h, self.rel_w,
            num_heads=self.num_heads, stride=c.stride, padding=c.padding, dilation=c.dilation,
            backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        c = self.conv
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={c.kernel_size}, "
            f"stride={c.stride}, padding={c.padding}, dk={self.dk}, dv={self.dv}, "
            f"num_heads={self.num_heads}, relative={self.relative}, backend={self.backend!r}, "
            f"nominal_size={self.nominal_size}"
        )

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        dk: int | float = 0.2,
        dv: int | float = 0.1,
        num_heads: int = 8,
        relative: bool = True,
        backend: str = "auto",
        *,
        input_size: _IntPair | None = None,
    ) -> AAConv2d:
        """An ``AAConv2d`` with the geometry of ``conv`` that keeps its pretrained filters.

        The first ``out_channels - dv`` filters (and biases) of ``conv`` become the k x k part, so
        those output channels keep their position and meaning for the layers downstream; the
        last ``dv`` channels, whose filters are dropped, now come from attention (freshly
        initialised). A frozen weight or bias (``requires_grad=False``) stays frozen; the new
        attention parameters (``qkv_conv``, ``attn_out``, the relative tables) are trainable.
        Grouped convolutions and non-zero padding modes are not supported.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        kind = type(conv)
        if (
            kind.forward is not nn.Conv2d.forward
            or kind._conv_forward is not nn.Conv2d._conv_forward
        ):
            # A weight-standardised or otherwise customised conv: its filters mean something only
            # with its own forward, which the k x k branch would not run.
            raise TypeError(
                f"conv: {kind.__name__} overrides nn.Conv2d's forward, so its filters cannot be "
                "carried over as plain convolution filters"
            )
        if is_lazy(conv.weight):
            raise ValueError(
                f"conv: an uninitialised {type(conv).__name__} (its in_channels are not known "
                f"yet); run a forward pass through it first"
            )
        if conv.groups != 1:
            raise ValueError(
                f"conv: expected groups=1 (grouped filters cannot be split), "
                f"got groups={conv.groups}"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv: expected padding_mode='zeros', got {conv.padding_mode!r}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            dk, dv, num_heads, relative, backend, conv.bias is not None,
            dilation=conv.dilation, input_size=input_size,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        keep = conv.out_channels - layer.dv
        for name in ("weight", "bias"):
            kept, source = getattr(layer.conv, name), getattr(conv, name)
            if source is not None:
                with torch.no_grad():
                    kept.copy_(source[:keep])
                kept.requires_grad_(source.requires_grad)
        return layer.train(conv.training)


def _input_sizes(
    model: nn.Module, convs: dict[str, nn.Conv2d], example_input: object
) -> dict[str, tuple[int, int]]:
    """The ``(H, W)`` of the input each of ``convs`` sees in a forward of ``model`` on
    ``example_input`` (a tensor, or a tuple of positional arguments), run under ``torch.no_grad``
    in eval mode (so BatchNorm statistics are not updated; training flags are restored)."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    sizes: dict[int, tuple[int, int]] = {}

    def record(conv: nn.Module, inputs: tuple[object, ...]) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, Tensor) and x.dim() >= 3:
            sizes.setdefault(id(conv), (int(x.shape[-2]), int(x.shape[-1])))

    modes = {module: module.training for module in model.modules()}
    hooks = [conv.register_forward_pre_hook(record) for conv in set(convs.values())]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    missing = [name for name, conv in convs.items() if id(conv) not in sizes]
    if missing:
        raise ValueError(
            f"example_input: the model's forward on it never called {missing}, so their input "
            "sizes are unknown"
        )
    return {name: sizes[id(conv)] for name, conv in convs.items()}


def augment_model(
    model: nn.Module,
    where: Callable[[str, nn.Conv2d], bool] | Iterable[str],
    *,
    example_input: object = None,
    **kwargs: object,
) -> nn.Module:
    """Replace chosen ``nn.Conv2d`` layers of ``model`` (in place) by ``AAConv2d.from_conv2d``.

    Args:
        model: any module; convolutions already inside an ``AAConv2d`` are never touched.
        where: qualified names (as in ``model.named_modules(remove_duplicate=False)``) of the
            convolutions to replace, or a predicate ``where(name, conv) -> bool``. A convolution
            registered under several names is chosen by any of them and replaced by one shared
            ``AAConv2d`` at all of them.
        example_input: an input of ``model`` (a tensor, or a tuple of positional arguments). When
            given, the model runs once on it (``torch.no_grad``, eval mode) to learn the input
            size of each chosen convolution, and every replacement is built with its relative
            tables at that size (``input_size``), now, from the global RNG. Without it (and
            without ``input_size``) the tables are lazy: drawn at the first forward, so a
            ``copy.deepcopy`` of the model made before that (an EMA copy, a second run "from the
            same seed") draws different ones. ``input_size`` in ``kwargs`` is one size for every
            replacement, the layer's own input: not the image size for a layer deeper than a
            stride.
        kwargs: passed to ``AAConv2d.from_conv2d`` (``dk``, ``dv``, ``num_heads``, ...).

    Every chosen convolution is converted before any is swapped in: if one is refused (the error
    names it), the model is left as it was.

    Returns:
        ``model``, for chaining.
    """
    convs: dict[str, nn.Conv2d] = {}
    inside: list[str] = []  # prefixes of AAConv2d layers, whose own convs are not candidates
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, AAConv2d):
            inside.append(name + ".")
        elif isinstance(module, nn.Conv2d):
            convs[name] = module
    if callable(where):
        targets = [name for name, conv in convs.items() if where(name, conv)]
    else:
        targets = [where] if isinstance(where, str) else list(where)
        for name in targets:
            if name not in convs:
                raise ValueError(
                    f"where: {name!r} is not an nn.Conv2d of the model; candidates: {list(convs)}"
                )
    if "" in targets:
        raise ValueError("where: the model itself is an nn.Conv2d; use AAConv2d.from_conv2d")
    # Build every replacement before swapping any in, so that a refused conv leaves the model as
    # it was.
    sizes: dict[str, tuple[int, int]] = {}
    if example_input is not None:
        if "input_size" in kwargs:
            raise ValueError(
                "example_input, input_size: pass one of them (example_input gives each "
                "replacement its own input size)"
            )
        sizes = _input_sizes(model, {name: convs[name] for name in targets}, example_input)
    replacements: dict[int, AAConv2d] = {}
    for name in targets:
        conv = convs[name]
        if id(conv) not in replacements:
            extra = {"input_size": sizes[name]} if name in sizes else {}
            try:
                replacements[id(conv)] = AAConv2d.from_conv2d(conv, **kwargs, **extra)
            except (TypeError, ValueError) as error:
                raise type(error)(f"where: {name!r} cannot be replaced: {error}") from error
    for name, conv in convs.items():
        if id(conv) in replacements:
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, replacements[id(conv)])
    return model
