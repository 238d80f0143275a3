"""Flax modules (`lightning_jax.nn`, `lightning_jax.linen`) against hand-written jnp references.

Every module output is recomputed by hand from the module's own weights with
plain jnp and `lightning_jax.reference.naive_attention` (the O(n^2) formula),
never with the code under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import lightning_jax as lj
from lightning_jax import linen as lj_linen
from lightning_jax import reference
from lightning_jax.nn import SGLU, DecaySlopes, LightningAttention, SimpleRMSNorm
from op_test_base import assert_close, assert_rms_close

HIGHEST = jax.lax.Precision.HIGHEST
F32_TOL = 1e-5


def expected_slopes(heads: int, layer_idx: int, num_layers: int) -> jax.Array:
    """TransNormerLLM's per-layer slopes, written out: alibi * (1 - l/(L-1) + 1e-5)."""
    ratio = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return lj.alibi_slopes(heads) * np.float32(1 - ratio + 1e-5)


def rms_norm_ref(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def lightning_ref(x, w_qkvu, w_out, heads, head_dim, slopes, initial_state=None):
    """NormLinearAttention by hand: projections, SiLU, naive op, norm, gate, output projection.

    Returns (y [B, T, D], final_state [B, H, d, d]).
    """
    b, t, _ = x.shape
    qkvu = jnp.einsum("btd,df->btf", x, w_qkvu, precision=HIGHEST)
    hid = heads * head_dim
    q, k, v, u = (qkvu[..., i * hid : (i + 1) * hid] for i in range(4))

    def per_head(z):
        return jnp.transpose(z.reshape(b, t, heads, head_dim), (0, 2, 1, 3))

    silu = lambda z: z * jax.nn.sigmoid(z)  # noqa: E731
    o, state = reference.naive_attention(
        per_head(silu(q)),
        per_head(silu(k)),
        per_head(v),
        slopes,
        initial_state=initial_state,
        return_final_state=True,
    )
    o = jnp.transpose(o, (0, 2, 1, 3)).reshape(b, t, hid)
    y = jnp.einsum("btf,fd->btd", rms_norm_ref(o) * u, w_out, precision=HIGHEST)
    return y, state


def weights(m: LightningAttention):
    return m.qkvu_proj.kernel[...], m.out_proj.kernel[...]


def rand(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


# --- SimpleRMSNorm and SGLU ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_simple_rms_norm_formula(dtype):
    x = rand(0, (3, 5, 48), dtype) * 3.0
    y = SimpleRMSNorm(48)(x)
    assert y.dtype == dtype and y.shape == x.shape
    x64 = np.asarray(x, np.float64)
    want = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6)
    tol = F32_TOL if dtype == jnp.float32 else 1e-2
    assert_close(y, want, tol, "SimpleRMSNorm")
    with pytest.raises(ValueError, match="num_features=48"):
        SimpleRMSNorm(48)(rand(0, (2, 40)))


def test_sglu_matches_manual():
    m = SGLU(16, 40, rngs=nnx.Rngs(0))
    x = rand(1, (2, 7, 16))
    w1, w2, w3 = m.l1.kernel[...], m.l2.kernel[...], m.l3.kernel[...]
    want = ((x @ w1) * (x @ w2)) @ w3
    assert_close(m(x), want, F32_TOL, "SGLU")
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n_params == 3 * 16 * 40  # no biases


# --- LightningAttention forward --------------------------------------------------------------

MODULE_CASES = [
    # in_features, heads, head_dim, layer_idx, num_layers, seq, block_size
    (24, 3, None, 0, 1, 37, None),
    (32, 4, 12, 2, 3, 70, 16),
    (20, 5, 4, 1, 4, 1, None),
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: "D{}H{}d{}l{}of{}n{}b{}".format(*c))
def test_module_matches_reference(case):
    features, heads, head_dim, layer, layers, seq, block = case
    m = LightningAttention(
        features,
        heads,
        head_dim=head_dim,
        layer_idx=layer,
        num_layers=layers,
        impl="xla",
        block_size=block,
        rngs=nnx.Rngs(3),
    )
    d = head_dim or features // heads
    assert m.qkvu_proj.kernel.shape == (features, 4 * heads * d)
    assert m.out_proj.kernel.shape == (heads * d, features)
    x = rand(4, (2, seq, features))
    y = m(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    want, _ = lightning_ref(x, *weights(m), heads, d, expected_slopes(heads, layer, layers))
    assert_close(y, want, F32_TOL, "module vs reference")


def test_slopes_are_constant_state_not_params():
    m = LightningAttention(32, 4, layer_idx=1, num_layers=3, impl="xla", rngs=nnx.Rngs(0))
    assert isinstance(m.slopes, DecaySlopes) and not isinstance(m.slopes, nnx.Param)
    np.testing.assert_allclose(np.asarray(m.slopes[...]), expected_slopes(4, 1, 3), rtol=1e-6)
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    assert set(params) == {"qkvu_proj", "out_proj"}
    assert set(params["qkvu_proj"]) == {"kernel"} and set(params["out_proj"]) == {"kernel"}
    grads = nnx.grad(lambda m, x: jnp.sum(m(x) ** 2))(m, rand(1, (1, 9, 32)))
    assert set(nnx.to_pure_dict(grads)) == {"qkvu_proj", "out_proj"}


def test_jit_and_grad_match_reference():
    features, heads, seq = 24, 3, 45
    m = LightningAttention(features, heads, layer_idx=0, num_layers=2, impl="xla", rngs=nnx.Rngs(5))
    x = rand(6, (2, seq, features))
    target = rand(7, (2, seq, features))
    slopes = expected_slopes(heads, 0, 2)

    @nnx.jit
    def loss_and_grad(m, x):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x) * target))(m)

    loss, grads = loss_and_grad(m, x)

    def ref_loss(w_qkvu, w_out):
        return jnp.sum(lightning_ref(x, w_qkvu, w_out, heads, 8, slopes)[0] * target)

    ref_val, (g_qkvu, g_out) = jax.value_and_grad(ref_loss, argnums=(0, 1))(*weights(m))
    assert_close(loss, ref_val, F32_TOL, "loss")
    assert_close(grads["qkvu_proj"]["kernel"][...], g_qkvu, 1e-4, "d qkvu kernel")
    assert_close(grads["out_proj"]["kernel"][...], g_out, 1e-4, "d out kernel")
    assert float(jnp.max(jnp.abs(g_qkvu))) > 0


