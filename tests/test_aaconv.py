"""AAConv2d / aa_conv2d against a literal, loop-by-loop transcription of Bello et al.'s formula."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from aanet_kernels import available_backends
from aanet_kernels.functional import aa_conv2d, resize_rel_table, split_heads
from aanet_kernels.nn import AAConv2d, augment_model

CPU_BACKENDS = available_backends("cpu")


def literal_interpolation(table: Tensor, length: int) -> Tensor:
    """Linear resampling with half-pixel centres (``align_corners=False``), one row at a time."""
    n = table.shape[0]
    rows = []
    for t in range(length):
        src = max((t + 0.5) * n / length - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n - 1)
        i1 = min(i0 + 1, n - 1)
        lam = src - i0
        rows.append((1 - lam) * table[i0] + lam * table[i1])
    return torch.stack(rows)


def paper_formula(x: Tensor, m: AAConv2d) -> Tensor:
    """The layer of Bello et al. (section 3), written out over positions (tiny maps only).

    Stride s > 1 uses s x s average pooling of the input, so sizes must divide by s.
    """
    conv = m.conv
    conv_out = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    out_h, out_w = conv_out.shape[-2:]
    s = conv.stride[0]
    x_att = x if s == 1 else F.avg_pool2d(x, s)
    assert x_att.shape[-2:] == (out_h, out_w)
    qkv = F.conv2d(x_att, m.qkv_conv.weight, m.qkv_conv.bias)
    dk, dv, nh = m.dk, m.dv, m.num_heads
    dkh, dvh = dk // nh, dv // nh
    q = qkv[:, :dk] * dkh**-0.5
    k = qkv[:, dk : 2 * dk]
    v = qkv[:, 2 * dk :]
    if m.relative:
        rel_h = literal_interpolation(m.rel_h, 2 * out_h - 1)
        rel_w = literal_interpolation(m.rel_w, 2 * out_w - 1)
    heads_out = torch.zeros(x.shape[0], dv, out_h, out_w, dtype=x.dtype)
    for b in range(x.shape[0]):
        for h in range(nh):
            qs, ks = slice(h * dkh, (h + 1) * dkh), slice(h * dvh, (h + 1) * dvh)
            for iy in range(out_h):
                for ix in range(out_w):
                    q_i = q[b, qs, iy, ix]
                    logits = torch.zeros(out_h, out_w, dtype=x.dtype)
                    for jy in range(out_h):
                        for jx in range(out_w):
                            logit = q_i @ k[b, qs, jy, jx]
                            if m.relative:
                                logit = logit + q_i @ rel_h[jy - iy + out_h - 1]
                                logit = logit + q_i @ rel_w[jx - ix + out_w - 1]
                            logits[jy, jx] = logit
                    weights = torch.softmax(logits.flatten(), dim=0).reshape(out_h, out_w)
                    heads_out[b, ks, iy, ix] = (weights * v[b, ks]).sum(dim=(-2, -1))
    attn_out = F.conv2d(heads_out, m.attn_out.weight, m.attn_out.bias)
    return torch.cat([conv_out, attn_out], dim=1)


def randomize_(m: nn.Module, seed: int) -> nn.Module:
    """Fresh random weights everywhere (biases too, so none is zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return m


# (name, constructor kwargs, input size): H != W throughout, stride 1 and 2, tables resized up
# and down from the nominal size, no relative logits, a non-square kernel, L = 1.
CONFIGS = [
    ("stride1", dict(kernel_size=3, input_size=(4, 3)), (4, 3)),
    ("stride2", dict(kernel_size=3, stride=2, input_size=(8, 6)), (8, 6)),
    ("resize_up", dict(kernel_size=3, input_size=(3, 2)), (5, 4)),
    ("resize_down", dict(kernel_size=(1, 3), input_size=(5, 6)), (2, 3)),
    ("stride2_resize", dict(kernel_size=3, stride=2, input_size=(4, 4)), (6, 8)),
    ("no_relative", dict(kernel_size=3, relative=False), (3, 4)),
    ("one_pixel", dict(kernel_size=1, input_size=(3, 3)), (1, 1)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kwargs,size", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_paper_formula(backend: str, name: str, kwargs: dict, size: tuple) -> None:
    torch.manual_seed(0)
    m = AAConv2d(3, 10, dk=4, dv=4, num_heads=2, backend=backend, dtype=torch.float64, **kwargs)
    randomize_(m, seed=1)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = paper_formula(x, m)
    got = m(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("stride,size", [(1, (3, 2)), (2, (4, 6))], ids=["stride1", "stride2"])
def test_gradcheck(backend: str, stride: int, size: tuple) -> None:
    # Nominal size 2x3 differs from the grid, so gradients also flow through the resizing.
    m = AAConv2d(
        2, 6, 3, stride=stride, dk=4, dv=2, num_heads=2, backend=backend,
        input_size=(2 * stride, 3 * stride), dtype=torch.float64,
    )  # fmt: skip
    randomize_(m, seed=2)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(1, 2, *size, dtype=torch.float64, requires_grad=True)

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_state_dict_round_trip() -> None:
    kwargs = dict(dk=4, dv=4, num_heads=2)
    trained = AAConv2d(3, 8, 3, **kwargs)
    x = torch.randn(2, 3, 5, 4)
    trained(x)  # builds the lazy tables for a 5x4 grid
    expected = randomize_(trained, seed=3)(x)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()))

    lazy = AAConv2d(3, 8, 3, **kwargs)
    lazy.load_state_dict(state)  # materializes the tables with the saved shapes
    assert lazy.nominal_size == (5, 4)
    eager = AAConv2d(3, 8, 3, input_size=(5, 4), **kwargs)
    eager.load_state_dict(state)
    for restored in (lazy, eager):
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


def test_state_dict_of_another_grid_is_resized_on_load() -> None:
    # Fine-tuning at another resolution: tables saved for a 5x4 grid, loaded into a layer built
    # for 9x6, give at 9x6 what the saved layer gives there (it resizes them at each call).
    kwargs = dict(dk=4, dv=4, num_heads=2)
    trained = randomize_(AAConv2d(3, 8, 3, input_size=(5, 4), **kwargs), seed=4)
    larger = AAConv2d(3, 8, 3, input_size=(9, 6), **kwargs)
    larger.load_state_dict(trained.state_dict())
    assert larger.nominal_size == (9, 6) and larger.rel_h.shape == (17, 2)
    x = torch.randn(2, 3, 9, 6)
    torch.testing.assert_close(larger(x), trained(x), rtol=1e-6, atol=1e-6)
    # A table of another head depth is a different layer: the usual size-mismatch error.
    with pytest.raises(RuntimeError, match="rel_h"):
        AAConv2d(3, 8, 3, input_size=(5, 4), dk=8, dv=4, num_heads=2).load_state_dict(
            trained.state_dict()
        )


def test_state_dict_of_a_layer_never_run_is_explained_on_load() -> None:
    """A layer saved before its first forward holds lazy tables; loading them into a built layer
    gets PyTorch's own explanation (until 2026-12-02 the resizing hook asked the lazy table for
    its dim first: a bare "Attempted to use an uninitialized parameter in <method 'dim'>")."""
    never_run = AAConv2d(4, 16, 3, dk=8, dv=4, num_heads=2)
    built = AAConv2d(4, 16, 3, dk=8, dv=4, num_heads=2, input_size=6)
    with pytest.raises(RuntimeError, match=r"uninitialized parameter.*Call `forward`"):
        built.load_state_dict(never_run.state_dict())


def test_meta_device_build_then_reset_parameters() -> None:
    # How FSDP and large-model code build a model: on the meta device, then to_empty (garbage
    # memory) and reset_parameters on every module that has parameters of its own.
    with torch.device("meta"):
        model = nn.Sequential(AAConv2d(8, 32, 3, dk=16, dv=8, num_heads=2, input_size=16))
    model.to_empty(device="cpu")
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()
    layer = model[0]
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    tables = torch.cat([layer.rel_h.flatten(), layer.rel_w.flatten()])  # 2 x 31 x 8 draws
    assert abs(tables.std().item() / layer.dkh**-0.5 - 1) < 0.25
    y = model(torch.randn(2, 8, 16, 16))
    assert y.shape == (2, 32, 16, 16) and torch.isfinite(y).all()
    lazy = AAConv2d(8, 32, 3, dk=16, dv=8, num_heads=2)
    lazy.reset_parameters()  # nothing to draw yet: the tables are built by the first call
    assert lazy.nominal_size is None


def test_lazy_tables_follow_the_first_input() -> None:
    m = AAConv2d(3, 8, 3, stride=2, dk=4, dv=4, num_heads=2)
    assert m.nominal_size is None
    m(torch.randn(1, 3, 9, 6))
    assert m.nominal_size == (5, 3)
    assert m.rel_h.shape == (9, 2) and m.rel_w.shape == (5, 2)


def test_lazy_tables_survive_conversions() -> None:
    # A whole model is often converted before its first call; the lazy tables follow along.
    m = AAConv2d(3, 8, 3, dk=4, dv=4, num_heads=2)
    m = m.to(memory_format=torch.channels_last).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = m(x)
    assert y.dtype == m.rel_h.dtype == torch.float64
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert m.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_resize_rel_table() -> None:
    table = torch.randn(7, 5, dtype=torch.float64)
    assert resize_rel_table(table, 7) is table
    for length in (1, 3, 13, 27):
        torch.testing.assert_close(
            resize_rel_table(table, length), literal_interpolation(table, length)
        )
    # A table symmetric in the offset stays symmetric, offset 0 stays at the centre row.
    symmetric = table + table.flip(0)
    resized = resize_rel_table(symmetric, 11)
    torch.testing.assert_close(resized, resized.flip(0))


@pytest.mark.parametrize("size,expected", [((7, 5), (4, 3)), ((1, 2), (1, 1)), ((8, 6), (4, 3))])
def test_stride2_output_grid(size: tuple, expected: tuple) -> None:
    m = AAConv2d(3, 8, 3, stride=2, dk=4, dv=4, num_heads=2, input_size=(8, 6))
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, *size)
    assert m(x).shape == conv(x).shape == (2, 8, *expected)


def test_qkv_are_views_of_the_projection() -> None:
    for fmt in (torch.contiguous_format, torch.channels_last):
        qkv = torch.randn(2, 4 + 4 + 6, 3, 5).contiguous(memory_format=fmt)
        q, k, v = split_heads(qkv, dk=4, dv=6, num_heads=2)
        assert q.shape == k.shape == (2, 2, 15, 2) and v.shape == (2, 2, 15, 3)
        channel = qkv.stride(1) * qkv.element_size()
        assert q.data_ptr() == qkv.data_ptr()
        assert k.data_ptr() == qkv.data_ptr() + 4 * channel
        assert v.data_ptr() == qkv.data_ptr() + 8 * channel
        # head 1, position (y=2, x=3), depth 1
        torch.testing.assert_close(q[1, 1, 2 * 5 + 3, 1], qkv[1, 3, 2, 3])
        torch.testing.assert_close(v[0, 1, 7, 2], qkv[0, 8 + 5, 1, 2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dv,num_heads", [(4, 2), (2, 2), (4, 4)])  # dvh = 2, 1, 1
def test_channels_last(backend: str, dv: int, num_heads: int) -> None:
    m = AAConv2d(4, 12, 3, dk=4, dv=dv, num_heads=num_heads, backend=backend, input_size=(5, 6))
    randomize_(m, seed=4)
    x = torch.randn(2, 4, 5, 6)
    expected = m(x)
    got = m(x.contiguous(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_over_inputs_and_over_an_ensemble(backend: str) -> None:
    # vmap refuses is_contiguous(memory_format=channels_last), which the layer used to pick the
    # output layout; a channels_last batch of inputs goes through it too.
    models = [
        randomize_(AAConv2d(4, 10, 3, dk=4, dv=2, num_heads=2, input_size=5, backend=backend), s)
        for s in range(3)
    ]
    xs = torch.randn(3, 2, 4, 5, 5)
    channels_last = xs.movedim(2, -1).contiguous().movedim(-1, 2)
    for batch in (xs, channels_last):
        expected = torch.stack([models[0](x) for x in batch])
        torch.testing.assert_close(torch.func.vmap(models[0])(batch), expected)
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")

    def ensemble(p: dict, b: dict, x: Tensor) -> Tensor:
        return torch.func.functional_call(skeleton, (p, b), (x,))

    per_model = torch.func.vmap(ensemble)(params, buffers, xs)
    torch.testing.assert_close(
        per_model, torch.stack([m(x) for m, x in zip(models, xs, strict=True)])
    )
    shared = torch.func.vmap(ensemble, in_dims=(0, 0, None))(params, buffers, xs[0])
    torch.testing.assert_close(shared, torch.stack([m(xs[0]) for m in models]))


def check_autocast(backend: str, device: str, dtype: torch.dtype) -> None:
    """Under autocast the layer runs in ``dtype`` (channels_last input), its gradients are finite,
    and its error against fp64 is at most twice the reference path's own (the README's rule for
    low precision)."""
    m = AAConv2d(8, 16, 3, dk=8, dv=8, num_heads=2, input_size=(6, 5), backend="reference")
    randomize_(m, seed=5).to(device)
    x = torch.randn(2, 8, 6, 5, device=device).contiguous(memory_format=torch.channels_last)
    exact = m.double()(x.double())
    m.float()
    errors = {}
    for name in sorted({"reference", backend}):
        m.backend = name
        with torch.autocast(device, dtype=dtype):
            y = m(x)
        assert y.dtype == dtype
        y.float().square().sum().backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())
        m.zero_grad()
        errors[name] = (y.double() - exact).abs().max().item()
    assert errors[backend] <= 2 * errors["reference"] + 1e-3, errors
    assert errors["reference"] < 0.1 * exact.abs().max().item(), errors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_bf16(backend: str) -> None:
    check_autocast(backend, "cpu", torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_small_cnn(backend: str) -> None:
    # "aot_eager" traces forward and backward through dynamo and AOT autograd like inductor
    # would, without minutes of C++ codegen; the layers build their lazy tables while tracing.
    torch._dynamo.reset()
    net = nn.Sequential(
        AAConv2d(3, 16, 3, dk=8, dv=4, num_heads=2, backend=backend),
        nn.ReLU(),
        AAConv2d(16, 16, 3, stride=2, dk=8, dv=8, num_heads=4, backend=backend),
    )
    x = torch.randn(2, 3, 8, 6)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    expected = net(x)
    expected.square().sum().backward()
    torch.testing.assert_close(got, expected)
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_under_autocast(backend: str) -> None:
    """fp32 tables meet bf16 queries under autocast (``aanet train --amp --compile``): the dtype
    check that allows it must trace with fullgraph (torch 2.11's Dynamo could not trace
    ``torch.amp.is_autocast_available``)."""
    torch._dynamo.reset()
    layer = AAConv2d(8, 16, 3, dk=8, dv=8, num_heads=2, input_size=6, backend=backend)
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(x)
        expected = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export_and_compile_with_dynamic_batch_and_map_size(backend: str) -> None:
    # One traced program for every batch and map size: the tables are resized symbolically and the
    # op takes a symbolic map size. Dim.AUTO: PyTorch cannot prove Min(w, w * w) == w, a guard it
    # adds when a view merges the map's two dims, for a strict Dim("w"), though it always holds.
    torch._dynamo.reset()
    layer = AAConv2d(4, 12, 3, dk=8, dv=4, num_heads=2, input_size=(6, 5), backend=backend).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        layer, (torch.randn(2, 4, 6, 5),), dynamic_shapes={"x": {0: auto, 2: auto, 3: auto}}
    )
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(2, 4, 6, 5))
    for shape in ((3, 4, 9, 7), (2, 4, 4, 11), (5, 4, 6, 5)):
        x = torch.randn(shape)
        expected = layer(x)
        torch.testing.assert_close(program.module()(x), expected)
        with torch.compiler.set_stance("fail_on_recompile"):
            torch.testing.assert_close(compiled(x), expected)


def _assert_trains_as_eager(
    compiled: Callable[[Tensor], Tensor], layer: nn.Module, x: Tensor
) -> None:
    """``compiled(x)`` and its parameter gradients equal eager ``layer(x)``'s."""
    got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), list(layer.parameters()))
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_inductor_training_with_a_changing_batch() -> None:
    # torch.compile's default compiler, as users run it: the second batch size makes the batch dim
    # symbolic (automatic dynamic shapes), as the last, smaller batch of an epoch does. A symbolic
    # map size fails inside Inductor for plain PyTorch attention too (README, pytorch#172204).
    torch._dynamo.reset()
    # About half a minute of C++ code generation: the fused op only (the reference is PyTorch's).
    layer = AAConv2d(4, 12, 3, dk=8, dv=4, num_heads=2, input_size=5, backend="cpu")
    compiled = torch.compile(layer, fullgraph=True)
    for batch in (3, 2, 5):
        _assert_trains_as_eager(compiled, layer, torch.randn(batch, 4, 5, 5))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the C++ extension is not built")
def test_inductor_training_with_changing_map_sizes_under_dynamic_false() -> None:
    # The README's workaround for pytorch#172204 (a symbolic map size fails inside Inductor):
    # dynamic=False compiles one static graph per map size, each training like eager.
    torch._dynamo.reset()
    layer = AAConv2d(4, 12, 3, dk=8, dv=4, num_heads=2, input_size=5, backend="cpu")
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    for size in ((5, 5), (4, 6), (5, 5)):
        _assert_trains_as_eager(compiled, layer, torch.randn(2, 4, *size))


def test_fraction_channels() -> None:
    m = AAConv2d(64, 256, 3)  # kappa = 0.2 -> 51.2 -> 48; upsilon = 0.1 -> 25.6 -> 24 (8 heads)
    assert (m.dk, m.dv, m.dkh) == (48, 24, 6)
    assert m.conv.out_channels == 232 and m.qkv_conv.out_channels == 120


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(dk=6, num_heads=4), ValueError, r"dk=6 does not divide by num_heads=4"),
        (dict(dv=10, num_heads=4), ValueError, r"dv=10 does not divide by num_heads=4"),
        (dict(dv=16), ValueError, r"dv: expected fewer than out_channels=16"),
        (dict(dv=0.99, num_heads=1), ValueError, r"dv: expected fewer than out_channels=16"),
        (dict(dk=0.05), ValueError, r"dk=0.05 of out_channels=16 .* 0 channels per head"),
        (dict(dv=0), ValueError, r"dv: expected a positive"),
        (dict(dk="8"), TypeError, r"dk: expected an int"),
        (dict(num_heads=0), ValueError, r"num_heads: expected a positive int"),
        (dict(kernel_size=0), ValueError, r"kernel_size: expected an int >= 1"),
        (dict(stride=(1, 2, 3)), ValueError, r"stride: expected an int >= 1"),
        (dict(padding=-1), ValueError, r"padding: expected an int >= 0"),
        (dict(backend="fast"), ValueError, r"backend: expected one of"),
        (dict(relative=1), TypeError, r"relative: expected a bool, got int"),
        (dict(relative="False"), TypeError, r"relative: expected a bool, got str"),
        (dict(bias=None), TypeError, r"bias: expected a bool, got NoneType"),
        (dict(dtype=torch.int64), TypeError, r"dtype: expected None or one of torch.float16"),
        (dict(dtype=torch.complex64), TypeError, r"dtype: expected None or one of"),
        (dict(input_size=(0, 4)), ValueError, r"input_size: expected an int >= 1"),
        (dict(input_size="big"), ValueError, r"input_size: expected an int >= 1"),
        (
            dict(kernel_size=5, padding=0, input_size=(3, 6)),
            ValueError,
            r"input_size: a \(3, 6\) map gives an empty \(0, 2\) output",
        ),
        (dict(dk=float("nan")), ValueError, r"dk: expected a positive channel count or a finite"),
        (dict(dv=float("inf")), ValueError, r"dv: expected a positive channel count or a finite"),
        (dict(dv=-math.inf), ValueError, r"dv: expected a positive channel count"),
        (dict(in_channels=0), ValueError, r"in_channels: expected a positive int"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type, match: str) -> None:
    args = dict(in_channels=4, out_channels=16, kernel_size=3, dk=8, dv=4, num_heads=2)
    with pytest.raises(error, match=match):
        AAConv2d(**{**args, **kwargs})
    if "input_size" in kwargs:  # checked without relative tables too (was ignored until 2026-12-02)
        with pytest.raises(error, match=match):
            AAConv2d(**{**args, **kwargs, "relative": False})


