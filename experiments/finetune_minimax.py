r"""Fine-tune a MiniMax-01 checkpoint on text with optax, then save it back.

Loads a local Hugging Face checkpoint (`lightning_jax.hf.from_pretrained`),
takes --steps AdamW steps on windows of text under `nnx.jit`, saves the result
with `lightning_jax.hf.save_pretrained` (transformers loads it) and reports the
loss, the time per step (median after the first, compiling step) and the peak
memory (device peak where the backend reports it, else the process's peak RSS).

  python experiments/finetune_minimax.py --checkpoint=/path/to/minimax-hf --tokens=ids.npy
  python experiments/finetune_minimax.py --random_init     # a tiny random model, byte text
  python experiments/finetune_minimax.py --random_init --pack   # documents packed, segment ids

Tokens: --tokens is a 1-D integer .npy of token ids (tokenise with the model's
own tokenizer beforehand) with optional --doc_ids (same length, one id per
document). Without --tokens the text is the UTF-8 bytes of --text_glob's files
(default: this repository's Python sources), which needs a vocabulary of at
least 256 (--random_init builds one). --pack keeps documents apart: each window
carries its tokens' document ids as `segment_ids` (lightning layers reset their
state, softmax layers mask by document) and targets across a document boundary
are left out of the loss.

Everything goes to --out (default runs/finetune_minimax): checkpoint/ (the saved
model) and metrics.json. A flag mistake exits with status 2 and one line.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from absl import flags

from lightning_jax import cli
from lightning_jax.cli import usage_error

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Local Hugging Face MiniMax checkpoint directory.")
flags.DEFINE_bool("random_init", False, "Start from a tiny random MiniMax model instead.")
flags.DEFINE_string("tokens", None, "1-D integer .npy of token ids (default: bytes of text).")
flags.DEFINE_string("doc_ids", None, "1-D integer .npy: the document id of each token.")
flags.DEFINE_string("text_glob", "lightning_jax/*.py", "Text files (bytes) without --tokens.")
flags.DEFINE_integer("steps", 20, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 4, "Windows per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per window.")
flags.DEFINE_float("learning_rate", 3e-4, "AdamW learning rate.")
flags.DEFINE_bool("pack", False, "Segment ids per document; no target across documents.")
flags.DEFINE_string("impl", "auto", "Lightning op implementation.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default: file's).")
flags.DEFINE_integer("seed", 0, "Seed of the window sampling (and of --random_init).")
flags.DEFINE_string("out", "runs/finetune_minimax", "Output directory.")


def check_flags() -> None:
    if (FLAGS.checkpoint is None) == (not FLAGS.random_init):
        usage_error("pass exactly one of --checkpoint and --random_init")
    if FLAGS.checkpoint is not None and not os.path.isfile(
        os.path.join(FLAGS.checkpoint, "config.json")
    ):
        usage_error(f"--checkpoint: no config.json in {FLAGS.checkpoint!r}")
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(FLAGS, name) < 1:
            usage_error(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if FLAGS.learning_rate <= 0:
        usage_error(f"--learning_rate must be > 0, got {FLAGS.learning_rate}")
    for name in ("tokens", "doc_ids"):
        path = getattr(FLAGS, name)
        if path is not None and not os.path.isfile(path):
            usage_error(f"--{name}: no file {path!r}")
    if FLAGS.doc_ids is not None and FLAGS.tokens is None:
        usage_error("--doc_ids needs --tokens")
    if FLAGS.tokens is None and not glob.glob(FLAGS.text_glob):
        usage_error(f"--text_glob: no files match {FLAGS.text_glob!r}")


def load_text():
    """(tokens, doc_ids) int32 1-D arrays of equal length."""
    import numpy as np

    if FLAGS.tokens is not None:
        tokens = np.load(FLAGS.tokens).astype(np.int32).reshape(-1)
        if FLAGS.doc_ids is None:
            return tokens, np.zeros_like(tokens)
        doc_ids = np.load(FLAGS.doc_ids).astype(np.int32).reshape(-1)
        if doc_ids.shape != tokens.shape:
            usage_error(f"--doc_ids has {doc_ids.size} entries, --tokens {tokens.size}")
        return tokens, doc_ids
    files = sorted(glob.glob(FLAGS.text_glob))
    docs = [np.frombuffer(Path(f).read_bytes(), np.uint8).astype(np.int32) for f in files]
    ids = [np.full(len(d), i, np.int32) for i, d in enumerate(docs)]
    return np.concatenate(docs), np.concatenate(ids)


def tiny_random_checkpoint(path: str) -> None:
    """A 4-layer MiniMax (3 lightning + 1 softmax, 4 experts) with 256 byte ids, saved to path."""
    from flax import nnx

    from lightning_jax import hf
    from lightning_jax.minimax import MiniMaxConfig, MiniMaxForCausalLM

    config = MiniMaxConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=("linear_attention",) * 3 + ("full_attention",),
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=64,
    )
    hf.save_pretrained(MiniMaxForCausalLM(config, rngs=nnx.Rngs(FLAGS.seed)), path)


def peak_memory_bytes() -> tuple[int, str]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def main(argv):
    del argv  # cli.run refuses positional arguments
    check_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from lightning_jax import hf

    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    source = FLAGS.checkpoint
    if FLAGS.random_init:
        source = str(out / "initial")
        tiny_random_checkpoint(source)
    tokens, doc_ids = load_text()
    start = time.perf_counter()
    model = hf.from_pretrained(source, dtype=FLAGS.dtype, impl=FLAGS.impl)
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    if tokens.max() >= vocab:
        usage_error(f"token id {int(tokens.max())} >= the model's vocab_size {vocab}")
    if tokens.size < FLAGS.seq_len + 1:
        usage_error(f"--seq_len {FLAGS.seq_len} exceeds the text ({tokens.size} tokens)")

    optimizer = nnx.Optimizer(model, optax.adamw(FLAGS.learning_rate), wrt=nnx.Param)

    def loss_fn(m, inputs, targets, segment_ids, weights):
        logits = m(inputs, segment_ids=segment_ids).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    @nnx.jit
    def train_step(m, opt, inputs, targets, segment_ids, weights):
        loss, grads = nnx.value_and_grad(loss_fn)(m, inputs, targets, segment_ids, weights)
        opt.update(m, grads)
        return loss

    rng = np.random.default_rng(FLAGS.seed)
    n, t = FLAGS.batch_size, FLAGS.seq_len
    records, times = [], []
    for step in range(FLAGS.steps):
        starts = rng.integers(0, tokens.size - t - 1, n)
        window = np.stack([tokens[s : s + t + 1] for s in starts])
        docs = np.stack([doc_ids[s : s + t + 1] for s in starts])
        segment_ids = jnp.asarray(docs[:, :-1]) if FLAGS.pack else None
        # Without --pack every target counts; with it, only targets of the input's document.
        weights = (docs[:, 1:] == docs[:, :-1]) if FLAGS.pack else np.ones((n, t), bool)
        begin = time.perf_counter()
        loss = train_step(
            model,
            optimizer,
            jnp.asarray(window[:, :-1]),
            jnp.asarray(window[:, 1:]),
            segment_ids,
            jnp.asarray(weights, jnp.float32),
        )
        loss = float(loss)
        times.append(time.perf_counter() - begin)
        records.append(dict(step=step + 1, loss=loss, seconds=times[-1]))
        print(f"step {step + 1:4d}  loss {loss:.4f}  {times[-1]:.2f}s", flush=True)

    start = time.perf_counter()
    hf.save_pretrained(model, out / "checkpoint")
    save_s = time.perf_counter() - start
    peak, peak_kind = peak_memory_bytes()
    steady = times[1:] or times
    step_s = statistics.median(steady)
    summary = dict(
        command="python " + " ".join(sys.argv),
        device=str(jax.devices()[0]),
        params=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        batch_size=n,
        seq_len=t,
        pack=FLAGS.pack,
        load_seconds=load_s,
        save_seconds=save_s,
        first_step_seconds=times[0],
        median_step_seconds=step_s,
        tokens_per_second=n * t / step_s,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        first_loss=records[0]["loss"],
        last_loss=records[-1]["loss"],
        records=records,
    )
    with open(out / "metrics.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(
        f"loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; "
        f"{step_s:.3f} s/step ({n * t / step_s:.0f} tokens/s, median after the first step); "
        f"{peak_kind} {peak / 2**20:.0f} MiB; saved {out / 'checkpoint'}; "
        f"wrote {out / 'metrics.json'}"
    )


if __name__ == "__main__":
    cli.run(main)
