r"""Sample text from a model trained by train_lm.py.

Restores the run in --workdir (its config.json and latest checkpoint, with
`lm_train.load_run`) and continues --prompt byte by byte: greedy (the most
likely byte each step) by default, sampled with --temperature > 0 (and --seed,
--top_k). Prints the prompt followed by the generated text.

  python experiments/generate.py --workdir=runs/train_demo --prompt="def "
  python experiments/generate.py --prompt="import " --temperature=0.8 --seed=1 --top_k=20
  python experiments/generate.py --step=250 --max_new_tokens=400   # an earlier checkpoint

A flag mistake (or a workdir without a trained run) exits with status 2 and one
line naming the flag.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_train  # noqa: E402
from lightning_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", lm_train.default_workdir(), "The train_lm.py run to sample from.")
flags.DEFINE_string("prompt", "def ", "Text the model continues (at least one character).")
flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy (the default).")
flags.DEFINE_integer("top_k", None, "Sample among the k likeliest bytes (--temperature > 0).")
flags.DEFINE_integer("seed", 0, "Seed of the sampling (--temperature > 0).")
flags.DEFINE_integer("step", None, "The checkpoint's step (default: the latest).")

cli.positive_int("max_new_tokens", minimum=0)
cli.positive_int("top_k")
cli.positive_int("seed", minimum=0)
cli.positive_int("step", minimum=0)
flags.register_validator(
    "temperature",
    lambda t: 0 <= t < float("inf"),
    message="--temperature must be finite and >= 0",
)
flags.register_validator("prompt", bool, message="--prompt must hold at least one character")
flags.register_validator(
    "top_k",
    lambda top_k: top_k is None or top_k <= 256,
    message="--top_k must be at most 256 (the bytes)",
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    if FLAGS.top_k is not None and FLAGS.temperature == 0:
        raise cli.UsageError("--top_k samples: it needs --temperature > 0")
    try:
        run = lm_train.load_run(FLAGS.workdir, FLAGS.step)
    except ValueError as err:
        flag = "--step" if FLAGS.step is not None and "at step" in str(err) else "--workdir"
        raise cli.UsageError(f"{flag}: {err}") from None
    text = lm_train.sample_text(
        run.model,
        FLAGS.prompt,
        FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        seed=FLAGS.seed,
    )
    print(text)


if __name__ == "__main__":
    cli.run(main)
