"""Bad input raises an error that names the argument, through the Python API and the C++ op."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import aanet_kernels as ak
from aanet_kernels.functional import resize_rel_table, sam_relative_logits, split_heads

BACKENDS = ak.available_backends("cpu")


def _inputs(**overrides):
    base = dict(
        q=torch.randn(2, 2, 12, 4),
        k=torch.randn(2, 2, 12, 4),
        v=torch.randn(2, 2, 12, 3),
        bias_h=torch.randn(2, 2, 12, 3),
        bias_w=torch.randn(2, 2, 12, 4),
    )
    base.update(overrides)
    return base


CASES = [
    (dict(q=torch.randn(2, 12, 4)), "q: expected a 4-D tensor"),
    (dict(v=torch.randn(2, 2, 11, 3)), "v: expected shape"),
    (dict(k=torch.randn(2, 2, 12, 5)), "k: expected shape"),
    (dict(k=torch.randn(2, 2, 12, 4, dtype=torch.float64)), "k: expected dtype"),
    (dict(bias_h=torch.randn(2, 2, 12, 4)), "bias_h: expected shape"),
    (dict(bias_w=torch.randn(3, 2, 12, 4)), "bias_w: expected shape"),
    (dict(bias_w=torch.randn(2, 2, 12, 4, device="meta")), "bias_w: expected device"),
    (dict(q=torch.randint(0, 3, (2, 2, 12, 4))), "q: expected"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("overrides", "message"), CASES)
def test_python_api_names_the_argument(backend: str, overrides: dict, message: str):
    with pytest.raises((ValueError, TypeError), match=message):
        ak.attention_2d(**_inputs(**overrides), height=3, width=4, backend=backend)


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        (dict(height=True, width=12), "height, width: expected positive ints"),
        (dict(height=3.0, width=4), "height, width: expected positive ints"),
        (dict(height=3, width=4, scale="0.5"), "scale: expected a finite real number"),
        (dict(height=3, width=4, scale=float("nan")), "scale: expected a finite real number"),
        (dict(height=3, width=4, scale=float("inf")), "scale: expected a finite real number"),
        # An int past the largest float: float() of it raised a bare OverflowError.
        (dict(height=3, width=4, scale=10**400), "scale: expected a finite real number"),
        (dict(height=3, width=4, scale=-(10**400)), "scale: expected a finite real number"),
        # NumPy inf: compared in float32 (float16), the largest float was inf too and it passed,
        # and the reference backend returned NaN (until 2026-12-03).
        (dict(height=3, width=4, scale=np.float32("inf")), "scale: expected a finite real number"),
        (dict(height=3, width=4, scale=np.float16("-inf")), "scale: expected a finite real"),
        (dict(height=3, width=4, scale=np.float32("nan")), "scale: expected a finite real number"),
    ],
)
def test_geometry_and_scale_are_checked(geometry: dict, message: str):
    with pytest.raises(ValueError, match=message):
        ak.attention_2d(**_inputs(), **geometry)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_scale_past_float32s_range_is_named_below_float64(backend: str, dtype: torch.dtype):
    """Finite as a Python float but inf in the float32 logits: the triton backend failed in
    torch.full with a message naming nothing, cpu and reference returned NaN (until 2026-12-03)."""
    inputs = {n: t.to(dtype) for n, t in _inputs().items()}
    for scale in (1e39, -1e39):
        message = rf"scale: expected a magnitude of at most 3\.40282e\+38 for {dtype} inputs"
        with pytest.raises(ValueError, match=rf"{message} .* got {re.escape(repr(scale))}"):
            ak.attention_2d(**inputs, height=3, width=4, scale=scale, backend=backend)
    # The largest float32 itself is taken, and float64 inputs take any finite scale.
    ak.attention_2d(**inputs, height=3, width=4, scale=3.4e38, backend=backend)
    wide = {n: t.double() for n, t in _inputs().items()}
    out = ak.attention_2d(**wide, height=3, width=4, scale=1e39, backend=backend)
    assert not out.isnan().any()


def test_length_must_equal_height_times_width():
    with pytest.raises(ValueError, match=r"L = 12 does not equal height \* width = 3 \* 5"):
        ak.attention_2d(**_inputs(), height=3, width=5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize(("overrides", "message"), CASES)
def test_cpp_op_names_the_argument(overrides: dict, message: str):
    # The meta bias_w case reaches the op's fake (the Meta key wins the dispatch), which until
    # 2026-12-02 returned uninitialised CPU memory as the output.
    args = _inputs(**overrides)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aanet_kernels.attention_2d_fwd(*args.values(), 3, 4, 1.0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize(("overrides", "message"), [*CASES[:6], CASES[7]])
def test_cpp_op_on_meta_tensors_names_the_argument(overrides: dict, message: str):
    """On meta tensors the op runs its fake, not the C++ checks: until 2026-12-06 it returned an
    output for any of these (an int32 one for int32 inputs), and for a wrong L."""
    meta = [None if t is None else t.to("meta") for t in _inputs(**overrides).values()]
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.aanet_kernels.attention_2d_fwd(*meta, 3, 4, 1.0)
    meta = [None if t is None else t.to("meta") for t in _inputs().values()]
    with pytest.raises(ValueError, match="L = 12 does not equal height"):
        torch.ops.aanet_kernels.attention_2d_fwd(*meta, 4, 4, 1.0)
    out, lse = torch.ops.aanet_kernels.attention_2d_fwd(*meta, 3, 4, 1.0)
    assert (out.shape, out.dtype, lse.dtype) == ((2, 2, 12, 3), torch.float32, torch.float64)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("q", torch.randn(2, 2, 12, 4).int(), "q: expected a floating dtype"),
        ("grad_out", torch.randn(2, 2, 12, 4), "grad_out: expected shape"),
        ("out", torch.randn(2, 2, 12, 3).half(), "out: expected shape"),
        ("lse", torch.randn(2, 2, 12), "lse: expected the forward log-sum-exp"),
        ("lse", torch.randn(2, 2, 12, 1).double(), "lse: expected the forward log-sum-exp"),
    ],
)
def test_cpp_backward_on_meta_tensors_names_the_argument(name: str, bad, message: str):
    names = ["grad_out", "q", "k", "v", "bias_h", "bias_w", "out", "lse"]
    args = [t.to("meta") for t in _backward_args()]
    args[names.index(name)] = bad.to("meta")
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.aanet_kernels.attention_2d_bwd(*args, 3, 4, 1.0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("name", ["grad_out", "k", "bias_h", "out", "lse"])
def test_cpp_backward_names_a_tensor_on_another_device(name: str):
    args = _backward_args()
    index = ["grad_out", "q", "k", "v", "bias_h", "bias_w", "out", "lse"].index(name)
    args[index] = args[index].to("meta")
    with pytest.raises(RuntimeError, match=f"{name}: expected device cpu .* got meta"):
        torch.ops.aanet_kernels.attention_2d_bwd(*args, 3, 4, 1.0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_op_checks_length():
    with pytest.raises(RuntimeError, match="L = 12 does not equal height"):
        torch.ops.aanet_kernels.attention_2d_fwd(*_inputs().values(), 4, 4, 1.0)
    # (2**62 + 3) * 4 wraps to 12 in int64: until 2026-12-02 the op took it as L = 12.
    args = _inputs(bias_h=None, bias_w=None).values()
    with pytest.raises(RuntimeError, match=r"height \* width = \d+ \* 4 = more than int64 holds"):
        torch.ops.aanet_kernels.attention_2d_fwd(*args, 2**62 + 3, 4, 1.0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_cpp_op_checks_scale(scale: float):
    args = list(_inputs().values())
    with pytest.raises(RuntimeError, match="scale: expected a finite number"):
        torch.ops.aanet_kernels.attention_2d_fwd(*args, 3, 4, scale)
    out, lse = torch.ops.aanet_kernels.attention_2d_fwd(*args, 3, 4, 1.0)
    with pytest.raises(RuntimeError, match="scale: expected a finite number"):
        torch.ops.aanet_kernels.attention_2d_bwd(out, *args, out, lse, 3, 4, scale)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_op_checks_a_scale_past_float32s_range():
    args = list(_inputs().values())
    with pytest.raises(RuntimeError, match="scale: expected a magnitude of at most 3.40282e"):
        torch.ops.aanet_kernels.attention_2d_fwd(*args, 3, 4, 1e39)
    out, lse = torch.ops.aanet_kernels.attention_2d_fwd(*args, 3, 4, 1.0)
    with pytest.raises(RuntimeError, match="scale: expected a magnitude of at most 3.40282e"):
        torch.ops.aanet_kernels.attention_2d_bwd(out, *args, out, lse, 3, 4, -1e39)
    wide = [t.double() for t in args]
    torch.ops.aanet_kernels.attention_2d_fwd(*wide, 3, 4, 1e39)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpp_op_refuses_float8():
    """A floating dtype that is not one of the four (isFloatingType would let float8 through)."""
    args = _inputs(bias_h=None, bias_w=None)
    f8 = [t.to(torch.float8_e4m3fn) if t is not None else None for t in args.values()]
    for python in (True, False):
        with pytest.raises((RuntimeError, TypeError), match="q: expected .*float16, .*bfloat16"):
            if python:
                ak.attention_2d(*f8, height=3, width=4, backend="cpu")
            else:
                torch.ops.aanet_kernels.attention_2d_fwd(*f8, 3, 4, 1.0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("name", ["q", "v"])
def test_cpp_op_refuses_a_head_dim_past_blas_int(name: str):
    """The CPU kernel hands dkh and dvh to BLAS as int: until 2026-12-06 a head dim of 2^32 + 1
    wrapped to 1 there (a wrong answer, no error), once 32 GB of inputs were materialized. The
    inputs are stride-0 views, so the check must come before any copy."""
    one = torch.ones(1, 1, 1, 1)
    dims = dict(q=(2**32 + 1, 1), v=(1, 2**32 + 1))[name]
    qk, v = one.expand(1, 1, 1, dims[0]), one.expand(1, 1, 1, dims[1])
    dim_name = dict(q="dkh", v="dvh")[name]
    message = rf"{name}: the CPU kernel takes head dims up to 2147483647 .* {dim_name}=4294967297"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aanet_kernels.attention_2d_fwd(qk, qk, v, None, None, 1, 1, 1.0)
    lse = torch.zeros(1, 1, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aanet_kernels.attention_2d_bwd(v, qk, qk, v, None, None, v, lse, 1, 1, 1.0)


def _backward_args(**overrides):
    """attention_2d_bwd's inputs from a real forward, with ``overrides`` replacing some."""
    inputs = _inputs()
    out, lse = torch.ops.aanet_kernels.attention_2d_fwd(*inputs.values(), 3, 4, 1.0)
    args = dict(grad_out=torch.randn_like(out), **inputs, out=out, lse=lse)
    args.update(overrides)
    return list(args.values())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(grad_out=torch.randn(2, 2, 12, 4)), "grad_out: expected shape"),
        (dict(grad_out=torch.randn(2, 2, 12, 3, dtype=torch.float64)), "grad_out: expected"),
        (dict(out=torch.randn(2, 2, 11, 3)), "out: expected the forward output"),
        (dict(out=torch.randn(2, 2, 12, 3).half()), "out: expected the forward output"),
        (dict(lse=torch.randn(2, 2, 12, 1)), "lse: expected the forward log-sum-exp"),
        (dict(lse=torch.randn(2, 2, 12).half()), "lse: expected the forward log-sum-exp"),
        # fp32 inputs save an fp64 lse (ops.lse_dtype): an fp32 one has lost what it is for.
        (dict(lse=torch.randn(2, 2, 12)), "lse: expected .* dtype Double"),
    ],
)
def test_cpp_backward_checks_its_extra_inputs(overrides: dict, message: str):
    """What the backward takes besides the forward's inputs: the same checks on every device
    (until 2026-12-01 the CPU kernel checked shapes only, and cast an fp16 lse silently)."""
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aanet_kernels.attention_2d_bwd(*_backward_args(**overrides), 3, 4, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_taken_as_the_numbers_they_hold(backend: str):
    inputs = _inputs()
    plain = ak.attention_2d(**inputs, height=3, width=4, scale=0.5, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float32 scale warned "overflow encountered in cast"
        for scale in (np.float32(0.5), np.float16(0.5)):
            numpy_args = ak.attention_2d(
                **inputs, height=np.int64(3), width=np.int32(4), scale=scale, backend=backend
            )
            assert torch.equal(plain, numpy_args)
    with pytest.raises(ValueError, match="height, width: expected positive ints"):
        ak.attention_2d(**inputs, height=np.float64(3.0), width=4, backend=backend)


def test_relative_logits_refuses_integer_q_and_tables_of_another_dtype():
    q, table = torch.randn(1, 1, 4, 2), torch.randn(3, 2)
    with pytest.raises(TypeError, match="q: expected a floating dtype"):
        ak.relative_logits(q.long(), table, table, 2, 2)  # used to truncate the tables to 0
    with pytest.raises(TypeError, match=r"rel_h: expected dtype torch.float32 \(the dtype of q"):
        ak.relative_logits(q, table.double(), table, 2, 2)  # used to be rounded to fp32
    with pytest.raises(TypeError, match=r"rel_w: expected dtype torch.float64"):
        ak.relative_logits(q.double(), table.double(), table.long(), 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 tables, bf16 q: autocast's mix
        bias_h, bias_w = ak.relative_logits(q.bfloat16(), table, table, 2, 2)
        assert bias_h.dtype == bias_w.dtype == torch.bfloat16
        with pytest.raises(TypeError, match="rel_h: expected dtype torch.bfloat16"):
            ak.relative_logits(q.bfloat16(), table.long(), table, 2, 2)


def test_sam_relative_logits_takes_numpy_sizes():
    q, table_h, table_w = torch.randn(1, 2, 15, 4), torch.randn(9, 4), torch.randn(5, 4)
    plain = sam_relative_logits(q, table_h, table_w, 5, 3)
    numpy_args = sam_relative_logits(q, table_h, table_w, np.int64(5), np.int32(3))
    for a, b in zip(plain, numpy_args, strict=True):
        assert torch.equal(a, b)


def test_resize_rel_table_names_a_table_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="table: expected a torch.Tensor, got list"):
        resize_rel_table([[0.0, 1.0]], 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["q", "k", "v", "bias_h", "bias_w"])
def test_sparse_and_nested_inputs_are_named(backend: str, name: str):
    """Until 2026-12-02 a sparse input reached the dispatcher ("Could not run
    'aanet_kernels::attention_2d_fwd' with arguments from the 'SparseCPU' backend") and a nested
    one failed with an "Internal error" of its shape."""
    inputs = _inputs()
    sparse = _inputs(**{name: inputs[name].to_sparse()})
    with pytest.raises(TypeError, match=rf"{name}: expected a dense \(strided\) tensor, .*sparse"):
        ak.attention_2d(**sparse, height=3, width=4, backend=backend)
    if name == "q":
        nested = torch.nested.nested_tensor(list(inputs["q"]), layout=torch.jagged)
        with pytest.raises(TypeError, match=r"q: expected a dense \(strided\) tensor, .*nested"):
            ak.attention_2d(**_inputs(q=nested), height=3, width=4, backend=backend)


def test_relative_logits_names_a_table_on_another_device():
    """Until 2026-12-02 a table on another device than q was indexed and contracted there: a
    meta ``rel_h`` with CPU ``q`` gave a meta ``bias_h`` beside a CPU ``bias_w``."""
    q, table = torch.randn(1, 1, 4, 2), torch.randn(3, 2)
    with pytest.raises(
        ValueError, match=r"rel_h: expected device cpu \(the device of q\), got meta"
    ):
        ak.relative_logits(q, table.to("meta"), table, 2, 2)
    with pytest.raises(ValueError, match=r"rel_w: expected device cpu .* got meta"):
        ak.relative_logits(q, table, table.to("meta"), 2, 2)


def test_resize_rel_table_checks_its_table_and_takes_numpy_lengths():
    """Until 2026-12-02 an empty or integer table failed inside ``F.interpolate`` without naming
    it, and a NumPy length was refused where every map size takes one."""
    table = torch.randn(3, 2)
    torch.testing.assert_close(resize_rel_table(table, np.int64(5)), resize_rel_table(table, 5))
    for empty in (torch.randn(0, 2), torch.randn(3, 0)):  # (3, 0): "Non-empty 3D data tensor"
        with pytest.raises(
            ValueError, match=r"table: expected a 2-D tensor \(n, d\) with n, d >= 1"
        ):
            resize_rel_table(empty, 5)
    with pytest.raises(TypeError, match=r"table: expected a dense \(strided\) tensor"):
        resize_rel_table(table.to_sparse(), 5)
    with pytest.raises(TypeError, match=r"table: expected a floating dtype, got torch.int64"):
        resize_rel_table(torch.arange(6).view(3, 2), 5)


def test_relative_logits_names_a_sparse_argument():
    """Until 2026-12-02 a sparse q reached ``reshape``: "reshape is not implemented for sparse
    tensors", naming no argument."""
    q, table_h, table_w = torch.randn(1, 2, 6, 4), torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(
        TypeError, match=r"q: expected a dense \(strided\) tensor, got a torch.sparse_coo"
    ):
        ak.relative_logits(q.to_sparse(), table_h, table_w, 2, 3)
    with pytest.raises(TypeError, match=r"rel_w: expected a dense \(strided\) tensor"):
        ak.relative_logits(q, table_h, table_w.to_sparse(), 2, 3)


@pytest.mark.parametrize("qkv", [None, [[1.0]], np.zeros((1, 12, 2, 2))])
def test_split_heads_names_qkv_that_is_not_a_tensor(qkv: object):
    """Until 2026-12-02: "'NoneType' object has no attribute 'dim'"."""
    with pytest.raises(TypeError, match=r"qkv: expected a torch.Tensor, got "):
        split_heads(qkv, 4, 4, 2)  # type: ignore[arg-type]
