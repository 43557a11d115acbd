"""Choosing a backend: argument, context manager, environment variable, auto; errors."""

from __future__ import annotations

import pytest
import torch

import aanet_kernels as ak
from aanet_kernels import backends
from aanet_kernels.backends import ENV_VAR

needs_extension = pytest.mark.skipif(
    "cpu" not in ak.available_backends("cpu"), reason="the C++ extension is not built"
)


def test_reference_is_always_available():
    assert "reference" in ak.available_backends()
    assert "reference" in ak.available_backends("cpu")


def test_unknown_backend_is_an_error():
    """A ValueError naming the argument wherever the name is given (until 2026-12-03 the op and
    the functional aa_conv2d raised a RuntimeError, the layer and use_backend a ValueError)."""
    with pytest.raises(ValueError, match="backend: expected one of .* got 'fast'"):
        ak.resolve_backend("fast", torch.device("cpu"))
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="backend: expected one of .* got 'gpu'"):
        ak.attention_2d(q, q, q, height=1, width=2, backend="gpu")
    with pytest.raises(ValueError, match="backend: expected one of"):
        with ak.use_backend("fast"):
            pass


def test_unavailable_backend_is_an_error_not_a_fallback():
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: .*CUDA tensors"):
        ak.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_compiled_call_on_a_backend_that_cannot_run_is_the_eager_error(fullgraph):
    """Until 2026-12-04 torch.compile reported it as its own InternalTorchDynamoError, fullgraph
    or not (it was raised inside the function Dynamo takes as a constant), which reads as a bug
    in torch."""
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q: ak.attention_2d(q, q, q, height=2, width=3, backend="cuda"),
        backend="eager",
        fullgraph=fullgraph,
    )
    # fullgraph=True: Dynamo's Unsupported "Observed exception", as for any error of the call,
    # the message in its debug context (the README says so).
    expected = torch._dynamo.exc.Unsupported if fullgraph else RuntimeError
    with pytest.raises(expected, match="backend='cuda' is not available: .*CUDA tensors") as e:
        compiled(torch.randn(1, 2, 6, 4))
    assert type(e.value) is expected


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_compiled_call_with_a_bad_input_is_the_eager_error_or_dynamos_naming_it(fullgraph):
    """What the README says a compiled call's input error looks like."""
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda q: ak.attention_2d(q, q, q, height=2, width=4),  # L = 6, not 2 x 4
        backend="eager",
        fullgraph=fullgraph,
    )
    expected = torch._dynamo.exc.Unsupported if fullgraph else ValueError
    with pytest.raises(expected, match=r"height \* width") as e:
        compiled(torch.randn(1, 2, 6, 4))
    assert type(e.value) is expected


def test_a_str_device_is_taken():
    assert ak.resolve_backend("reference", "cpu") == "reference"
    assert ak.resolve_backend("auto", "cpu") == ak.resolve_backend("auto", torch.device("cpu"))


def test_a_bad_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=rf"{ENV_VAR} \(environment variable\): expected one of"):
        ak.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=rf"backend='cuda' \(from {ENV_VAR}\) is not available"):
        ak.resolve_backend("auto", torch.device("cpu"))
    with ak.use_backend("reference"):  # a use_backend wins over the variable
        assert ak.resolve_backend("auto", torch.device("cpu")) == "reference"
    with ak.use_backend("cuda"), pytest.raises(RuntimeError, match=r"\(from use_backend\)"):
        ak.resolve_backend("auto", torch.device("cpu"))


def test_cuda_device_lists_only_what_can_run_there():
    """A CUDA-built extension on a machine without a GPU does not make the GPU backends
    available; with a GPU, every listed backend actually runs."""
    listed = ak.available_backends("cuda")
    assert "reference" in listed
    if not torch.cuda.is_available():
        assert listed == ["reference"]
        return
    q = torch.randn(1, 1, 6, 4, device="cuda")
    for backend in listed:
        out = ak.attention_2d(q, q, q, height=2, width=3, backend=backend)
        assert out.shape == q.shape


