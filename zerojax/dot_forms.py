"""Dot operand forms XLA:CPU runs fast, for any module.

XLA:CPU hands a dot to its XNNPACK/YNNPACK fusion only when the left operand is laid out
[batch..., free..., contracting...]; a dot whose left operand contracts a leading dim runs
in Eigen instead (~50 vs ~70 GFLOP/s here). Autodiff writes each weight gradient as
`transpose(dot(g, x))` contracting the token dims; XLA's algebraic simplifier turns that
into such a dot, and folds back any transpose a model writes. So the step's jaxpr is
rewritten (`rewrite`):

  - `transpose(dot(a, b))` that only swaps the free dims becomes `dot(b, a)`;
  - a dot whose left operand is not in GEMM form gets it there behind an
    `optimization_barrier`, which the simplifier does not see through: the operand is
    transposed, or, where the right operand and the result are the smaller copies, the
    operands swap sides (`_gemm_form`). XLA's own choice transposes the left operand and
    fuses its producer's element-wise work into that transposing loop, which is slow.

A third rewrite (`bf16_in_f32`): a bf16 x bf16 dot with a bf16 result becomes the same dot
with an fp32 result, rounded to bf16 after it. XLA:CPU runs the bf16-result form about
1.5-2x slower ([2048,256] x [256,1024]: 9.5-12.2 vs 5.6-6.4 ms); the reference layers
write their projections this way themselves, a user's `nnx.Linear` does not.

The same function: values differ only by the dot's summation order (fp32 rounding). Every
CPU step applies it to its gradient function (StepSpec.gemm_form_dots). Inside a bucketed
step's shard_map all 24 weight gradients of the benchmark's user GPT were Eigen dots; in
XLA's own SPMD steps none were, but the down-projections' transposed activations cost
14 ms per layer. Alternating steps, AMD EPYC: user GPT 1 device 483 -> 402 ms, 1 x 2
443 -> 429, 2 processes 504 -> 442; reference GPT 536 -> 472, 501 -> 474, 465 -> 456
(benchmarks/NOTES.md). GPU and TPU compilers take transposed operands natively.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core

# Below this many multiply-adds a dot is cheap in any form, and the copy would not pay.
MIN_FLOPS = 1 << 20

_BARRIER = jax.make_jaxpr(jax.lax.optimization_barrier)(0.0).eqns[0].primitive


def _moved(var: core.Var, perm: tuple[int, ...], eqn: core.JaxprEqn) -> tuple[core.Var, list[core.JaxprEqn]]:
    """`var` transposed by `perm` behind an `optimization_barrier`, and the equations doing it."""
    aval = var.aval.update(shape=tuple(var.aval.shape[d] for d in perm))
    moved, held = core.Var(aval), core.Var(aval)
    return held, [core.new_jaxpr_eqn([var], [moved], jax.lax.transpose_p, {"permutation": perm},
                                     core.no_effects, eqn.source_info, eqn.ctx),
                  _barrier(moved, held, eqn)]


def _barrier(source: core.Var, held: core.Var, eqn: core.JaxprEqn) -> core.JaxprEqn:
    return core.new_jaxpr_eqn([source], [held], _BARRIER, {}, core.no_effects, eqn.source_info, eqn.ctx)


def _gemm_form(eqn: core.JaxprEqn) -> list[core.JaxprEqn]:
    """The dot `eqn` with its left operand in GEMM form: as it is, or by the cheaper of two copies.

    Either the left operand is transposed into [batch, free, contracting], or (when it is
    laid out [batch, contracting, free], a GEMM's right operand, and the right operand and
    the result together are smaller) the operands swap sides: the right operand is
    transposed into GEMM form and the swapped dot's result transposed back. The weight
    gradient of a down-projection (dW = h^T g, h the wide hidden activation) takes the
    second: XLA fuses the activation's element-wise recomputation into a transpose of h,
    a loop that walks its input across rows and took 14 ms per layer of the benchmark's
    user GPT, against under 1 ms for the narrow g and dW (benchmarks/NOTES.md).
    """
    lhs, rhs = eqn.invars
    if not isinstance(lhs, core.Var):
        return [eqn]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ndim = lhs.aval.ndim
    free = tuple(d for d in range(ndim) if d not in lc and d not in lb)
    perm = tuple(lb) + free + tuple(lc)
    out = eqn.outvars[0].aval
    if perm == tuple(range(ndim)) or math.prod(out.shape) * math.prod(lhs.aval.shape[d] for d in lc) < MIN_FLOPS:
        return [eqn]
    nb = len(lb)
    if isinstance(rhs, core.Var) and tuple(lb) + tuple(lc) + free == tuple(range(ndim)):
        rhs_free = tuple(d for d in range(rhs.aval.ndim) if d not in rc and d not in rb)
        rhs_perm = tuple(rb) + rhs_free + tuple(rc)
        rhs_copy = 0 if rhs_perm == tuple(range(rhs.aval.ndim)) else math.prod(rhs.aval.shape)
        if rhs_copy + math.prod(out.shape) < math.prod(lhs.aval.shape):
            return _swapped_sides(eqn, rhs_perm, len(rhs_free), len(free))
    held, copy = _moved(lhs, perm, eqn)
    dims = ((tuple(range(nb + len(free), ndim)), tuple(rc)), (tuple(range(nb)), tuple(rb)))
    return copy + [eqn.replace(invars=[held, rhs], params={**eqn.params, "dimension_numbers": dims})]


def _swapped_sides(eqn: core.JaxprEqn, rhs_perm: tuple[int, ...], rhs_free: int, lhs_free: int) -> list[core.JaxprEqn]:
    """dot(a, b) as transpose(dot(b', a)), b' = b in GEMM form; both transposes behind
    barriers (else the simplifier folds the result's transpose back into the dot)."""
    lhs, rhs = eqn.invars
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    nb = len(lb)
    eqns = []
    if rhs_perm != tuple(range(rhs.aval.ndim)):
        rhs, eqns = _moved(rhs, rhs_perm, eqn)
    out = eqn.outvars[0].aval
    swapped = out.update(shape=out.shape[:nb] + out.shape[nb + lhs_free:] + out.shape[nb:nb + lhs_free])
    product, held = core.Var(swapped), core.Var(swapped)
    dims = ((tuple(range(nb + rhs_free, rhs.aval.ndim)), tuple(lc)), (tuple(range(nb)), tuple(lb)))
    back = tuple(range(nb)) + tuple(range(nb + rhs_free, nb + rhs_free + lhs_free)) + tuple(range(nb, nb + rhs_free))
    return eqns + [
        eqn.replace(invars=[rhs, lhs], outvars=[product], params={**eqn.params, "dimension_numbers": dims}),
        _barrier(product, held, eqn),
        core.new_jaxpr_eqn([held], eqn.outvars, jax.lax.transpose_p, {"permutation": back},
                           core.no_effects, eqn.source_info, eqn.ctx)]


# The primitives whose nested jaxprs XLA compiles as part of the step. Others (a Pallas
# kernel's body, a custom rule's jaxpr) are left as they are.
_DESCEND = frozenset({"jit", "pjit", "closed_call", "core_call", "scan", "while", "cond",
                      "remat2", "checkpoint", "shard_map"})


def _rewrite_param(value: Any, **forms: bool) -> Any:
    if isinstance(value, core.ClosedJaxpr):
        return value.replace(jaxpr=rewrite(value.jaxpr, **forms))
    if isinstance(value, core.Jaxpr):
        return rewrite(value, **forms)
    if isinstance(value, tuple) and value and all(isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in value):
        return tuple(_rewrite_param(v, **forms) for v in value)
    return value


def _accumulated_in_f32(eqn: core.JaxprEqn) -> list[core.JaxprEqn]:
    """A bf16 x bf16 -> bf16 dot as (bf16 x bf16 -> fp32 dot, round to bf16); others as they are."""
    out = eqn.outvars[0].aval
    if not (out.dtype == jnp.bfloat16 and all(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.invars)):
        return [eqn]
    wide = core.Var(out.update(dtype=jnp.dtype(jnp.float32)))
    dot = eqn.replace(outvars=[wide], params={**eqn.params, "preferred_element_type": jnp.dtype(jnp.float32)})
    cast = core.new_jaxpr_eqn([wide], eqn.outvars, jax.lax.convert_element_type_p,
                              {"new_dtype": jnp.dtype(jnp.bfloat16), "weak_type": False, "sharding": None},
                              core.no_effects, eqn.source_info, eqn.ctx)
    return [dot, cast]


def _swapped(dot: core.JaxprEqn, transpose: core.JaxprEqn) -> core.JaxprEqn | None:
    """`transpose(dot_general(a, b))` as one `dot_general(b, a)` when the transpose only
    swaps the free dims of a and b (autodiff writes every weight gradient so); else None."""
    (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
    nb = len(lb)
    na = dot.invars[0].aval.ndim - nb - len(lc)
    nr = dot.invars[1].aval.ndim - nb - len(rc)
    swap = tuple(range(nb)) + tuple(range(nb + na, nb + na + nr)) + tuple(range(nb, nb + na))
    if tuple(transpose.params["permutation"]) != swap:
        return None
    return dot.replace(invars=[dot.invars[1], dot.invars[0]], outvars=transpose.outvars,
                       params={**dot.params, "dimension_numbers": ((rc, lc), (rb, lb))})


def _merge_transposes(eqns: list[core.JaxprEqn], outvars: list) -> tuple[list[core.JaxprEqn], bool]:
    """Each dot whose only use is a free-dim-swapping transpose, made one swapped dot.
    Returns the new equations and whether any changed."""
    uses: dict[core.Var, int] = {}
    for atom in [a for e in eqns for a in e.invars] + list(outvars):
        if isinstance(atom, core.Var):
            uses[atom] = uses.get(atom, 0) + 1
    dots = {e.outvars[0]: e for e in eqns if e.primitive is jax.lax.dot_general_p}
    merged: dict[int, core.JaxprEqn] = {}     # id(dot eqn) -> the swapped dot
    dropped: set[int] = set()                 # id(transpose eqn) folded into its dot
    for e in eqns:
        source = e.invars[0] if e.primitive is jax.lax.transpose_p else None
        if isinstance(source, core.Var) and source in dots and uses[source] == 1:
            swapped = _swapped(dots[source], e)
            if swapped is not None:
                merged[id(dots[source])] = swapped
                dropped.add(id(e))
    return [merged.get(id(e), e) for e in eqns if id(e) not in dropped], bool(merged)


def rewrite(jaxpr: core.Jaxpr, *, gemm_form: bool = True, bf16_in_f32: bool = False) -> core.Jaxpr:
    """`jaxpr` with every large dot in GEMM form (`gemm_form`) and every bf16-result dot
    accumulated in fp32 (`bf16_in_f32`), nested jaxprs (scan, remat, shard_map, cond, jit)
    included; their signatures are unchanged."""
    forms = {"gemm_form": gemm_form, "bf16_in_f32": bf16_in_f32}
    eqns, changed = list(jaxpr.eqns), gemm_form
    while changed:       # dot -> transpose -> transpose (a tied embedding's gradient) merges twice
        eqns, changed = _merge_transposes(eqns, jaxpr.outvars)
    out = []
    for eqn in eqns:
        if eqn.primitive is jax.lax.dot_general_p:
            dots = _accumulated_in_f32(eqn) if bf16_in_f32 else [eqn]
            out.extend(_gemm_form(dots[0]) + dots[1:] if gemm_form else dots)
        elif eqn.primitive.name in _DESCEND:
            out.append(eqn.replace(params={k: _rewrite_param(v, **forms) for k, v in eqn.params.items()}))
        else:
            out.append(eqn)
    return jaxpr.replace(eqns=out)


def in_gemm_form(fn: Callable, *, gemm_form: bool = True, bf16_in_f32: bool = False) -> Callable:
    """`fn` traced, its dots rewritten (`rewrite`), and evaluated in the caller's trace."""
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        jaxpr = rewrite(closed.jaxpr, gemm_form=gemm_form, bf16_in_f32=bf16_in_f32)
        out = core.jaxpr_as_fun(closed.replace(jaxpr=jaxpr))(*jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped
