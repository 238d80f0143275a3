r"""MiniMax-01 in JAX: checkpoint loading (time, peak host memory) and forward tokens/s.

Two measurements on random models scaled to fit one machine:

1. Loading: a random MiniMax checkpoint is written with
   `lightning_jax.hf.save_pretrained`, then loaded by `from_pretrained` in a fresh
   process. Reported: the checkpoint's size and largest tensor, load seconds,
   and the process's resident memory before, at peak and after. On a CPU
   backend the loaded parameters themselves live in host memory, so the
   transient cost of streaming is peak - after (it should be near the largest
   tensor, not the model).
2. Forward speed: tokens/s of a jitted forward (batch 1) at each --lengths, for
   the MiniMax layer pattern (one softmax layer in --softmax_every, the rest
   lightning, impl --impl) and for the same model with every layer softmax.

  python benchmarks/bench_minimax.py                       # -> runs/bench_minimax/
  python benchmarks/bench_minimax.py --lengths=1024,4096 --reps=5
  python benchmarks/bench_minimax.py --skip_load           # forward speed only

Writes --out (default runs/bench_minimax/bench_minimax.json). A flag mistake
exits with status 2 and one line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from lightning_jax import cli
from lightning_jax.cli import usage_error

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "Sequence lengths of the forward timing.")
flags.DEFINE_integer("reps", 3, "Timed forwards per (model, length) after one warm-up (median).")
flags.DEFINE_string("impl", "xla", "Lightning op implementation.")
flags.DEFINE_integer("hidden_size", 256, "Width D of the timed models.")
flags.DEFINE_integer("num_heads", 2, "Heads of the timed models (head dim D / heads).")
flags.DEFINE_integer("num_layers", 4, "Layers of the timed models.")
flags.DEFINE_integer("softmax_every", 4, "Every k-th layer is softmax in the MiniMax pattern.")
flags.DEFINE_integer("load_layers", 4, "Layers of the loading benchmark's model (hidden 1024).")
flags.DEFINE_bool("skip_load", False, "Skip the loading benchmark.")
flags.DEFINE_bool("skip_forward", False, "Skip the forward benchmark.")
flags.DEFINE_string("out", "runs/bench_minimax/bench_minimax.json", "JSON output path.")

# Run in a fresh process: RSS before, peak and after loading, as JSON on stdout.
_LOAD_CHILD = """
import json, sys, threading, time
import jax
jax.numpy.zeros(1).block_until_ready()
from flax import nnx
from lightning_jax import hf

def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) * 1024
    return fields

peak = dict(RssAnon=0, RssFile=0)
done = threading.Event()

def sample():
    while not done.is_set():
        for name, value in status().items():
            peak[name] = max(peak[name], value)
        time.sleep(0.002)

before = status()
thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
model = hf.from_pretrained(sys.argv[1])
jax.block_until_ready(nnx.state(model))
seconds = time.perf_counter() - start
done.set()
thread.join()
after = status()
print(json.dumps(dict(seconds=seconds, before=before, peak=peak, after=after)))
"""


def check_flags() -> list[int]:
    try:
        lengths = [int(x) for x in FLAGS.lengths]
    except ValueError:
        usage_error(f"--lengths must be positive ints, got {','.join(FLAGS.lengths)}")
    if not lengths or min(lengths) < 1:
        usage_error(f"--lengths must be positive ints, got {','.join(FLAGS.lengths)}")
    for name in ("reps", "hidden_size", "num_heads", "num_layers", "softmax_every", "load_layers"):
        if getattr(FLAGS, name) < 1:
            usage_error(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if FLAGS.hidden_size % FLAGS.num_heads or (FLAGS.hidden_size // FLAGS.num_heads) % 2:
        usage_error(
            f"--hidden_size ({FLAGS.hidden_size}) / --num_heads ({FLAGS.num_heads}) must be an "
            "even integer head dim"
        )
    if FLAGS.softmax_every > FLAGS.num_layers:
        usage_error(f"--softmax_every ({FLAGS.softmax_every}) exceeds --num_layers")
    return lengths


def bench_load(workdir: str) -> dict:
    """Writes a random checkpoint and loads it in a fresh process."""
    import numpy as np
    from flax import nnx

    from lightning_jax import hf
    from lightning_jax.minimax import MiniMaxConfig, MiniMaxForCausalLM

    layers = FLAGS.load_layers
    config = MiniMaxConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        layer_types=tuple(
            "full_attention" if (i + 1) % 8 == 0 else "linear_attention" for i in range(layers)
        ),
        num_local_experts=8,
        num_experts_per_tok=2,
        block_size=256,
    )
    path = os.path.join(workdir, "checkpoint")
    hf.save_pretrained(MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)), path)
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    largest = 0
    with safe_open(file, framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            s = f.get_slice(name)
            largest = max(largest, int(np.prod(s.get_shape())) * 4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1])] + sys.path))
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, path],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    anon = {key: result[key]["RssAnon"] for key in ("before", "peak", "after")}
    result.update(
        checkpoint_bytes=os.path.getsize(file),
        largest_tensor_bytes=largest,
        layers=layers,
        # Anonymous memory (RssAnon): what the process allocated. The checkpoint file is read
        # through a memory map, whose clean, evictable pages count as RssFile instead.
        loaded_bytes=anon["after"] - anon["before"],
        transient_bytes=anon["peak"] - anon["after"],
        peak_file_mapped_bytes=result["peak"]["RssFile"] - result["before"]["RssFile"],
    )
    mib = 2**20
    print(
        f"load: checkpoint {result['checkpoint_bytes'] / mib:.0f} MiB (largest tensor "
        f"{largest / mib:.0f} MiB) in {result['seconds']:.2f} s; anonymous memory "
        f"+{result['loaded_bytes'] / mib:.0f} MiB after, peak - after "
        f"{result['transient_bytes'] / mib:.0f} MiB; file-mapped peak "
        f"+{result['peak_file_mapped_bytes'] / mib:.0f} MiB",
        flush=True,
    )
    return result


def bench_forward(lengths: list[int]) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lightning_jax.minimax import MiniMaxConfig, MiniMaxForCausalLM

    k, n = FLAGS.softmax_every, FLAGS.num_layers
    patterns = {
        "minimax": tuple(
            "full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)
        ),
        "softmax": ("full_attention",) * n,
    }

    @nnx.jit
    def forward(model, tokens):
        return model(tokens)

    rows = []
    for name, types in patterns.items():
        config = MiniMaxConfig(
            vocab_size=1024,
            hidden_size=FLAGS.hidden_size,
            intermediate_size=FLAGS.hidden_size,
            num_hidden_layers=n,
            num_attention_heads=FLAGS.num_heads,
            layer_types=types,
            num_local_experts=4,
            num_experts_per_tok=2,
            impl=FLAGS.impl,
        )
        model = MiniMaxForCausalLM(config, rngs=nnx.Rngs(0))
        for length in lengths:
            tokens = jnp.asarray(jax.random.randint(jax.random.key(length), (1, length), 0, 1024))
            forward(model, tokens).block_until_ready()  # compile + warm up
            times = []
            for _ in range(FLAGS.reps):
                start = time.perf_counter()
                forward(model, tokens).block_until_ready()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append(
                dict(model=name, seq_len=length, seconds=seconds, tokens_per_s=length / seconds)
            )
            print(f"forward {name:8s} T={length:6d}: {length / seconds:10.0f} tokens/s", flush=True)
    return rows


def main(argv):
    del argv  # cli.run refuses positional arguments
    lengths = check_flags()
    import jax

    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        command="python " + " ".join(sys.argv),
        device=str(jax.devices()[0]),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    if not FLAGS.skip_load:
        with tempfile.TemporaryDirectory(dir=out.parent) as workdir:
            result["load"] = bench_load(workdir)
    if not FLAGS.skip_forward:
        result["forward"] = bench_forward(lengths)
        speed = {(r["model"], r["seq_len"]): r["tokens_per_s"] for r in result["forward"]}
        for length in lengths:
            ratio = speed[("minimax", length)] / speed[("softmax", length)]
            print(f"T={length}: MiniMax pattern / all-softmax tokens/s = {ratio:.2f}")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
