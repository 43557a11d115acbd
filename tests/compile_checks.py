"""``torch.compile(dynamic=True)`` of ``attention_2d``: shared by the CPU and GPU suites."""

from __future__ import annotations

import torch

import aanet_kernels as ak
from tests.attention_cases import Case, make_inputs

# Sizes of at least 2 (PyTorch specializes 0 and 1), all different within the first case (equal
# sizes would be assumed to stay equal: duck sizing), the map, batch and head dims all changing.
DYNAMIC_CASES = (Case(2, 3, 4, 5, 6, 7), Case(3, 2, 5, 3, 4, 6), Case(4, 5, 2, 7, 3, 2))


def check_compile_dynamic_shapes(
    backend: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    tolerance: float = 1e-10,
    *,
    one_graph: bool = True,
) -> None:
    """Compile a call of the op with ``dynamic=True`` (batch, map size and head dims symbolic from
    the first call) and compare it, forward and backward, with eager at several sizes.

    ``one_graph``: every later size must run the first graph (a recompile is an error). The Triton
    kernels take the map size and head dims as compile-time constants, so there each new size is a
    new graph, which must still trace and match.
    """
    torch._dynamo.reset()

    def attend(q, k, v, bias_h, bias_w, height, width):  # type: ignore[no-untyped-def]
        # The default scale on purpose: Dynamo lifts a float default into a graph input.
        return ak.attention_2d(q, k, v, bias_h, bias_w, height=height, width=width, backend=backend)

    compiled = torch.compile(attend, dynamic=True, fullgraph=True, backend="aot_eager")
    for n, case in enumerate(DYNAMIC_CASES):
        inputs = make_inputs(case, dtype, device, requires_grad=True, seed=3)
        stance = "fail_on_recompile" if n and one_graph else "default"
        with torch.compiler.set_stance(stance):
            got = compiled(*inputs, case.height, case.width)
        expected = attend(*inputs, case.height, case.width)
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        grad_out = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, inputs, grad_out)
        expected_grads = torch.autograd.grad(expected, inputs, grad_out)
        for g, e in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance)
