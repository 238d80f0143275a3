"""Pallas kernels of Lightning Attention-2, one module per backend.

- `triton`: Pallas with the Triton lowering (NVIDIA and AMD GPUs).
- `mosaic_tpu`: Pallas on Mosaic TPU.
- `mosaic_gpu`: Pallas on Mosaic GPU (Hopper sm_90+: wgmma, TMA).

Each module exposes `lightning_attention_<backend>(q, k, v, slopes, initial_state,
*, block_size=None, interpret=False) -> (o, final_state)` with its own
`jax.custom_vjp`; `lightning_jax.lightning_attention(impl=...)` dispatches to them.
"""
