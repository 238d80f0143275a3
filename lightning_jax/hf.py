"""Hugging Face checkpoints of MiniMax-01 models: `from_pretrained` and `save_pretrained`.

A checkpoint is a local directory with `config.json` and either
`model.safetensors` or shards listed in `model.safetensors.index.json`, in the
layout `transformers.MiniMaxForCausalLM` writes and reads. Tensors are read
with the `safetensors` package's NumPy API (bfloat16 included; install the
`hf` extra), one tensor slice at a time: the host never holds more than the
largest tensor (without a mesh) or the largest per-device slice (with one).

Sharding rule (`from_pretrained(..., mesh=mesh, axis=name)`): along the mesh
axis `name` (size n), each tensor is placed directly onto its shards:

- experts: `w1`, `w3` `[E, D, I]` and `w2` `[E, I, D]` split over E when n
  divides E, else over I when n divides I;
- heads: the columns of `qkv_proj`, `output_gate`, `q_proj` and the lightning
  output norm, the rows of `out_proj` and `o_proj`, in whole heads when n
  divides the head count (`k_proj`, `v_proj`: the key/value head count);
- vocabulary: the rows of the embedding and the columns of `lm_head` when n
  divides V;
- everything else (layer norms, the router, slopes) and every tensor whose
  split does not divide evenly is replicated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lightning_jax.minimax import MiniMaxConfig, MiniMaxForCausalLM
from lightning_jax.slopes import minimax_slopes

ARCHITECTURE = "MiniMaxForCausalLM"
# Derived buffers transformers stores with each lightning layer; recomputed, never needed.
_DERIVED_BUFFERS = ("query_decay", "key_decay", "diagonal_decay")
_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "layer_types",
    "num_local_experts",
    "num_experts_per_tok",
    "rms_norm_eps",
    "linear_attn_alpha_factor",
    "linear_attn_beta_factor",
    "full_attn_alpha_factor",
    "full_attn_beta_factor",
    "mlp_alpha_factor",
    "mlp_beta_factor",
    "tie_word_embeddings",
    "block_size",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> MiniMaxConfig:
    """A `MiniMaxConfig` from the fields of a Hugging Face `config.json`.

    Args:
      hf: the parsed `config.json`.
      **overrides: `MiniMaxConfig` fields to set (e.g. `impl`, `max_cache_len`).

    Raises:
      ValueError: another architecture, or a feature this model does not have
        (sliding-window attention, a RoPE type other than "default", an
        activation other than SiLU), each naming the field.
    """
    archs = hf.get("architectures") or []
    if archs and ARCHITECTURE not in archs:
        raise ValueError(
            f"config.json: architectures {archs} is not supported; only {ARCHITECTURE!r} is"
        )
    if hf.get("model_type") != "minimax":
        raise ValueError(
            f"config.json: model_type {hf.get('model_type')!r} is not supported; only 'minimax' is"
        )
    if hf.get("sliding_window") is not None:
        raise ValueError("config.json: sliding_window is not supported (must be null)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope_type {rope['rope_type']!r} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6))
    fields = {name: hf[name] for name in _CONFIG_FIELDS if name in hf}
    fields.update(rope_theta=float(theta), **overrides)
    return MiniMaxConfig(**fields)


def config_to_hf(config: MiniMaxConfig, dtype: Any) -> dict[str, Any]:
    """The `config.json` fields transformers' `MiniMaxConfig` reads for `config`."""
    out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": "minimax"}
    for name in _CONFIG_FIELDS:
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    out["head_dim"] = config.attn_head_dim
    out["hidden_act"] = "silu"
    out["sliding_window"] = None
    out["rope_parameters"] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    out["dtype"] = str(jnp.dtype(dtype))
    return out


# --- the tensor map ----------------------------------------------------------------------------

# kind: "copy" (same layout), "linear" (torch [out, in] -> kernel [in, out]),
# "experts" (one [a, b] tensor per expert -> [E, b, a]), "slopes" ([H, 1, 1] -> [H]).
_Spec = tuple[tuple, str, Any, tuple[int, ...]]  # (model path, kind, hf name(s), shape)


