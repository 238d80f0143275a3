"""The training pieces of experiments/: steps, resume, data parallelism, the TGS bench."""

from __future__ import annotations

import dataclasses
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import bench_tgs
import lightning_jax as lj
import lm_data
import lm_train

TINY = dict(
    num_layers=1,
    embed_dim=32,
    num_heads=2,
    seq_len=32,
    batch_size=8,  # the default mesh spans every device: tests/conftest.py forces 8
    learning_rate=1e-2,
    warmup_steps=2,
    log_every=2,
    eval_every=4,
    eval_batches=2,
    checkpoint_every=3,
    plot=False,
)


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.mark.parametrize("mixer", ["lightning", "softmax"])
def test_training_reduces_the_loss(tmp_path, corpus, mixer):
    cfg = lm_train.TrainConfig(**TINY, mixer=mixer, steps=12, workdir=str(tmp_path))
    records = lm_train.train(cfg, corpus, verbose=False)["records"]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5, evals
    logged = lm_train.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12]
    assert all({"step", "train_loss", "tokens_per_sec"} <= r.keys() for r in logged)
    assert all(abs(r["eval_bpb"] - r["eval_loss"] / np.log(2)) < 1e-9 for r in logged[1::2])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, corpus):
    """An uninterrupted TINY run of 6 steps."""
    workdir = tmp_path_factory.mktemp("straight")
    straight = lm_train.TrainConfig(**TINY, steps=6, workdir=str(workdir))
    return straight, lm_train.train(straight, corpus, verbose=False)


def _curve(records):
    """What a resumed run must reproduce: the losses at every logged step (not the speeds)."""
    return [(r["step"], r["train_loss"], r.get("eval_loss")) for r in records]