def test_numpy_integers_and_floats_are_taken_as_the_numbers_they_hold() -> None:
    """Hyper-parameters from NumPy (a sweep over ``np.arange``, a config read with NumPy) build the
    same layer as plain ints and floats. Until 2026-12-02 they were refused with "in_channels:
    expected a positive int, got np.int64(4)", while the op takes NumPy sizes and scales."""
    plain = AAConv2d(4, 16, 3, stride=(2, 1), dk=8, dv=0.25, num_heads=2, input_size=(6, 5))
    numpy_args = AAConv2d(
        np.int64(4), np.int32(16), np.int64(3), stride=(np.int64(2), 1), dk=np.int64(8),
        dv=np.float32(0.25), num_heads=np.int16(2), input_size=(np.int64(6), 5),
    )  # fmt: skip
    assert repr(numpy_args) == repr(plain)
    assert type(numpy_args.dk) is type(numpy_args.num_heads) is type(numpy_args.dv) is int
    numpy_args.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 6, 5)
    torch.testing.assert_close(numpy_args(x), plain(x))
    c = plain.conv
    w = (c.weight, c.bias, plain.qkv_conv.weight, None, plain.attn_out.weight, None)
    torch.testing.assert_close(
        aa_conv2d(x, *w, num_heads=np.int64(2), stride=(2, 1), padding=1),
        aa_conv2d(x, *w, num_heads=2, stride=(2, 1), padding=1),
    )
    with pytest.raises(TypeError, match=r"dk: expected an int \(channels\) or a float"):
        AAConv2d(4, 16, 3, dk=np.bool_(True), dv=4, num_heads=2)


