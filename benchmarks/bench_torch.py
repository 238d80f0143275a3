r"""The PyTorch kernels of the same op, timed at the shapes of `bench_ops.py` (GPU only).

Times, side by side, forward and forward+backward per token of

- `fla`: flash-linear-attention's `chunk_simple_gla` (package `fla-core`) with a fixed
  per-head decay `g_gamma = -slope` and `scale=1`: the same op as
  `lightning_jax.lightning_attention` (layout `[B, T, H, D]`);
- `lightning_attn`: the official Lightning Attention-2 Triton kernel
  (`lightning_attn.ops.lightning_attn_func`, package `lightning-attn`; layout
  `[B, H, T, D]`, slopes `[H, 1, 1]`),

with the same ALiBi slopes and random inputs as `bench_ops.py`. First checks that both
agree with a float32 per-token recurrence at a small shape (skipping a kernel that
does not), then times every seq (CUDA events, median of --reps).

  python benchmarks/bench_torch.py --batch=4 --heads=32 --dim=128 --dtype=bfloat16
  python benchmarks/bench_torch.py --impls=fla --max_seq=65536 --out=runs/torch.json

Needs torch with CUDA, triton, and the packages of the kernels asked for; a kernel
whose package is missing is reported and left out. Writes JSON (default under runs/).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi slopes, the construction of `lightning_jax.alibi_slopes` (closest power of 2)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def make_kernels(names: list[str]) -> dict:
    """{name: f(q, k, v, slopes) -> o} on [B, H, T, D] tensors, for the importable kernels."""
    kernels = {}
    for name in names:
        try:
            if name == "fla":
                from fla.ops.simple_gla import chunk_simple_gla

                def fla(q, k, v, slopes, _f=chunk_simple_gla):
                    o, _ = _f(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        g_gamma=-slopes, scale=1.0,
                    )  # fmt: skip
                    return o.transpose(1, 2)

                kernels[name] = fla
            elif name == "lightning_attn":
                from lightning_attn.ops import lightning_attn_func

                def official(q, k, v, slopes, _f=lightning_attn_func):
                    return _f(q, k, v, slopes.reshape(-1, 1, 1))

                kernels[name] = official
            else:
                raise ValueError(f"--impls: unknown kernel {name!r} (fla, lightning_attn)")
        except ImportError as err:
            print(f"{name}: not importable ({err}); left out", flush=True)
    return kernels


def recurrence(q, k, v, slopes):
    """o_t = q_t kv_t, kv_t = lambda kv_{t-1} + k_t^T v_t, in float32 ([B, H, T, D])."""
    import torch

    q, k, v = (x.float() for x in (q, k, v))
    decay = torch.exp(-slopes.float())[None, :, None, None]
    state = torch.zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3], device=q.device)
    out = []
    for t in range(q.shape[2]):
        state = decay * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    return torch.stack(out, dim=2)


def _forward_backward(fn, q, k, v, slopes, do):
    import torch

    return torch.autograd.grad(fn(q, k, v, slopes), (q, k, v), do)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="fla,lightning_attn")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--min_seq", type=int, default=1024)
    parser.add_argument("--max_seq", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="runs/bench_torch.json", help="JSON ('' to skip)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_torch: needs torch with CUDA (and triton); torch is not installed")
        return 1

    if not torch.cuda.is_available():
        print("bench_torch: no CUDA device; these kernels run on NVIDIA GPUs only")
        return 0
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    kernels = make_kernels(args.impls.split(","))
    slopes = torch.tensor(alibi_slopes(args.heads), device=dev, dtype=torch.float32)

    checks = {}
    gen = torch.Generator(device=dev).manual_seed(0)
    small = [torch.randn(1, args.heads, 256, args.dim, device=dev, generator=gen) for _ in "qkv"]
    small = [x.to(dtype).contiguous() for x in small]  # the recurrence sees the same inputs
    want = recurrence(*small, slopes)
    for name, fn in list(kernels.items()):
        got = fn(*small, slopes).float()
        err = ((got - want).norm() / want.norm()).item()
        checks[name] = err
        ok = err < (1e-2 if dtype != torch.float32 else 1e-3)
        print(f"{name}: relative RMS error against the float32 recurrence {err:.2e}", flush=True)
        if not ok:
            print(f"{name}: does not compute the op at this setting; left out", flush=True)
            del kernels[name]

    def timed(fn) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.reps):
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3)
        return statistics.median(samples)

    rows = []
    seq = args.min_seq
    print(f"{'impl':>15} {'seq':>7} {'fwd us/tok':>11} {'f+b us/tok':>11}")
    while seq <= args.max_seq:
        shape = (args.batch, args.heads, seq, args.dim)
        q, k, v, do = (torch.randn(shape, device=dev, dtype=dtype) for _ in range(4))
        for name, fn in kernels.items():
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            try:
                fwd = timed(functools.partial(fn, q, k, v, slopes))
                fwd_bwd = timed(functools.partial(_forward_backward, fn, qg, kg, vg, slopes, do))
            except Exception as err:  # noqa: BLE001 - reported per row, the sweep goes on
                print(f"{name:>15} {seq:>7} failed: {type(err).__name__}: {err}", flush=True)
                continue
            row = dict(impl=name, seq=seq, fwd_s=fwd, fwd_bwd_s=fwd_bwd)
            row["fwd_us_per_token"] = fwd / seq * 1e6
            row["fwd_bwd_us_per_token"] = fwd_bwd / seq * 1e6
            rows.append(row)
            print(
                f"{name:>15} {seq:>7} {row['fwd_us_per_token']:>11.4f} "
                f"{row['fwd_bwd_us_per_token']:>11.4f}",
                flush=True,
            )
        del q, k, v, do
        torch.cuda.empty_cache()
        seq *= 2
    result = dict(
        rows=rows,
        checks=checks,
        config=dict(
            vars(args),
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%d"),
            command="python " + " ".join(sys.argv),
        ),
    )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
