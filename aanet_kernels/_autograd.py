"""Autograd for the fused ``attention_2d`` ops, in eager mode, in compiled graphs and under
``torch.func`` transforms.

``attention_2d_autograd`` registers autograd on a forward/backward op pair (the C++ ops and the
Triton ops alike) and returns the differentiable forward that ``ops.attention_2d`` calls. First
derivatives are the fused backward op; what the fused kernels have no formula for (forward mode,
second derivatives) is computed through the reference path, only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._ops import OpOverload

from aanet_kernels import reference

Bias = Tensor | None


def reference_gradients(
    grad_out: Tensor, primals: dict[int, Tensor], height: int, width: int, scale: float
) -> dict[int, Tensor]:
    """The gradients of ``attention_2d`` through the reference path, computed with
    ``torch.func.vjp``. ``primals`` maps the positions of ``(q, k, v, bias_h, bias_w)`` to the
    tensors present (``torch.func`` takes no ``None``); the result has the same keys."""

    def attend(tensors: dict[int, Tensor]) -> Tensor:
        args = [tensors.get(i) for i in range(5)]
        return reference.attention_2d_reference(*args, height=height, width=width, scale=scale)

    _, pullback = torch.func.vjp(attend, primals)
    (grads,) = pullback(grad_out)
    return grads


def zeros_if_none(tensor: Tensor | None, like: Tensor) -> Tensor:
    """``tensor``, or zeros shaped like ``like`` for an absent (zero) tangent or cotangent."""
    return tensor if tensor is not None else torch.zeros_like(like)


def reference_gradients_pullback(
    inputs: tuple[Bias, ...], height: int, width: int, scale: float
) -> tuple[dict[int, Tensor], Callable[..., tuple[Tensor, dict[int, Tensor]]], dict[int, Tensor]]:
    """For ``inputs = (grad_out, q, k, v, bias_h, bias_w)``: the reference gradients (keyed as in
    :func:`reference_gradients`), their pullback to ``(grad_out, primals)``, and the present
    ``primals``."""
    grad_out, *tensors = inputs
    primals = {i: t for i, t in enumerate(tensors) if t is not None}
    grads, pullback = torch.func.vjp(
        lambda g, p: reference_gradients(g, p, height, width, scale), grad_out, primals
    )
    return grads, pullback, primals


def reference_second_order(
    cotangents: tuple[Tensor, ...], inputs: tuple[Bias, ...], height: int, width: int, scale: float
) -> tuple[Bias, ...]:
    """The vector-Jacobian product of the gradients of ``attention_2d``: for ``inputs = (grad_out,
    q, k, v, bias_h, bias_w)`` and cotangents (``None`` for zero) of ``(dq, dk, dv, dbias_h,
    dbias_w)``, the cotangents of ``inputs`` (``None`` for an absent bias).

    Recomputed through the reference path with ``torch.func``, so that it composes with autograd
    and with ``torch.func`` transforms alike and is differentiable again. It materialises the
    ``L x L`` logits once: the price of a second derivative (gradient penalties, Hessian-vector
    products), paid only when one is taken."""
    _, pullback, primals = reference_gradients_pullback(inputs, height, width, scale)
    d_grad_out, d_primals = pullback(
        {i: zeros_if_none(cotangents[i], t) for i, t in primals.items()}
    )
    return (d_grad_out, *(d_primals.get(i) for i in range(5)))


def reference_second_order_jvp(
    inputs: tuple[Bias, ...], tangents: tuple[Bias, ...], height: int, width: int, scale: float
) -> tuple[Tensor, ...]:
    """The Jacobian-vector product of the gradients of ``attention_2d`` (forward over reverse, as
    ``torch.func.hessian`` takes it): tangents of ``(dq, dk, dv, dbias_h, dbias_w)`` for tangents
    (``None`` for zero) of ``inputs = (grad_out, q, k, v, bias_h, bias_w)``; an absent bias's is
    empty. By reverse mode twice: the pullback of the gradients is linear in its cotangent ``u``,
    ``u -> J^T u``, so its own pullback maps ``t`` to ``J t``. (Forward mode cannot nest here.)"""
    grads, pullback, primals = reference_gradients_pullback(inputs, height, width, scale)
    _, pullback_of_pullback = torch.func.vjp(
        pullback, {i: torch.zeros_like(t) for i, t in grads.items()}
    )
    grad_out = inputs[0]
    (found,) = pullback_of_pullback((
        zeros_if_none(tangents[0], grad_out),
        {i: zeros_if_none(tangents[i + 1], t) for i, t in primals.items()},
    ))  # fmt: skip
    return tuple(found[i] if i in found else grad_out.new_empty(0) for i in range(5))


def fold_vmap_dim(tensor: Bias, dim: int | None, size: int, lead: torch.Size) -> Bias:
    """``tensor`` under ``vmap`` (batched at ``dim``, or unbatched) with the vmapped dim folded
    into its batch dim, ``(size * B, ...)``. ``lead = (B, Nh)``: a bias broadcast over batch or
    heads is expanded to them first, so that every tensor folds alike."""
    if tensor is None:
        return None
    if dim is None:
        tensor = tensor.unsqueeze(0).expand(size, *tensor.shape)
    else:
        tensor = tensor.movedim(dim, 0)
    tensor = tensor.expand(size, *lead, *tensor.shape[3:])
    return tensor.reshape(size * lead[0], *tensor.shape[2:])


def unfold_vmap_dim(tensor: Tensor, size: int) -> tuple[Tensor, int | None]:
    """An output of a folded call with the vmapped dim split out again, and its ``out_dims``
    entry; the empty gradient of an absent bias stays unbatched."""
    if tensor.dim() == 1:
        return tensor, None
    return tensor.unflatten(0, (size, tensor.shape[0] // size)), 0


def batch_folding_vmap(op: OpOverload, num_tensors: int, query_index: int) -> Callable[..., tuple]:
    """``vmap`` of an attention op as one call on a bigger batch, since the kernels are batched
    over ``B`` already (without a rule, PyTorch would call the op once per vmapped element). The
    op's first ``num_tensors`` arguments are the tensors, the query among them at
    ``query_index``."""

    def batched(info, in_dims, *args):  # type: ignore[no-untyped-def]
        tensors, rest = args[:num_tensors], args[num_tensors:]
        query, query_dim = tensors[query_index], in_dims[query_index]
        lead = query.shape[:2] if query_dim is None else query.movedim(query_dim, 0).shape[1:3]
        folded = [
            fold_vmap_dim(t, d, info.batch_size, lead)
            for t, d in zip(tensors, in_dims[:num_tensors], strict=True)
        ]
        outputs = [unfold_vmap_dim(t, info.batch_size) for t in op(*folded, *rest)]
        return tuple(t for t, _ in outputs), tuple(d for _, d in outputs)

    return batched


# The autograd kernels of the forward ops (kept alive here: a Library unregisters when freed).
# allow_override: the Triton ops are torch.library.triton_op ops, which come with an autograd
# kernel of their own that has no formula.
_LIBRARY = torch.library.Library("aanet_kernels", "IMPL")


def differentiated(args: tuple[object, ...]) -> bool:
    """Whether a call of a forward op with ``args`` is being differentiated: in reverse mode (grad
    mode and an input requiring grad) or in forward mode (a dual level open; an input may be
    dual)."""
    if torch._C._is_fwd_grad_enabled() and forward_ad_active():
        return True
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (dual tensors may be about)."""
    return torch.autograd.forward_ad._current_level >= 0