def _tensor_specs(config: MiniMaxConfig) -> list[_Spec]:
    """Every model parameter: its path, conversion kind, checkpoint name(s) and model shape."""
    c = config
    d, hd, v = c.hidden_size, c.num_attention_heads * c.attn_head_dim, c.vocab_size
    kvd = c.num_key_value_heads * c.attn_head_dim
    e, i = c.num_local_experts, c.intermediate_size
    specs: list[_Spec] = [
        (("embed_tokens", "embedding"), "copy", "model.embed_tokens.weight", (v, d))
    ]
    for layer, kind in enumerate(c.layer_types):
        pre = f"model.layers.{layer}."
        path = ("layers", layer)
        specs += [
            (path + ("input_layernorm", "weight"), "copy", pre + "input_layernorm.weight", (d,)),
            (
                path + ("post_attention_layernorm", "weight"),
                "copy",
                pre + "post_attention_layernorm.weight",
                (d,),
            ),
        ]
        attn = path + ("self_attn",)
        if kind == "linear_attention":
            projections = [
                ("qkv_proj", (d, 3 * hd)),
                ("output_gate", (d, hd)),
                ("out_proj", (hd, d)),
            ]
            specs.append((attn + ("norm", "weight"), "copy", pre + "self_attn.norm.weight", (hd,)))
            specs.append(
                (
                    attn + ("slopes",),
                    "slopes",
                    pre + "self_attn.slope_rate",
                    (c.num_attention_heads,),
                )
            )
        else:
            projections = [
                ("q_proj", (d, hd)),
                ("k_proj", (d, kvd)),
                ("v_proj", (d, kvd)),
                ("o_proj", (hd, d)),
            ]
        for name, shape in projections:
            specs.append(
                (attn + (name, "kernel"), "linear", pre + f"self_attn.{name}.weight", shape)
            )
        moe = path + ("block_sparse_moe",)
        specs.append(
            (moe + ("gate", "kernel"), "linear", pre + "block_sparse_moe.gate.weight", (d, e))
        )
        for w, shape in (("w1", (e, d, i)), ("w3", (e, d, i)), ("w2", (e, i, d))):
            names = [pre + f"block_sparse_moe.experts.{x}.{w}.weight" for x in range(e)]
            specs.append((moe + (w,), "experts", names, shape))
    specs.append((("norm", "weight"), "copy", "model.norm.weight", (d,)))
    if not c.tie_word_embeddings:
        specs.append((("lm_head", "kernel"), "linear", "lm_head.weight", (d, v)))
    return specs


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of one tensor (one expert's for "experts")."""
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "experts":
        return (shape[2], shape[1])
    if kind == "slopes":
        return (shape[0], 1, 1)
    return shape


def _partition(path: tuple, shape: tuple[int, ...], config: MiniMaxConfig, n: int, axis: str):
    """The PartitionSpec of one parameter under the module's sharding rule."""
    name = path[-2] if path[-1] in ("kernel", "weight", "embedding") else path[-1]
    heads = config.num_attention_heads % n == 0
    spec: list[Any] = [None] * len(shape)
    if name in ("w1", "w3", "w2"):
        if shape[0] % n == 0:
            spec[0] = axis
        elif config.intermediate_size % n == 0:
            spec[2 if name != "w2" else 1] = axis
    elif name == "embed_tokens" and shape[0] % n == 0:
        spec[0] = axis
    elif name == "lm_head" and shape[1] % n == 0:
        spec[1] = axis
    elif name in ("qkv_proj", "output_gate", "q_proj") and heads:
        spec[1] = axis
    elif name in ("k_proj", "v_proj") and config.num_key_value_heads % n == 0:
        spec[1] = axis
    elif name in ("out_proj", "o_proj") and heads:
        spec[0] = axis
    elif name == "norm" and path[-3:-2] == ("self_attn",) and heads:
        spec[0] = axis
    return PartitionSpec(*spec)


# --- reading -----------------------------------------------------------------------------------


def _checkpoint_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file of a checkpoint directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json in this directory"
    )