def test_numpy_bools_are_taken_as_bools() -> None:
    """``relative=np.True_`` (a flag read from an array) was refused as "expected a bool, got
    bool" until 2026-12-03."""
    m = AAConv2d(4, 16, 3, dk=8, dv=4, num_heads=2, relative=np.True_, bias=np.False_)
    assert m.relative is True and m.conv.bias is None
    assert AAConv2d(4, 16, 3, dk=8, dv=4, num_heads=2, relative=np.False_).rel_h is None


def test_bad_call_arguments() -> None:
    m = AAConv2d(4, 16, 3, dk=8, dv=4, num_heads=2)
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        m(torch.randn(4, 5, 5))
    valid = AAConv2d(4, 16, 5, padding=0, dk=8, dv=4, num_heads=2)
    with pytest.raises(ValueError, match=r"x: a \(3, 3\) map gives an empty \(0, 0\) output"):
        valid(torch.randn(1, 4, 3, 3))
    # Built tables (input_size) or none: until 2026-12-02 F.conv2d's "Kernel size can't be greater
    # than actual input size", naming neither x nor the layer.
    for built in (
        AAConv2d(4, 16, 5, padding=0, dk=8, dv=4, num_heads=2, input_size=8),
        AAConv2d(4, 16, 5, padding=0, dk=8, dv=4, num_heads=2, relative=False),
    ):
        with pytest.raises(ValueError, match=r"x: a \(3, 4\) map gives an empty \(0, 0\) output"):
            built(torch.randn(1, 4, 3, 4))
    w = dict(
        conv_weight=torch.randn(12, 4, 3, 3), conv_bias=None,
        qkv_weight=torch.randn(20, 4, 1, 1), qkv_bias=None,
        out_weight=torch.randn(4, 4, 1, 1), out_bias=None,
    )  # fmt: skip
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor"):
        aa_conv2d(x[0], **w, num_heads=2, padding=1)
    with pytest.raises(ValueError, match=r"rel_h: expected shape \(n, dkh\) = \(n, 4\)"):
        aa_conv2d(x, **w, rel_h=torch.randn(9, 3), rel_w=torch.randn(9, 4), num_heads=2, padding=1)
    with pytest.raises(ValueError, match=r"rel_h, rel_w: expected both"):
        aa_conv2d(x, **w, rel_h=torch.randn(9, 4), num_heads=2, padding=1)
    with pytest.raises(ValueError, match=r"dk = 8 \(from the weights\) does not divide"):
        aa_conv2d(x, **w, num_heads=3, padding=1)
    with pytest.raises(ValueError, match=r"out_weight: expected shape \(dv, dv, 1, 1\)"):
        aa_conv2d(x, **{**w, "out_weight": torch.randn(4, 2, 1, 1)}, num_heads=2, padding=1)
    with pytest.raises(ValueError, match=r"resize_rel_table|length: expected a positive int"):
        resize_rel_table(torch.randn(3, 2), 0)
    # The functional op names a map too small for its kernel (until 2026-12-02 F.conv2d's "Kernel
    # size can't be greater than actual input size", naming neither x nor the kernel), and bad
    # conv arguments with ValueError (F.conv2d raises RuntimeError).
    small = torch.randn(1, 4, 2, 5)
    with pytest.raises(ValueError, match=r"x: a \(2, 5\) map gives an empty \(0, 3\) output"):
        aa_conv2d(small, **w, num_heads=2)
    with pytest.raises(ValueError, match=r"x: a \(2, 5\) map gives an empty \(0, 5\) output"):
        aa_conv2d(small, **w, num_heads=2, dilation=2, padding=(0, 2))
    for bad, match in (
        (dict(stride=0), r"stride: expected an int >= 1 or a pair of them, got 0"),
        (dict(stride=(1, 2, 3)), r"stride: expected an int >= 1 .* got \(1, 2, 3\)"),
        (dict(dilation=(1, 0)), r"dilation: expected an int >= 1 .* got \(1, 0\)"),
        (dict(padding=-1), r"padding: expected an int >= 0 .* got -1"),
        (dict(padding="full"), r"padding: expected 'same', 'valid' or ints >= 0, got 'full'"),
        (dict(padding="same", stride=2), r"padding: 'same' needs stride 1, got stride \(2, 2\)"),
    ):
        with pytest.raises(ValueError, match=match):
            aa_conv2d(x, **w, num_heads=2, **bad)
    # dtypes: F.conv2d's "expected scalar type Double but found Float" named no argument.
    with pytest.raises(TypeError, match=r"x: expected a floating dtype, got torch.int64"):
        aa_conv2d(x.long(), **w, num_heads=2, padding=1)
    with pytest.raises(TypeError, match=r"conv_weight: expected dtype torch.float64 \(the dtype"):
        aa_conv2d(x.double(), **w, num_heads=2, padding=1)
    with pytest.raises(TypeError, match=r"qkv_weight: expected dtype torch.float32 .*bfloat16"):
        aa_conv2d(x, **{**w, "qkv_weight": w["qkv_weight"].bfloat16()}, num_heads=2, padding=1)
    # Under autocast the weights may keep their dtype, as F.conv2d's would.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = aa_conv2d(x.bfloat16(), **w, num_heads=2, padding=1)
    assert mixed.dtype == torch.bfloat16 and mixed.shape == (1, 16, 5, 5)
    # The layer blames x for a channel count its weights do not take.
    with pytest.raises(ValueError, match=r"x: expected in_channels = 4 channels .* \(1, 3, 5, 5\)"):
        m(torch.randn(1, 3, 5, 5))
    # ... and for a dtype or device its parameters are not in (until 2026-12-03 the message blamed
    # conv_weight, which the layer's user never passed); autocast may mix them, as above.
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 \(the layer's param"):
        m(x.double())
    with pytest.raises(ValueError, match=r"x: expected device cpu \(the layer's parameters\)"):
        m(x.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x.bfloat16()).dtype == torch.bfloat16
    # The strings F.conv2d takes still work, and give its output grid.
    assert aa_conv2d(x, **w, num_heads=2, padding="same").shape == (1, 16, 5, 5)
    assert aa_conv2d(x, **w, num_heads=2, padding="valid").shape == (1, 16, 3, 3)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(qkv_weight=torch.randn(20, 4, 3, 3)), ValueError, r"qkv_weight: expected shape"),
        (dict(qkv_weight=torch.randn(20, 5, 1, 1)), ValueError, r"qkv_weight: .*Cin from x"),
        (dict(qkv_weight=None), TypeError, r"qkv_weight: expected a torch.Tensor, got NoneType"),
        (dict(qkv_weight=np.zeros((20, 4, 1, 1))), TypeError, r"qkv_weight: .* got ndarray"),
        (dict(out_weight=torch.randn(4, 4, 3, 3)), ValueError, r"out_weight: expected shape"),
        (dict(out_weight=torch.randn(0, 0, 1, 1)), ValueError, r"out_weight: expected shape"),
        (dict(out_weight=None), TypeError, r"out_weight: expected a torch.Tensor"),
        (dict(conv_weight=torch.randn(12, 3, 3, 3)), ValueError, r"conv_weight: expected shape"),
        (dict(conv_bias=torch.randn(11)), ValueError, r"conv_bias: expected shape \(Fout - dv,\)"),
        (dict(qkv_bias=torch.randn(19)), ValueError, r"qkv_bias: expected shape .* = \(20,\)"),
        (dict(out_bias=[0.0] * 4), TypeError, r"out_bias: expected a torch.Tensor or None"),
        (dict(rel_h=torch.randn(0, 4)), ValueError, r"rel_h: expected shape .* with n >= 1"),
        (dict(rel_w=torch.randn(9)), ValueError, r"rel_w: expected shape \(n, dkh\)"),
        # F.conv2d of a CPU x with a meta weight returned uninitialised CPU memory.
        (dict(out_weight=torch.randn(4, 4, 1, 1, device="meta")), ValueError,
         r"out_weight: expected device cpu \(the device of x\), got meta"),
        (dict(qkv_weight=torch.randn(20, 4, 1, 1, device="meta")), ValueError,
         r"qkv_weight: expected device cpu .* got meta"),
        (dict(conv_bias=torch.randn(12, device="meta")), ValueError,
         r"conv_bias: expected device cpu .* got meta"),
        (dict(rel_h=torch.randn(9, 4, device="meta")), ValueError,
         r"rel_h: expected device cpu .* got meta"),
    ],
)  # fmt: skip
def test_aa_conv2d_names_the_bad_weight(overrides: dict, error: type, match: str) -> None:
    w = dict(
        conv_weight=torch.randn(12, 4, 3, 3), conv_bias=torch.randn(12),
        qkv_weight=torch.randn(20, 4, 1, 1), qkv_bias=torch.randn(20),
        out_weight=torch.randn(4, 4, 1, 1), out_bias=torch.randn(4),
        rel_h=torch.randn(9, 4), rel_w=torch.randn(9, 4),
    )  # fmt: skip
    x = torch.randn(1, 4, 5, 5)
    assert aa_conv2d(x, **w, num_heads=2, padding=1).shape == (1, 16, 5, 5)
    with pytest.raises(error, match=match):
        aa_conv2d(x, **{**w, **overrides}, num_heads=2, padding=1)