def test_precedence_argument_context_environment(monkeypatch: pytest.MonkeyPatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert ak.resolve_backend("auto", cpu) == "reference"
    expected_auto = "cpu" if "cpu" in ak.available_backends("cpu") else "reference"
    with ak.use_backend("auto"):
        monkeypatch.delenv(ENV_VAR)
        assert ak.resolve_backend("auto", cpu) == expected_auto
    with ak.use_backend("reference"):
        assert ak.resolve_backend("auto", cpu) == "reference"
        if "cpu" in ak.available_backends("cpu"):
            assert ak.resolve_backend("cpu", cpu) == "cpu"  # an explicit argument wins


def test_context_manager_restores_on_exit():
    with ak.use_backend("reference"):
        pass
    assert ak.backends._context_backend.get() is None


def test_auto_passes_over_kernels_compiled_for_smaller_heads(monkeypatch: pytest.MonkeyPatch):
    from aanet_kernels import backends

    # Pretend the CPU runs Triton (the interpreter does), ahead of the C++ kernel in auto's order.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "reference"))
    cpu = torch.device("cpu")
    assert ak.resolve_backend("auto", cpu, head_dim=64) == "triton"
    assert ak.resolve_backend("auto", cpu, head_dim=300) == "reference"


def _pretend_triton_runs_first_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton ahead of the C++ kernel in auto's CPU order (the interpreter runs Triton on CPU
    tensors), as it is ahead of the CUDA kernels on a GPU."""
    from aanet_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton", "cpu", "reference"))


def _wide_rows(length: int, dim: int) -> torch.Tensor:
    """A ``(1, 1, length, dim)`` view whose rows lie 2^28 elements apart in a reserved, untouched
    buffer: from row 8 on, offsets pass 2^31."""
    buffer = torch.empty(length * 2**28, dtype=torch.float16)
    return buffer.as_strided((1, 1, length, dim), (0, 0, 2**28, 1))


@pytest.mark.parametrize(
    ("what", "make_q"),
    [
        ("a slice reaching past int32 offsets", lambda: _wide_rows(9, 4)),
        ("more batch elements than a grid axis holds", lambda: torch.empty(65536, 1, 1, 4)),
        ("more heads than a grid axis holds", lambda: torch.empty(1, 65536, 1, 4)),
        ("a head dim past every GPU kernel's", lambda: torch.empty(1, 1, 1, 257)),
    ],
)
def test_auto_steps_past_a_backend_that_would_refuse_the_size(
    monkeypatch: pytest.MonkeyPatch, what: str, make_q
):
    """Until 2026-12-02 auto chose triton here, which then refused the call."""
    from aanet_kernels.backends import resolve_backend_for_call

    _pretend_triton_runs_first_on_the_cpu(monkeypatch)
    small = torch.empty(1, 1, 9, 4)
    assert resolve_backend_for_call("auto", small, small, small) == "triton"
    q = make_q()
    assert resolve_backend_for_call("auto", q, q, q) in ("cpu", "reference"), what
    # An explicit choice is not second-guessed: the kernel refuses it, naming the argument.
    assert resolve_backend_for_call("triton", q, q, q) == "triton"


def test_size_limits_of_each_kernel():
    from aanet_kernels.limits import CPU_MAX_HEAD_DIM, CUDA_MAX_LENGTH, exceeds_limits

    # L past the cuda kernels' int positions, as a stride-0 view (nothing allocated): within
    # Triton's offsets, since every row is the same element.
    long_q = torch.empty(1, 1, 1, 2).expand(1, 1, CUDA_MAX_LENGTH + 1, 2)
    assert exceeds_limits("cuda", long_q, long_q, long_q)
    assert not exceeds_limits("triton", long_q, long_q, long_q)
    wide = _wide_rows(9, 4)
    assert exceeds_limits("triton", wide, wide, wide)
    assert not exceeds_limits("cuda", wide, wide, wide)  # 64-bit strides
    head_129 = torch.empty(1, 1, 4, 129)
    assert exceeds_limits("cuda", head_129, head_129, head_129)
    assert not exceeds_limits("triton", head_129, head_129, head_129)
    for backend in ("cpu", "reference"):
        assert not exceeds_limits(backend, wide, wide, wide)
    # A head dim past BLAS's int (stride 0: nothing allocated): the cpu kernel refuses it.
    blas_wide = torch.empty(1, 1, 1, 1).expand(1, 1, 1, CPU_MAX_HEAD_DIM + 1)
    assert exceeds_limits("cpu", blas_wide, blas_wide, blas_wide)
    assert not exceeds_limits("reference", blas_wide, blas_wide, blas_wide)


def _graph_recorder(graphs: list[str]):  # type: ignore[no-untyped-def]
    """A fresh Dynamo state and a torch.compile backend that appends each graph's text to
    ``graphs`` and runs it as traced."""
    torch._dynamo.reset()

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):  # type: ignore[no-untyped-def]
        graphs.append(str(gm.graph))
        return gm.forward

    return recording_backend


@needs_extension
def test_compiled_code_follows_the_use_backend_in_force():
    # The choice is made at trace time; a compiled function called under another use_backend must
    # retrace (a guard), not keep running the backend it was traced with. Until 2026-12-01 it kept
    # it: a second model instance compiled under another use_backend ran the first one's backend.
    graphs: list[str] = []
    recording_backend = _graph_recorder(graphs)

    def attend(q: torch.Tensor) -> torch.Tensor:
        return ak.attention_2d(q, q, q, height=2, width=3)

    compiled = torch.compile(attend, fullgraph=True, backend=recording_backend)
    q = torch.randn(1, 2, 6, 4)

    def ran_fused_op() -> bool:
        compiled(q)  # any tracing first: it runs the op on fake tensors, which the profiler sees
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.testing.assert_close(compiled(q), attend(q))
        # attend(q) runs eagerly under the same use_backend: count the compiled call's share.
        calls = [e.count for e in prof.key_averages() if e.key == "aanet_kernels::attention_2d_fwd"]
        return sum(calls) == 2

    for backend, expect_fused in (("cpu", True), ("reference", False), ("cpu", True)):
        with ak.use_backend(backend):
            assert ran_fused_op() == expect_fused, backend
    assert len(graphs) == 2, "the second use_backend('cpu') should reuse the first graph"
    assert "aanet_kernels.attention_2d_fwd" in graphs[0]
    assert "aanet_kernels.attention_2d_fwd" not in graphs[1]


@needs_extension
def test_compiled_code_follows_a_changed_environment_variable(monkeypatch):
    # Dynamo guards on the variable read at trace time: a change retraces rather than keeping
    # the backend the first trace chose (the README says so).
    graphs: list[str] = []
    compiled = torch.compile(
        lambda q: ak.attention_2d(q, q, q, height=2, width=3),
        fullgraph=True,
        backend=_graph_recorder(graphs),
    )
    q = torch.randn(1, 2, 6, 4)
    for backend in ("cpu", "reference", "cpu"):
        monkeypatch.setenv(ENV_VAR, backend)
        compiled(q)
    assert len(graphs) == 2, "the second cpu call should reuse the first graph"
    assert "aanet_kernels.attention_2d_fwd" in graphs[0]
    assert "aanet_kernels.attention_2d_fwd" not in graphs[1]


@needs_extension
def test_use_backend_inside_a_compiled_function_chooses_for_its_block_only():
    # Until 2026-12-02 a use_backend inside the compiled function failed under fullgraph=True
    # (Dynamo cannot trace ContextVar.set) and broke the graph otherwise.
    graphs: list[str] = []
    recording_backend = _graph_recorder(graphs)

    def attend_twice(q: torch.Tensor) -> torch.Tensor:
        with ak.use_backend("reference"):
            inner = ak.attention_2d(q, q, q, height=2, width=3)
        return inner + ak.attention_2d(q, q, q, height=2, width=3)  # auto again: cpu

    q = torch.randn(1, 2, 6, 4)
    compiled = torch.compile(attend_twice, fullgraph=True, backend=recording_backend)
    torch.testing.assert_close(compiled(q), attend_twice(q))
    assert len(graphs) == 1
    assert graphs[0].count("aanet_kernels.attention_2d_fwd") == 1, graphs[0]

    def attend_on_cuda(q: torch.Tensor) -> torch.Tensor:
        with ak.use_backend("cuda"):
            return ak.attention_2d(q, q, q, height=2, width=3)

    # The error the eager call gives, naming where the choice came from.
    with pytest.raises(RuntimeError, match=r"backend='cuda' \(from use_backend\)"):
        torch.compile(attend_on_cuda, fullgraph=True, backend="eager")(q)
    assert backends._traced_context_backend is None  # the failed trace left nothing in force


def test_use_backend_blocks_overlapping_in_two_threads_leave_nothing_behind():
    """The process-wide backend that compiled code reads is the most recent use_backend still
    open; once every block has closed it is none. Until 2026-12-02 each block saved and restored
    it, so two threads whose blocks overlapped (A enters, B enters, A exits, B exits) left B's
    saved value, A's backend, in force for every later trace with no use_backend open."""
    import threading

    from aanet_kernels import backends

    a_in, b_in, a_out, b_out = (threading.Event() for _ in range(4))

    def block(backend: str, entered: threading.Event, leave: threading.Event) -> None:
        with ak.use_backend(backend):
            entered.set()
            assert leave.wait(10)

    thread_a = threading.Thread(target=block, args=("reference", a_in, a_out))
    thread_b = threading.Thread(target=block, args=("auto", b_in, b_out))
    thread_a.start()
    try:
        assert a_in.wait(10)
        thread_b.start()
        assert b_in.wait(10)
        assert backends._traced_context_backend == "auto"  # the innermost open one
        a_out.set()
        thread_a.join()
        assert backends._traced_context_backend == "auto"  # B's block is still open
    finally:
        a_out.set()
        b_out.set()
        thread_a.join()
        if thread_b.is_alive() or b_in.is_set():
            thread_b.join()
    assert backends._traced_context_backend is None
    with ak.use_backend("reference"):
        with ak.use_backend("auto"):
            assert backends._traced_context_backend == "auto"
        assert backends._traced_context_backend == "reference"
    assert backends._traced_context_backend is None