def _slices(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, dim in zip(index, shape):
        start, stop, _ = s.indices(dim)
        out.append(slice(start, stop))
    return tuple(out) + tuple(slice(0, dim) for dim in shape[len(index) :])


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    mesh: Mesh | None = None,
    axis: str | None = None,
    **config_overrides: Any,
) -> MiniMaxForCausalLM:
    """Loads a MiniMax-01 model from a local Hugging Face checkpoint directory.

    Each tensor is read and converted on its own (streaming), cast to `dtype`,
    and placed on the default device, or with `mesh` straight onto its shards
    under the module's sharding rule (only the slices each device holds are
    read). The checkpoint's `slope_rate` buffers, when present, must agree with
    `minimax_slopes` (relative error <= 1e-5) and are used as the slopes.

    Args:
      path: directory with `config.json` and `model.safetensors` (or shards with
        `model.safetensors.index.json`).
      dtype: parameter and compute dtype (None: the checkpoint's embedding
        dtype); slopes and decoding states stay float32.
      mesh: optional `jax.sharding.Mesh` to shard the parameters over.
      axis: the mesh axis of the sharding rule (None: the mesh's only axis).
      **config_overrides: `MiniMaxConfig` fields to set, e.g. `impl="xla"`,
        `max_cache_len=4096`; `seq_axis` (and `batch_axis`) run the lightning
        layers sequence-parallel over axes of `mesh`.

    Returns:
      a `MiniMaxForCausalLM` holding the checkpoint's weights.

    Raises:
      FileNotFoundError: no config.json or safetensors file.
      ValueError: another architecture or an unsupported config field; a
        missing, unexpected or wrongly shaped tensor, or slopes that disagree
        with the formula (each naming the tensor); a bad mesh axis.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json in this directory")
    with open(config_path) as f:
        hf_config = json.load(f)
    files = _checkpoint_files(path)
    handles: dict[str, Any] = {}

    def handle(name: str):
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="numpy")
        return handles[file]

    first = handle("model.embed_tokens.weight") if "model.embed_tokens.weight" in files else None
    if dtype is None:
        dtype = first.get_slice("model.embed_tokens.weight").get_dtype() if first else "F32"
        dtype = {"F32": jnp.float32, "BF16": jnp.bfloat16, "F16": jnp.float16}.get(dtype, dtype)
    dtype = jnp.dtype(dtype)
    if config_overrides.get("seq_axis") is not None:
        config_overrides["mesh"] = mesh  # sequence parallelism runs on the same mesh
    config = config_from_hf(hf_config, dtype=dtype, param_dtype=dtype, **config_overrides)
    specs = _tensor_specs(config)

    # Names and shapes are checked against the headers before any tensor is read.
    expected: set[str] = set()
    for _, kind, names, shape in specs:
        for name in names if isinstance(names, list) else [names]:
            expected.add(name)
            if name not in files:
                if kind == "slopes":
                    continue
                raise ValueError(f"{path}: the checkpoint has no tensor {name!r}")
            got = tuple(handle(name).get_slice(name).get_shape())
            want = _hf_shape(kind, shape)
            if got != want:
                raise ValueError(f"{path}: tensor {name!r} has shape {got}, expected {want}")
    derived = {
        f"model.layers.{i}.self_attn.{b}"
        for i, t in enumerate(config.layer_types)
        if t == "linear_attention"
        for b in _DERIVED_BUFFERS
    }
    extra = sorted(set(files) - expected - derived)
    if extra:
        raise ValueError(f"{path}: unexpected tensors in the checkpoint: {extra}")

    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis is None:
            if len(mesh.axis_names) != 1:
                raise ValueError(
                    f"axis is required with a mesh of several axes {tuple(mesh.axis_names)}"
                )
            axis = mesh.axis_names[0]
        if axis not in mesh.axis_names:
            raise ValueError(f"axis {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")

    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)))
    for model_path, kind, names, shape in specs:
        reader = _reader(kind, names, handle, dtype)
        if kind == "slopes":
            layer = model_path[1]
            formula = np.asarray(
                minimax_slopes(config.num_attention_heads, layer, config.num_hidden_layers)
            )
            if names in files:
                stored = handle(names).get_slice(names)
                values = np.asarray(stored[:], np.float32).reshape(-1)
                eps = float(np.finfo(stored[:].dtype).eps)
                if not np.allclose(values, formula, rtol=max(eps, 1e-5), atol=0):
                    raise ValueError(
                        f"{path}: tensor {names!r} {values.tolist()} disagrees with the "
                        f"MiniMax slopes {formula.tolist()}"
                    )
            values = formula
            array = jnp.asarray(values, jnp.float32)
            if mesh is not None:
                array = jax.device_put(array, NamedSharding(mesh, PartitionSpec()))
        elif mesh is None:
            array = jnp.asarray(reader(_slices((), shape)))
        else:
            n = mesh.shape[axis]
            sharding = NamedSharding(mesh, _partition(model_path, shape, config, n, axis))
            array = jax.make_array_from_callback(
                shape, sharding, lambda index, r=reader, s=shape: r(_slices(index, s))
            )
        _variable(model, model_path).set_value(array)
    handles.clear()
    return model


def _reader(kind: str, names, handle: Callable, dtype) -> Callable[[tuple], np.ndarray]:
    """index (slices of the model-layout tensor) -> that slice as a NumPy array of `dtype`."""
    np_dtype = np.dtype(dtype)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if kind == "copy":
            out = handle(names).get_slice(names)[index]
        elif kind == "linear":
            rows, cols = index
            out = handle(names).get_slice(names)[cols, rows].T
        elif kind == "experts":
            experts, rows, cols = index
            out = np.stack([handle(n).get_slice(n)[cols, rows].T for n in names[experts]], axis=0)
        else:
            raise AssertionError(kind)
        return np.ascontiguousarray(out.astype(np_dtype, copy=False))

    return read


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    node: Any = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


# --- writing -----------------------------------------------------------------------------------


def _decay_buffers(slopes: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """transformers' derived buffers of a lightning layer (`decay_factors`), float32."""
    rate = slopes.astype(np.float32)[:, None, None]  # [H, 1, 1]
    r = np.arange(1, block_size + 1, dtype=np.float32)
    query = np.exp(-rate * r[:, None])
    key = np.exp(-rate * (block_size - r[:, None]))
    diff = (r[:, None] - r[None, :])[None, None]
    scaled = rate[None] * diff
    with np.errstate(over="ignore"):
        diagonal = np.exp(np.where(scaled >= 0, -scaled, -np.inf)).astype(np.float32)
    return {"slope_rate": rate, "query_decay": query, "key_decay": key, "diagonal_decay": diagonal}


