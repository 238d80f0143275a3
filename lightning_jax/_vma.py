"""Manual-axis typing inside `jax.shard_map(check_vma=True)`, shared by the op and the kernels.

Under `check_vma=True` every value inside shard_map is typed with the mesh axes it
varies over (jax >= 0.10 calls the type `manual_axis_type`, earlier jax `vma`).
Primitives that build arrays from shapes alone (a `pallas_call`'s `out_shape`, a
zero state) must be told that type; values mixed in one computation must agree on
it, the replicated ones being cast to varying (`lax.pcast`, whose transpose sums
the gradient over the axes, as autodiff of a replicated input requires).
Outside shard_map, or under `check_vma=False`, nothing is typed and these
helpers do nothing.
"""

from __future__ import annotations

import jax
from jax import lax


def axis_names(axis_name) -> tuple:
    """A mesh axis name or a tuple of them, as a tuple."""
    return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def varying_axes(x) -> frozenset | None:
    """Mesh axes over which x varies inside shard_map; None where jax does not say."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    vma = getattr(aval, "vma", None)
    return None if vma is None else frozenset(vma)


def to_varying(x: jax.Array, axis_name) -> jax.Array:
    """x marked as varying over axis_name (a no-op where it already is or nothing is typed)."""
    varying = varying_axes(x)
    if varying is None:
        return x
    missing = tuple(a for a in axis_names(axis_name) if a not in varying)
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)  # pragma: no cover - older jax


def union_of_varying(*arrays) -> tuple:
    """The mesh axes any of `arrays` varies over, in a deterministic order (maybe empty)."""
    axes: set = set()
    for x in arrays:
        axes |= varying_axes(x) or frozenset()
    return tuple(sorted(axes, key=str))


def match_varying(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Every array cast to vary over the union of the axes any of them varies over."""
    axes = union_of_varying(*arrays)
    if not axes:
        return arrays
    return tuple(to_varying(x, axes) for x in arrays)


def typed_shape(shape_dtype: jax.ShapeDtypeStruct, axes: tuple) -> jax.ShapeDtypeStruct:
    """shape_dtype typed as varying over `axes` (what `pallas_call` needs under check_vma)."""
    mat_type = getattr(jax.sharding, "ManualAxisType", None)
    if mat_type is None:  # pragma: no cover - jax before manual_axis_type: `vma=`
        return jax.ShapeDtypeStruct(shape_dtype.shape, shape_dtype.dtype, vma=frozenset(axes))
    return jax.ShapeDtypeStruct(
        shape_dtype.shape, shape_dtype.dtype, manual_axis_type=mat_type(varying=frozenset(axes))
    )