def test_split_heads_names_the_depth_that_does_not_divide() -> None:
    qkv = torch.randn(1, 4 + 4 + 3, 2, 2)
    with pytest.raises(ValueError, match=r"dv = 3 does not divide by num_heads = 2"):
        split_heads(qkv, dk=4, dv=3, num_heads=2)
    with pytest.raises(ValueError, match=r"dk = 3 does not divide by num_heads = 2"):
        split_heads(torch.randn(1, 3 + 3 + 4, 2, 2), dk=3, dv=4, num_heads=2)


@pytest.mark.parametrize(
    ("dk", "dv", "channels", "name"),
    [
        (0, 10, 10, "dk"),
        (-2, 14, 10, "dk"),
        (4, 0, 8, "dv"),
        (4.0, 2, 10, "dk"),
        (True, 1, 3, "dk"),
    ],
)
def test_split_heads_names_a_depth_that_is_not_a_positive_int(
    dk: object, dv: object, channels: int, name: str
) -> None:
    # Both once passed (empty heads, left for attention_2d to refuse) or reached torch.split's
    # message, which names neither depth.
    qkv = torch.randn(1, channels, 2, 3)
    with pytest.raises(ValueError, match=rf"{name}: expected a positive int, got"):
        split_heads(qkv, dk, dv, num_heads=1)  # type: ignore[arg-type]