def save_pretrained(
    model: MiniMaxForCausalLM,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes `config.json` and safetensors that `transformers` loads.

    The layout is that of `transformers.MiniMaxForCausalLM.save_pretrained`
    (per-expert `w1`/`w2`/`w3`, torch `[out, in]` linear weights, each
    lightning layer's `slope_rate` and derived decay buffers). Parameters are
    gathered to the host one at a time and written in shards of at most
    `max_shard_bytes` (a larger single tensor gets a shard of its own), so the
    host holds about one shard: one `model.safetensors` when everything fits
    in one, else `model-0000i-of-0000n.safetensors` files and
    `model.safetensors.index.json`.

    Args:
      model: the model to save.
      path: output directory (created if needed).
      dtype: dtype of the stored weights (None: the parameters' dtype).
        Buffers follow it, as in transformers.
      max_shard_bytes: the most bytes per file (default 5 GiB).
    """
    from safetensors.numpy import save_file

    if not isinstance(model, MiniMaxForCausalLM):
        raise TypeError(f"model must be a MiniMaxForCausalLM, got {type(model).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int):
        raise TypeError(f"max_shard_bytes must be an int, got {max_shard_bytes!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = model.config
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if dtype is None:
        dtype = _variable(model, ("embed_tokens", "embedding")).dtype
    np_dtype = np.dtype(jnp.dtype(dtype))

    def tensors():
        for model_path, kind, names, _ in _tensor_specs(config):
            value = np.asarray(jax.device_get(_variable(model, model_path)[...]))
            if kind == "linear":
                out = {names: value.T}
            elif kind == "experts":
                out = {name: value[e].T for e, name in enumerate(names)}
            elif kind == "slopes":
                prefix = names.rsplit(".", 1)[0]
                buffers = _decay_buffers(value, config.block_size)
                out = {f"{prefix}.{b}": array for b, array in buffers.items()}
            else:
                out = {names: value}
            for name, array in out.items():
                yield name, np.ascontiguousarray(array.astype(np_dtype, copy=False))

    shard: dict[str, np.ndarray] = {}
    files: list[list[str]] = []
    total = 0

    def flush():
        name = f"shard-{len(files):05d}.tmp"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        files.append([name, *shard])
        shard.clear()

    for name, array in tensors():
        if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
            flush()
        shard[name] = array
        total += array.nbytes
    flush()
    if len(files) == 1:
        os.replace(os.path.join(path, files[0][0]), os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, (tmp, *names) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(os.path.join(path, tmp), os.path.join(path, final))
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config, np_dtype), f, indent=2)