def test_bf16_compute_with_f32_params():
    m = LightningAttention(32, 4, impl="xla", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert m.qkvu_proj.kernel.dtype == jnp.float32
    x = rand(2, (2, 50, 32))
    y = m(x)
    assert y.dtype == jnp.bfloat16
    # The reference sees bf16-rounded inputs and weights, in float32.
    up = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    w_qkvu, w_out = weights(m)
    want, _ = lightning_ref(up(x), up(w_qkvu), up(w_out), 4, 8, expected_slopes(4, 0, 1))
    assert_rms_close(y, want, 1e-2, "bf16 module")


# --- decoding ------------------------------------------------------------------------------


def test_decode_chunks_equal_full_forward():
    features, heads = 24, 3
    m = LightningAttention(features, heads, layer_idx=0, num_layers=2, impl="xla", rngs=nnx.Rngs(1))
    x = rand(8, (2, 21, features))
    full = m(x)
    m.init_cache(2)
    assert m.state.shape == (2, heads, 8, 8) and m.state.dtype == jnp.float32
    assert isinstance(m.state, nnx.Cache)
    outs, start = [], 0
    for size in (5, 1, 1, 13, 1):
        outs.append(m(x[:, start : start + size], decode=True))
        start += size
    assert_close(jnp.concatenate(outs, axis=1), full, F32_TOL, "decoded vs full")
    _, state_ref = lightning_ref(x, *weights(m), heads, 8, expected_slopes(heads, 0, 2))
    assert_close(m.state[...], state_ref, F32_TOL, "cached state vs reference final state")
    # init_cache resets: decoding again from scratch gives the first chunk again.
    m.init_cache(2)
    assert_close(m(x[:, :5], decode=True), full[:, :5], F32_TOL, "after reset")


def test_decode_errors():
    m = LightningAttention(16, 2, impl="xla", rngs=nnx.Rngs(0))
    x = rand(0, (3, 4, 16))
    with pytest.raises(ValueError, match="init_cache"):
        m(x, decode=True)
    m.init_cache(2)
    with pytest.raises(ValueError, match=r"batch size 2.*batch size 3"):
        m(x, decode=True)


def test_bad_construction_and_inputs():
    with pytest.raises(ValueError, match=r"in_features \(30\).*num_heads \(4\)"):
        LightningAttention(30, 4, rngs=nnx.Rngs(0))
    m = LightningAttention(30, 4, head_dim=6, impl="xla", rngs=nnx.Rngs(0))  # explicit d: fine
    assert m(rand(0, (1, 3, 30))).shape == (1, 3, 30)
    with pytest.raises(ValueError, match="head_dim"):
        LightningAttention(32, 4, head_dim=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, seq, 30\]"):
        m(rand(0, (1, 3, 32)))
    with pytest.raises(ValueError, match=r"\[batch, seq, 30\]"):
        m(rand(0, (3, 30)))
    with pytest.raises(TypeError, match="floating"):
        m(jnp.ones((1, 3, 30), jnp.int32))
    with pytest.raises(ValueError, match="layer_idx"):
        LightningAttention(32, 4, layer_idx=3, num_layers=3, rngs=nnx.Rngs(0))


def test_split_merge_round_trip():
    m = LightningAttention(24, 3, layer_idx=1, num_layers=3, impl="xla", rngs=nnx.Rngs(2))
    x = rand(3, (2, 19, 24))
    graphdef, state = nnx.split(m)
    y_eager = m(x)
    y_merged = nnx.merge(graphdef, state)(x)
    y_jit = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_array_equal(np.asarray(y_merged), np.asarray(y_eager))
    assert_close(y_jit, y_eager, F32_TOL, "jit(merge(split))")
    assert "slopes" in nnx.to_pure_dict(state)  # the slopes travel with the state


# --- Linen wrapper -------------------------------------------------------------------------


def test_linen_matches_nnx_with_copied_weights():
    features, heads, seq = 24, 3, 33
    m = LightningAttention(features, heads, layer_idx=1, num_layers=2, impl="xla", rngs=nnx.Rngs(4))
    x = rand(5, (2, seq, features))
    lin = lj_linen.LightningAttention(num_heads=heads, layer_idx=1, num_layers=2, impl="xla")
    init_params = lin.init(jax.random.PRNGKey(0), x)["params"]
    nnx_params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    # Same tree of parameters: names and shapes.
    assert jax.tree.map(jnp.shape, dict(init_params)) == jax.tree.map(jnp.shape, nnx_params)
    y = lin.apply({"params": nnx_params}, x)
    assert_close(y, m(x), F32_TOL, "linen vs nnx")
    want, _ = lightning_ref(x, *weights(m), heads, 8, expected_slopes(heads, 1, 2))
    assert_close(y, want, F32_TOL, "linen vs reference")

    # Decoding through the "cache" collection: prefix, then single tokens.
    variables = lin.init(jax.random.PRNGKey(0), x[:, :10], decode=True)
    cache = variables["cache"]
    assert float(jnp.max(jnp.abs(cache["state"]))) == 0.0  # init leaves the state at zero
    outs = []
    for start, stop in ((0, 10), (10, 11), (11, seq)):
        out, mutated = lin.apply(
            {"params": nnx_params, "cache": cache}, x[:, start:stop], decode=True, mutable=["cache"]
        )
        cache = mutated["cache"]
        outs.append(out)
    assert_close(jnp.concatenate(outs, axis=1), want, F32_TOL, "linen decode vs reference")


def test_linen_takes_the_nnx_arguments_and_segment_ids():
    features, heads = 16, 2
    m = LightningAttention(features, heads, layer_idx=1, num_layers=3, impl="xla", rngs=nnx.Rngs(6))
    params = {"params": nnx.to_pure_dict(nnx.state(m, nnx.Param))}
    x = rand(7, (2, 20, features))
    ids = jnp.array([[0] * 7 + [1] * 13, [0] * 20], jnp.int32)
    # The NNX layer's positional order: (in_features, num_heads).
    lin = lj_linen.LightningAttention(features, heads, layer_idx=1, num_layers=3, impl="xla")
    assert_close(lin.apply(params, x, segment_ids=ids), m(x, segment_ids=ids), F32_TOL, "segments")
    with pytest.raises(ValueError, match=r"shape \[batch, seq, 16\]"):
        lin.apply(params, x[..., :8])
    with pytest.raises(TypeError, match="num_heads"):
        lj_linen.LightningAttention(features).init(jax.random.PRNGKey(0), x)
    # Sequence parallel over a mesh, as the NNX layer's mesh/seq_axis/batch_axis.
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "seq"))
    sp = lj_linen.LightningAttention(
        features, heads, layer_idx=1, num_layers=3, impl="xla", mesh=mesh, seq_axis="seq",
        batch_axis="data",
    )  # fmt: skip
    assert_close(sp.apply(params, x), m(x), F32_TOL, "linen sequence-parallel vs nnx")
    with pytest.raises(ValueError, match="seq_axis"):
        lj_linen.LightningAttention(features, heads, batch_axis="data").init(
            jax.random.PRNGKey(0), x
        )


def test_linen_bad_features():
    lin = lj_linen.LightningAttention(num_heads=4)
    with pytest.raises(ValueError, match=r"in_features \(30\).*num_heads \(4\)"):
        lin.init(jax.random.PRNGKey(0), rand(0, (1, 3, 30)))