def test_fx_symbolic_trace_is_refused_with_the_way_around_it() -> None:
    # It once said "x: expected a 4-D tensor (B, Cin, H, W), got Proxy".
    layer = AAConv2d(8, 8, 3, dk=4, dv=2, num_heads=2, input_size=6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer)
    with pytest.raises(TypeError, match=r"x: a torch.fx Proxy.*leaf module"):
        torch.fx.symbolic_trace(model)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, AAConv2d) or super().is_leaf_module(module, name)

    x = torch.randn(2, 3, 6, 6)
    traced = torch.fx.GraphModule(model, Tracer().trace(model))
    torch.testing.assert_close(traced(x), model(x))


def test_from_conv2d_keeps_the_first_filters() -> None:
    conv = nn.Conv2d(6, 16, 3, stride=2, padding=1)
    aa = AAConv2d.from_conv2d(conv, dk=8, dv=4, num_heads=2)
    assert aa.conv.stride == (2, 2) and aa.conv.padding == (1, 1)
    x = torch.randn(2, 6, 8, 10)
    torch.testing.assert_close(aa(x)[:, :12], conv(x)[:, :12])
    assert aa(x).shape == conv(x).shape
    with pytest.raises(ValueError, match=r"conv: expected groups=1"):
        AAConv2d.from_conv2d(nn.Conv2d(4, 16, 3, groups=2), dk=8, dv=4, num_heads=2)
    with pytest.raises(TypeError, match=r"conv: expected an nn.Conv2d"):
        AAConv2d.from_conv2d(nn.Linear(4, 4))


