"""The `precision` argument: validated, and it reaches every implementation's matmuls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lightning_jax as lj
from jaxpr_tools import dot_precisions, pallas_calls


def test_unknown_precision_is_refused():
    x = jnp.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match=r"precision must be one of \('default', 'highest'\)"):
        lj.lightning_attention(x, x, x, precision="high")


@pytest.mark.parametrize("impl", ["xla", "triton", "mosaic_tpu"])
def test_precision_reaches_the_matmuls(impl):
    """ "highest" makes every input matmul exact; "default" leaves them to the backend."""
    x = jax.ShapeDtypeStruct((1, 2, 100, 16), jnp.float32)
    highest = jax.lax.Precision.HIGHEST

    def precisions(precision):
        def loss(q, k, v):
            o = lj.lightning_attention(q, k, v, impl=impl, interpret=False, precision=precision)
            return jnp.sum(o)

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x).jaxpr
        if impl != "xla":
            return [p for eqn in pallas_calls(jaxpr) for p in dot_precisions(eqn.params["jaxpr"])]
        return dot_precisions(jaxpr)

    exact = precisions("highest")
    assert exact and all(p in (highest, (highest, highest)) for p in exact), exact
    default = precisions("default")
    exact_in_default = [p for p in default if p in (highest, (highest, highest))]
    # The XLA path keeps its float32 state combination exact: at seq 100 (one
    # partial chunk) the prefix matmul of the forward and the three of the
    # backward (suffix, carry, prefix recomputed); the kernels have none.
    assert len(exact_in_default) == (4 if impl == "xla" else 0), default
    assert len(default) == len(exact)


def test_default_and_highest_agree_on_cpu():
    """On CPU both precisions are exact float32: the outputs agree to rounding."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 2, 300, 32)) for kk in keys)
    slopes = lj.alibi_slopes(2)
    a = lj.lightning_attention(q, k, v, slopes, precision="default")
    b = lj.lightning_attention(q, k, v, slopes, precision="highest")
    ref = lj.reference.naive_attention(q, k, v, slopes)
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(a, ref, atol=2e-5 * scale)
    np.testing.assert_allclose(b, ref, atol=2e-5 * scale)