def attention_2d_autograd(fwd_op: OpOverload, bwd_op: OpOverload) -> Callable[..., Tensor]:
    """Autograd for a forward op ``(q, k, v, bias_h, bias_w, height, width, scale) -> (out, lse)``
    whose gradients come from ``bwd_op`` (the ``attention_2d_bwd`` signature); returns the
    differentiable forward, ``(q, k, v, bias_h, bias_w, height, width, scale) -> out``, that the
    public :func:`attention_2d` calls.

    The autograd is an ``autograd.Function`` registered as the op's own kernel, so callers of
    ``torch.ops``, compiled graphs and ``torch.func`` transforms all get it: reverse mode through
    ``bwd_op``; ``jvp``, ``jacfwd`` and forward-mode AD through
    :func:`reference.attention_2d_reference_jvp`; ``vmap`` by folding into the batch
    (:func:`batch_folding_vmap`). It is registered twice: at the ``Autograd`` key, and at the
    key where ``torch.func`` transforms enter the dispatcher, because an ``autograd.Function``
    applied from inside an ``Autograd`` kernel cannot reach the transforms (which is why the
    function ``torch.library.register_autograd`` generates is refused by them:
    pytorch/pytorch#168393, #179652). The fused gradients are an ``autograd.Function`` too,
    whose own derivatives (:func:`reference_second_order`, :func:`reference_second_order_jvp`)
    go through the reference path."""

    def fused_gradients(grad_out, q, k, v, bias_h, bias_w, out, lse, height, width, scale):  # type: ignore[no-untyped-def]
        """``(dq, dk, dv, dbias_h, dbias_w)`` from ``bwd_op``, a broadcast bias's gradient summed
        to its shape (the sum of the full-size one), an absent bias's empty."""
        dq, dk, dv, dbias_h, dbias_w = bwd_op(
            grad_out, q, k, v, bias_h, bias_w, out, lse, height, width, scale
        )
        dbias_h = dbias_h.sum_to_size(bias_h.shape) if bias_h is not None else dbias_h
        dbias_w = dbias_w.sum_to_size(bias_w.shape) if bias_w is not None else dbias_w
        return dq, dk, dv, dbias_h, dbias_w

    class Attention2dBackward(torch.autograd.Function):
        """:func:`fused_gradients` as a differentiable function."""

        generate_vmap_rule = True
        forward = staticmethod(fused_gradients)

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
            *tensors, _out, _lse, height, width, scale = inputs
            ctx.save_for_backward(*tensors)
            ctx.save_for_forward(*tensors)
            ctx.geometry = (height, width, scale)

        @staticmethod
        def backward(ctx, *grads):  # type: ignore[no-untyped-def]
            # out and lse are functions of q, k, v and the biases: the recomputation accounts
            # for them, so they get no gradient of their own.
            found = reference_second_order(grads, ctx.saved_tensors, *ctx.geometry)
            return (*found, None, None, None, None, None)

        @staticmethod
        def jvp(ctx, *tangents):  # type: ignore[no-untyped-def]
            return reference_second_order_jvp(ctx.saved_tensors, tangents[:6], *ctx.geometry)

    def save_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        q, k, v, bias_h, bias_w, height, width, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, bias_h, bias_w, out, lse)
        ctx.save_for_forward(q, k, v, bias_h, bias_w)
        ctx.geometry = (height, width, scale)
        ctx.mark_non_differentiable(lse)

    def fused_backward(ctx, grad_out, _grad_lse):  # type: ignore[no-untyped-def]
        q, k, v, bias_h, bias_w, out, lse = ctx.saved_tensors
        args = (grad_out, q, k, v, bias_h, bias_w, out, lse, *ctx.geometry)
        # In grad mode (create_graph=True, every torch.func transform) the gradients must be
        # differentiable; otherwise the autograd.Function is overhead.
        gradients = Attention2dBackward.apply if torch.is_grad_enabled() else fused_gradients
        dq, dk, dv, dbias_h, dbias_w = gradients(*args)
        dbias_h = dbias_h if bias_h is not None else None
        dbias_w = dbias_w if bias_w is not None else None
        return dq, dk, dv, dbias_h, dbias_w, None, None, None

    def reference_jvp(ctx, *tangents):  # type: ignore[no-untyped-def]
        height, width, scale = ctx.geometry
        dout = reference.attention_2d_reference_jvp(
            ctx.saved_tensors, tangents[:5], height=height, width=width, scale=scale
        )
        return dout, None

    class Attention2dFunction(torch.autograd.Function):
        vmap = staticmethod(batch_folding_vmap(fwd_op, num_tensors=5, query_index=0))
        setup_context = staticmethod(save_context)
        backward = staticmethod(fused_backward)
        jvp = staticmethod(reference_jvp)

        @staticmethod
        def forward(q, k, v, bias_h, bias_w, height, width, scale):  # type: ignore[no-untyped-def]
            # Grad and forward grad are off in here, so the op passes its autograd kernel by.
            return fwd_op(q, k, v, bias_h, bias_w, height, width, scale)

    def autograd_kernel(keyset, *args):  # type: ignore[no-untyped-def]
        if differentiated(args):
            return Attention2dFunction.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return fwd_op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def transform_kernel(*args):  # type: ignore[no-untyped-def]
        # Reached only while a torch.func transform is active; the Function hands the call to
        # the innermost transform, which peels one level and calls the op again beneath it.
        return Attention2dFunction.apply(*args)

    class Attention2dBackwardCall(torch.autograd.Function):
        """A direct call of ``bwd_op`` whose outputs are differentiated (until 2026-12-06
        PyTorch's autograd fallback gave zero second derivatives there, with only a warning)."""

        @staticmethod
        def forward(*args):  # type: ignore[no-untyped-def]
            return bwd_op(*args)  # grad is off in here: the kernel below redispatches

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
            pass

        @staticmethod
        def backward(ctx, *grads):  # type: ignore[no-untyped-def]
            raise RuntimeError(
                f"{bwd_op._schema.name}: the raw backward op is not differentiable; for second "
                "derivatives differentiate the forward's gradients instead (attention_2d, or "
                "attention_2d_fwd, with torch.autograd.grad(..., create_graph=True))"
            )

    def bwd_autograd_kernel(keyset, *args):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return Attention2dBackwardCall.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return bwd_op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    name = fwd_op._schema.name.split("::")[1]
    _LIBRARY.impl(name, autograd_kernel, "Autograd", with_keyset=True, allow_override=True)
    _LIBRARY.impl(name, transform_kernel, "FuncTorchDynamicLayerFrontMode", allow_override=True)
    bwd_name = bwd_op._schema.name.split("::")[1]
    _LIBRARY.impl(bwd_name, bwd_autograd_kernel, "Autograd", with_keyset=True, allow_override=True)
    torch.library.register_vmap(bwd_op, batch_folding_vmap(bwd_op, num_tensors=8, query_index=1))

    def differentiable_fwd(*args: object) -> Tensor:
        # Dual tensors inside a compiled region: the op's tangent is dropped without a word
        # there (as of torch 2.14); the reference path has a forward formula and compiles.
        # (Dynamo tracks the forward-AD level faithfully.)
        if torch.compiler.is_compiling() and forward_ad_active():
            q, k, v, bias_h, bias_w, height, width, scale = args
            return reference.attention_2d_reference(
                q, k, v, bias_h, bias_w, height=height, width=width, scale=scale
            )
        return fwd_op(*args)[0]

    return differentiable_fwd