def test_augment_model() -> None:
    def make() -> nn.Module:
        torch.manual_seed(6)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()),
            nn.Conv2d(16, 8, 1),
        )

    x = torch.randn(2, 3, 8, 8)
    original = make()
    model = augment_model(make(), where=["2.0"], dk=8, dv=4, num_heads=2)
    assert isinstance(model[2][0], AAConv2d) and type(model[0]) is nn.Conv2d
    assert model(x).shape == original(x).shape
    # The first layer is untouched, the augmented one keeps its first 12 filters.
    hidden, ref_hidden = model[1](model[0](x)), original[1](original[0](x))
    torch.testing.assert_close(model[2][0](hidden)[:, :12], original[2][0](ref_hidden)[:, :12])

    # A predicate sees every plain nn.Conv2d, never the convolutions inside an AAConv2d.
    seen = []
    augment_model(
        model,
        where=lambda name, conv: seen.append(name) or conv.out_channels == 16,
        dk=8, dv=4, num_heads=2,
    )  # fmt: skip
    assert seen == ["0", "3"] and isinstance(model[0], AAConv2d)
    with pytest.raises(ValueError, match=r"where: '2.0.conv' is not an nn.Conv2d"):
        augment_model(model, where=["2.0.conv"])


@pytest.mark.parametrize(
    "refused,match",
    [
        (nn.Conv2d(16, 16, 3, padding=1, groups=4), r"where: '1' cannot be replaced: .*groups=1"),
        (nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), r"padding_mode='zeros'"),
        (nn.Conv2d(16, 4, 3, padding=1), r"'1' cannot be replaced: dv: expected fewer than"),
    ],
    ids=["groups", "padding_mode", "too_few_channels"],
)
def test_augment_model_refusing_a_conv_changes_nothing(refused: nn.Conv2d, match: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), refused)
    before = list(model)
    for where in (["0", "1"], lambda name, conv: True):
        with pytest.raises(ValueError, match=match):
            augment_model(model, where=where, dk=8, dv=4, num_heads=2)
        assert list(model) == before  # the same modules, the first one not replaced either