def test_resume_reproduces_an_uninterrupted_run(tmp_path, corpus, straight_run):
    straight, full = straight_run
    first = dataclasses.replace(straight, steps=3, workdir=str(tmp_path / "b"))
    lm_train.train(first, corpus, verbose=False)
    # As if the first part had logged step 5 and died before its next checkpoint.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train_loss": 9.0, "tokens_per_sec": null}\n')
    resumed = lm_train.train(
        dataclasses.replace(first, steps=6, resume=True), corpus, verbose=False
    )
    for a, b in zip(_params(full["state"]), _params(resumed["state"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # The log of the resumed run continues the first part's, from its checkpoint (step 3).
    assert [r["step"] for r in resumed["records"]] == [2, 3, 4, 6]


def test_a_signal_saves_the_step_and_resume_finishes_the_run(
    tmp_path, corpus, straight_run, monkeypatch
):
    straight, full = straight_run
    # resume on an empty workdir starts the run there from step 0.
    cfg = dataclasses.replace(straight, workdir=str(tmp_path), resume=True, plot=True)
    real_step = lm_train.Trainer.step

    def step(self, data, step):
        if step == 3:  # Ctrl-C during the 4th step, between two checkpoints (3 and 6)
            signal.raise_signal(signal.SIGINT)
        return real_step(self, data, step)

    monkeypatch.setattr(lm_train.Trainer, "step", step)
    # What the run must restore (default_int_handler, or SIG_IGN in a process started in
    # the background by a shell, as CI may be).
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(lm_train.Interrupted) as stop:
        lm_train.train(cfg, corpus, verbose=False)
    assert (stop.value.step, stop.value.signum) == (4, signal.SIGINT)
    assert lm_train.checkpoint_steps(tmp_path) == [3, 4]
    assert (tmp_path / "loss.png").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    monkeypatch.undo()

    resumed = lm_train.train(cfg, corpus, verbose=False)
    for a, b in zip(_params(full["state"]), _params(resumed["state"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _curve(resumed["records"]) == _curve(full["records"])

    # A finished run: nothing to do, nothing rewritten.
    (tmp_path / "loss.png").unlink()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    again = lm_train.train(cfg, corpus, verbose=False)
    assert again["finished"] and again["state"] is None
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert not (tmp_path / "loss.png").exists()

    # The run restored for use: the final parameters, sampling greedily.
    run = lm_train.load_run(tmp_path)
    assert run.step == 6 and run.config.embed_dim == TINY["embed_dim"]
    restored = [np.asarray(x) for x in jax.tree.leaves(nnx.state(run.model, nnx.Param))]
    for a, b in zip(_params(full["state"]), restored, strict=True):
        np.testing.assert_array_equal(a, b)
    text = lm_train.sample_text(run.model, "def ", 5)
    tokens = jnp.asarray([list(b"def ")], jnp.int32)
    expected = lj.generate(run.model, tokens, 5, temperature=0.0)
    assert text == bytes(np.asarray(expected[0], np.uint8)).decode("utf-8", errors="replace")
    with pytest.raises(ValueError, match="no checkpoint at step 5"):
        lm_train.load_run(tmp_path, step=5)


def _fake_run(workdir, cfg: lm_train.TrainConfig, checkpoint_steps=(3,)) -> None:
    """The files a finished run leaves, without training (check_workdir reads only these)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (workdir / "metrics.jsonl").write_text('{"step": 3}\n')
    for step in checkpoint_steps:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)


def test_a_used_workdir_is_refused_without_resume_or_overwrite(tmp_path):
    cfg = lm_train.TrainConfig(**TINY, steps=6, workdir=str(tmp_path))
    lm_train.check_workdir(cfg)  # empty: fine
    for name in lm_train.RUN_FILES:
        (tmp_path / name).mkdir() if name == "checkpoints" else (tmp_path / name).write_text("")
        with pytest.raises(lm_train.ConfigError, match=f"({name}).*--resume.*--overwrite"):
            lm_train.check_workdir(cfg)
        lm_train.clear_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    _fake_run(tmp_path, cfg)
    lm_train.prepare_workdir(dataclasses.replace(cfg, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's files


def test_resume_checks_the_saved_run(tmp_path):
    saved = lm_train.TrainConfig(**TINY, steps=6, workdir=str(tmp_path))
    resume = dataclasses.replace(saved, resume=True)
    lm_train.check_workdir(resume)  # nothing there yet: resume starts from step 0
    # A run that saved its config but no checkpoint yet: the config is still checked.
    _fake_run(tmp_path, saved, checkpoint_steps=())
    with pytest.raises(lm_train.ConfigError, match="seed 0 -> 1"):
        lm_train.check_workdir(dataclasses.replace(resume, seed=1))
    _fake_run(tmp_path, saved, checkpoint_steps=(3, 6))
    lm_train.check_workdir(resume)
    # Longer, other intervals, another implementation or layout: the same run continued.
    lm_train.check_workdir(
        dataclasses.replace(resume, steps=9, log_every=1, eval_every=3, impl="reference")
    )
    with pytest.raises(lm_train.ConfigError, match=r"learning_rate 0.01 -> 0.02; seed 0 -> 1"):
        lm_train.check_workdir(dataclasses.replace(resume, seed=1, learning_rate=0.02))
    with pytest.raises(lm_train.ConfigError, match="embed_dim 32 -> 64"):
        lm_train.check_workdir(dataclasses.replace(resume, embed_dim=64))
    with pytest.raises(lm_train.ConfigError, match="--steps=4 is below the step 6"):
        lm_train.check_workdir(dataclasses.replace(resume, steps=4))
    with pytest.raises(lm_train.ConfigError, match="exclude each other"):
        lm_train.validate_config(dataclasses.replace(resume, overwrite=True))
    # A field an older version did not save counts as its default.
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weight_decay"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    lm_train.check_workdir(resume)
    (tmp_path / "config.json").unlink()
    with pytest.raises(lm_train.ConfigError, match="config.json is missing"):
        lm_train.check_workdir(resume)


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("steps", -1, "--steps"),
        ("batch_size", 0, "--batch_size"),
        ("seq_len", 0, "--seq_len"),
        ("num_heads", 3, "--num_heads=3 must divide --embed_dim=32"),
        ("impl", "foo", "--impl"),
        ("learning_rate", 0.0, "--learning_rate"),
        ("seed", -1, "--seed"),
        ("data", "", "--data"),
        ("eval_every", 0, "--eval_every"),
    ],
)
def test_validate_config_names_the_flag(field, value, flag):
    with pytest.raises(lm_train.ConfigError, match=flag):
        lm_train.validate_config(lm_train.TrainConfig(**{**TINY, field: value}))


def test_validate_config_against_the_devices():
    cfg = lm_train.TrainConfig(**TINY)  # batch 8
    lm_train.validate_config(cfg, num_devices=8)
    with pytest.raises(lm_train.ConfigError, match="--seq_parallel=16 is larger than the 8"):
        lm_train.validate_config(dataclasses.replace(cfg, seq_parallel=16), num_devices=8)
    with pytest.raises(lm_train.ConfigError, match="--seq_parallel=3 must divide the 8"):
        lm_train.validate_config(
            dataclasses.replace(cfg, seq_parallel=3, seq_len=33), num_devices=8
        )
    with pytest.raises(lm_train.ConfigError, match="--batch_size=8 must divide by the 3"):
        lm_train.validate_config(cfg, num_devices=3)


def test_validate_corpus_names_the_flags(corpus):
    with pytest.raises(lm_train.ConfigError, match="--seq_len=100000 needs"):
        lm_train.validate_corpus(lm_train.TrainConfig(**{**TINY, "seq_len": 100_000}), corpus)
    with pytest.raises(lm_train.ConfigError, match="--batch_size=64"):
        lm_train.validate_corpus(lm_train.TrainConfig(**{**TINY, "batch_size": 64}), corpus)
    cut = lm_train.TrainConfig(**{**TINY, "batch_size": 64, "max_corpus_bytes": 1000})
    with pytest.raises(lm_train.ConfigError, match="read up to --max_corpus_bytes=1000"):
        lm_train.validate_corpus(cut, corpus)


def test_data_parallel_step_equals_single_device(corpus):
    """One step on a 4-device data mesh == the same step on one device."""
    devices = jax.devices()
    assert len(devices) >= 4, "tests/conftest.py forces 8 host devices"
    cfg = lm_train.TrainConfig(**TINY, steps=2)
    single = lm_train.Trainer(cfg, Mesh(np.array(devices[:1]), ("data",)))
    multi = lm_train.Trainer(cfg, Mesh(np.array(devices[:4]), ("data",)))
    for step in range(2):
        loss_1 = float(single.step(corpus.train, step))
        loss_4 = float(multi.step(corpus.train, step))
        assert abs(loss_1 - loss_4) < 1e-5 * abs(loss_1)
    assert all(x.sharding.mesh.size == 4 for x in jax.tree.leaves(multi.state["params"]))
    for a, b in zip(_params(single.state), _params(multi.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_batch_must_divide_by_the_data_devices():
    cfg = lm_train.TrainConfig(**{**TINY, "batch_size": 6})
    assert len(jax.devices()) >= 4
    with pytest.raises(ValueError, match="batch_size 6 must divide by the 4 devices"):
        lm_train.Trainer(cfg, Mesh(np.array(jax.devices()[:4]), ("data",)))


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset must be one of"):
        lm_train.config_from_preset("huge")


def test_tgs_bench_on_tiny_sizes(tmp_path):
    rows = bench_tgs.measure_tgs(
        "lightning", [32, 64], 512, num_layers=1, embed_dim=32, num_heads=2, reps=2
    )
    assert [r["seq"] for r in rows] == [32, 64] and [r["batch"] for r in rows] == [16, 8]
    assert all(r["tgs"] > 0 and r["step_s"] > 0 for r in rows)
    bench_tgs.plot_tgs(rows, str(tmp_path / "tgs.png"))
    assert (tmp_path / "tgs.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="must be a multiple of seq"):
        bench_tgs.measure_tgs(
            "lightning", [48], 256, num_layers=1, embed_dim=32, num_heads=2, reps=1
        )


def _packed_batch(batch_size: int, seq_len: int, pack: bool = True):
    """A [batch_size, seq_len] batch of document rows: short documents and ones past a row."""
    rng = np.random.default_rng(0)
    lengths = [7, 2, 40, 1, 13, 33, 5, 70, 3, 9, 21, 50]
    documents = [rng.integers(32, 127, n, dtype=np.uint8).tobytes() for n in lengths]
    data = np.frombuffer(b"\n".join(documents), np.uint8)
    starts = np.cumsum([0] + [n + 1 for n in lengths[:-1]])
    rows = lm_data.DocumentRows(
        data, np.stack([starts, starts + lengths], axis=1), seq_len, pack=pack
    )
    assert rows.num_rows >= batch_size
    return rows.gather(np.arange(batch_size))


@pytest.mark.parametrize("mixer", ["lightning", "softmax"])
def test_packed_rows_equal_each_document_alone(mixer):
    """Per-token losses and the gradient of a packed batch == each document run by itself."""
    cfg = lm_train.TrainConfig(**TINY, mixer=mixer, batching="pack")
    trainer = lm_train.Trainer(cfg, Mesh(np.array(jax.devices()[:1]), ("data",)))
    params = trainer.state["params"]
    inputs, targets, ids, weights = _packed_batch(4, cfg.seq_len)
    assert (np.diff(ids, axis=1) != 0).sum() >= 4  # several documents share a row
    packed = np.asarray(trainer.token_losses(params, inputs, targets, ids))
    # The reference: every run of one document (within a row) alone at the start of a row
    # of its own, without segment ids (the zeros after it are later, so causality alone
    # keeps them out of its outputs): one batch, one compile.
    runs = []
    for row in range(ids.shape[0]):
        cuts = np.flatnonzero(np.diff(ids[row])) + 1
        for start, stop in zip([0, *cuts], [*cuts, ids.shape[1]]):
            if ids[row, start] != 0:  # not the padding tail
                runs.append((row, start, stop))
    alone_inputs, alone_targets, alone_weights = (
        np.zeros((len(runs), cfg.seq_len), a.dtype) for a in (inputs, targets, weights)
    )
    for i, (row, start, stop) in enumerate(runs):
        alone_inputs[i, : stop - start] = inputs[row, start:stop]
        alone_targets[i, : stop - start] = targets[row, start:stop]
        alone_weights[i, : stop - start] = 1
    alone = np.asarray(trainer.token_losses(params, alone_inputs, alone_targets))
    np.testing.assert_allclose(
        packed[weights == 1], alone[alone_weights == 1], rtol=1e-5, atol=1e-5
    )
    # The training loss's gradient: the mean over the same real tokens, either way.
    masked = jax.grad(trainer._masked_loss)(params, inputs, targets, ids, weights)
    separate = jax.grad(trainer._masked_loss)(
        params, alone_inputs, alone_targets, None, alone_weights
    )
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(separate), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_pad_tokens_weigh_nothing():
    """One-document-per-row rows: whatever the pad positions hold, the loss is unchanged."""
    cfg = lm_train.TrainConfig(**TINY, batching="pad")
    trainer = lm_train.Trainer(cfg, Mesh(np.array(jax.devices()[:1]), ("data",)))
    params = trainer.state["params"]
    inputs, targets, _, weights = _packed_batch(8, cfg.seq_len, pack=False)
    assert 0 < weights.sum() < weights.size
    loss = float(trainer._masked_loss(params, inputs, targets, None, weights))
    losses = np.asarray(trainer.token_losses(params, inputs, targets))
    assert loss == pytest.approx(losses[weights == 1].mean(), rel=1e-6)
    noise = np.random.default_rng(1).integers(0, 256, inputs.shape)
    pad = weights == 0
    other = float(
        trainer._masked_loss(
            params, np.where(pad, noise, inputs), np.where(pad, noise, targets), None, weights
        )
    )
    assert other == pytest.approx(loss, rel=1e-6)


@pytest.fixture(scope="module")
def documents_corpus(tmp_path_factory):
    """A folder of short files of varied lengths: documents for --batching=pack/pad."""
    root = tmp_path_factory.mktemp("documents")
    rng = np.random.default_rng(0)
    for i in range(60):
        words = rng.choice(["the", "quick", "brown", "fox", "jumps", "lazy", "dog"], 2 + i % 5)
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + ".")
    return lm_data.load_corpus(root, held_out_fraction=0.3)


@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_document_batching_trains_and_resumes(tmp_path, documents_corpus, batching):
    cfg = lm_train.TrainConfig(**TINY, batching=batching, steps=6, workdir=str(tmp_path / "a"))
    full = lm_train.train(cfg, documents_corpus, verbose=False)
    records = full["records"]
    assert all(0 <= r["pad_fraction"] < 1 for r in records if r["tokens_per_sec"])
    if batching == "pad":  # short documents: most of a padded row is padding
        assert all(r["pad_fraction"] > 0.3 for r in records if r["tokens_per_sec"])
    first = dataclasses.replace(cfg, steps=3, workdir=str(tmp_path / "b"))
    lm_train.train(first, documents_corpus, verbose=False)
    resumed = lm_train.train(
        dataclasses.replace(first, steps=6, resume=True), documents_corpus, verbose=False
    )
    for a, b in zip(_params(full["state"]), _params(resumed["state"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_packed_data_parallel_step_equals_single_device(documents_corpus):
    cfg = lm_train.TrainConfig(**TINY, batching="pack", steps=2)
    data = lm_train.training_data(cfg, documents_corpus)
    single = lm_train.Trainer(cfg, Mesh(np.array(jax.devices()[:1]), ("data",)))
    multi = lm_train.Trainer(cfg, Mesh(np.array(jax.devices()[:4]), ("data",)))
    for step in range(2):
        loss_1 = float(single.step(data, step))
        loss_4 = float(multi.step(data, step))
        assert abs(loss_1 - loss_4) < 1e-5 * abs(loss_1)
    for a, b in zip(_params(single.state), _params(multi.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_packed_sequence_parallel_step_equals_single_device(documents_corpus):
    """Segment ids sharded over "seq" like the tokens: the same steps as on one device."""
    cfg = lm_train.TrainConfig(**{**TINY, "batch_size": 2}, batching="pack", steps=2)
    data = lm_train.training_data(cfg, documents_corpus)
    single = lm_train.Trainer(cfg, Mesh(np.array(jax.devices()[:1]), ("data",)))
    parallel = lm_train.Trainer(dataclasses.replace(cfg, seq_parallel=4))  # data 2 x seq 4
    assert (np.diff(data.gather(np.arange(2))[2], axis=1) != 0).any()  # ids change in rows
    for step in range(2):
        loss_1 = float(single.step(data, step))
        loss_sp = float(parallel.step(data, step))
        assert abs(loss_1 - loss_sp) < 1e-5 * abs(loss_1)


def test_batching_is_checked():
    with pytest.raises(lm_train.ConfigError, match="--batching must be one of"):
        lm_train.validate_config(lm_train.TrainConfig(**TINY, batching="packed"))
    data = np.frombuffer(b"a\nb\nc\nd", np.uint8)
    one_byte_files = lm_data.Corpus(data, data, "x", 4, np.array([[0, 1], [2, 3], [4, 5]]))
    cfg = lm_train.TrainConfig(**{**TINY, "seq_len": 2, "batch_size": 1}, batching="pack")
    with pytest.raises(lm_train.ConfigError, match="--batching=pack: no document"):
        lm_train.validate_corpus(cfg, one_byte_files)