def test_augment_model_example_input_builds_each_layer_at_its_own_size() -> None:
    """Without it the tables are lazy: a deepcopy made before the first forward (an EMA copy, a
    second run from the same seed) draws other tables, and ``input_size=`` is one size for every
    layer, the image's for a layer past a stride."""

    def make() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.Dropout(0.5),
        )

    x = torch.randn(2, 3, 12, 10)
    models = []
    for _ in range(2):
        model = make().train()
        torch.manual_seed(4)
        augment_model(model, where=["2", "3"], example_input=x, dk=8, dv=4, num_heads=2)
        models.append(model)
    model = models[0]
    # Layer "2" sees the 12 x 10 input and attends at its 6 x 5 output; "3" sees 6 x 5.
    assert model[2].nominal_size == (6, 5) and model[3].nominal_size == (6, 5)
    assert model[2].rel_h.shape == (11, 4) and not is_lazy(model[3].rel_w)
    # The probe forward ran in eval mode: BatchNorm statistics untouched, training restored.
    assert model.training and model[1].training and model[1].num_batches_tracked == 0
    torch.testing.assert_close(model[1].running_mean, torch.zeros(16))
    ema = copy.deepcopy(model).eval()
    model.eval()
    torch.testing.assert_close(ema(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(models[1].eval()(x), model(x), rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"example_input, input_size: pass one of them"):
        augment_model(make(), where=["2"], example_input=x, input_size=6, dk=8, dv=4, num_heads=2)

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 16, 3, padding=1)
            self.spare = nn.Conv2d(16, 16, 3, padding=1)  # never called by forward

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    unused = Unused()
    with pytest.raises(ValueError, match=r"example_input: .* never called \['spare'\]"):
        augment_model(unused, where=["spare"], example_input=x, dk=8, dv=4, num_heads=2)
    assert type(unused.spare) is nn.Conv2d


def test_from_conv2d_keeps_frozen_filters_frozen() -> None:
    conv = nn.Conv2d(6, 16, 3, padding=1)
    conv.weight.requires_grad_(False)
    aa = AAConv2d.from_conv2d(conv, dk=8, dv=4, num_heads=2, input_size=4)
    assert not aa.conv.weight.requires_grad and aa.conv.bias.requires_grad
    conv.bias.requires_grad_(False)
    model = augment_model(nn.Sequential(conv), where=["0"], dk=8, dv=4, num_heads=2)
    assert not model[0].conv.weight.requires_grad and not model[0].conv.bias.requires_grad
    new = [model[0].qkv_conv.weight, model[0].qkv_conv.bias, model[0].attn_out.weight]
    assert all(p.requires_grad for p in new + [model[0].rel_h, model[0].rel_w])


def test_augment_model_replaces_a_shared_conv_by_one_shared_layer() -> None:
    shared = nn.Conv2d(16, 16, 3, padding=1)
    for where in (["2"], lambda name, conv: name == "0"):
        model = nn.Sequential(shared, nn.ReLU(), shared)
        augment_model(model, where=where, dk=8, dv=4, num_heads=2)
        assert isinstance(model[0], AAConv2d) and model[0] is model[2]


def test_from_conv2d_refuses_an_uninitialised_lazy_conv() -> None:
    lazy = nn.LazyConv2d(16, 3, padding=1)
    with pytest.raises(ValueError, match=r"conv: an uninitialised LazyConv2d .* forward pass"):
        AAConv2d.from_conv2d(lazy, dk=8, dv=4, num_heads=2)
    with pytest.raises(ValueError, match=r"where: '0' cannot be replaced: conv: an uninitialised"):
        augment_model(nn.Sequential(lazy), where=["0"], dk=8, dv=4, num_heads=2)
    lazy(torch.randn(1, 3, 4, 4))
    assert AAConv2d.from_conv2d(lazy, dk=8, dv=4, num_heads=2).in_channels == 3


def test_from_conv2d_refuses_a_conv_with_its_own_forward() -> None:
    """A subclass that changes what its filters compute (here: weight standardisation) would
    silently become a plain convolution."""

    class StandardizedConv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    with pytest.raises(TypeError, match="conv: StandardizedConv2d overrides nn.Conv2d's forward"):
        AAConv2d.from_conv2d(StandardizedConv2d(3, 16, 3, padding=1), dk=8, dv=4, num_heads=2)

    class TaggedConv2d(nn.Conv2d):  # a subclass that computes the same is fine
        tag = "backbone"

    layer = AAConv2d.from_conv2d(TaggedConv2d(3, 16, 3, padding=1), dk=8, dv=4, num_heads=2)
    assert layer.out_channels == 16


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none"
)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name,kwargs,size", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_gpu_backends_match_paper_formula(name: str, kwargs: dict, size: tuple) -> None:
    m = AAConv2d(3, 10, dk=4, dv=4, num_heads=2, dtype=torch.float64, **kwargs)
    randomize_(m, seed=1)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = paper_formula(x, m)
    gpu = copy.deepcopy(m).cuda()
    for backend in available_backends("cuda"):
        gpu.backend = backend
        torch.testing.assert_close(gpu(x.cuda()).cpu(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@needs_cuda
def test_gpu_gradcheck() -> None:
    m = AAConv2d(2, 6, 3, dk=4, dv=2, num_heads=2, input_size=(2, 3), dtype=torch.float64)
    m = randomize_(m, seed=2).cuda()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    x = torch.randn(1, 2, 3, 2, dtype=torch.float64, device="cuda", requires_grad=True)

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    for backend in available_backends("cuda"):
        m.backend = backend
        assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_autocast(dtype: torch.dtype) -> None:
    for backend in available_backends("cuda"):
        check_autocast(backend, "cuda", dtype)
