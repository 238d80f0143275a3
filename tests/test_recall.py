"""experiments/recall.py: the task's sequences, and one tiny training run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import recall
from absl import app


@pytest.mark.parametrize("fused", [False, True], ids=["pairs-of-tokens", "fused-pairs"])
def test_recall_batch_asks_for_the_value_of_each_key(fused):
    rng = np.random.default_rng(0)
    num_keys, num_values = 8, 10
    pairs = np.array([1, 3, 5, 2])
    inputs, targets, is_answer = recall.recall_batch(
        rng, pairs, num_keys, num_values, seq_len=20, fused=fused
    )
    assert inputs.shape == targets.shape == is_answer.shape == (4, 20)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # targets: the next token
    vocab = recall.vocab_size(num_keys, num_values, fused)
    assert inputs.max() < vocab and targets.max() < vocab
    for b, n in enumerate(pairs):
        row = np.concatenate([inputs[b, :1], targets[b]])
        if fused:  # token 19 + 10 * (key - 1) + (value - 9): decode the pair
            pair_ids = row[:n] - (num_keys + num_values + 1)
            keys, values = pair_ids // num_values + 1, pair_ids % num_values + num_keys + 1
            asked = n
        else:
            keys, values = row[0 : 2 * n : 2], row[1 : 2 * n : 2]
            asked = 2 * n
        assert len(set(keys.tolist())) == n and keys.min() >= 1 and keys.max() <= 8
        assert values.min() >= 9 and values.max() <= 18
        value_of = dict(zip(keys.tolist(), values.tolist()))
        # Every answer position: the input is a key asked again, the target its value.
        answer_cols = np.flatnonzero(is_answer[b])
        assert len(answer_cols) == n
        assert sorted(inputs[b, answer_cols].tolist()) == sorted(keys.tolist())
        for col in answer_cols:
            assert col >= asked and targets[b, col] == value_of[int(inputs[b, col])]
        assert (row[asked + 2 * n :] == recall.PAD).all()
    with pytest.raises(ValueError, match="must not exceed num_keys 4"):
        recall.recall_batch(rng, np.array([5]), 4, 4, seq_len=40, fused=fused)
    with pytest.raises(ValueError, match="seq_len"):
        recall.recall_batch(rng, np.array([3]), 8, 4, seq_len=7, fused=fused)


def test_train_and_evaluate_runs_on_a_hybrid():
    result = recall.train_and_evaluate(
        "hybrid",
        pairs=[1, 2],
        steps=3,
        batch_size=4,
        learning_rate=1e-3,
        num_keys=4,
        num_values=4,
        num_layers=2,
        embed_dim=16,
        num_heads=2,
        eval_sequences=8,
        seed=0,
        fused=True,
    )
    assert result["layer_mixers"] == ["lightning", "softmax"]
    assert sorted(result["accuracy_by_context"]) == [3, 6]
    assert all(0.0 <= a <= 1.0 for a in result["accuracy_by_context"].values())


def test_merge_joins_one_mixer_runs(tmp_path):
    def run(mixer, accuracy, steps=5):
        config = dict(mixers=[mixer], steps=steps, pairs=["1", "2"])
        result = dict(mixer=mixer, accuracy_by_context={"3": accuracy, "6": accuracy / 2})
        return dict(results=[{**result, "train_seconds": 1.0}], chance=0.25, config=config,
                    command=f"python recall.py --mixers={mixer}")  # fmt: skip

    paths = []
    for mixer, acc in (("lightning", 0.5), ("softmax", 0.9)):
        paths.append(str(tmp_path / f"{mixer}.json"))
        with open(paths[-1], "w") as fh:
            json.dump(run(mixer, acc), fh)
    recall.merge(paths, str(tmp_path / "all.json"))
    with open(tmp_path / "all.json") as fh:
        merged = json.load(fh)
    assert [r["mixer"] for r in merged["results"]] == ["lightning", "softmax"]
    assert merged["config"]["mixers"] == ["lightning", "softmax"]
    assert merged["results"][1]["accuracy_by_context"] == {"3": 0.9, "6": 0.45}
    assert (tmp_path / "all.png").stat().st_size > 1000
    with open(paths[1], "w") as fh:
        json.dump(run("softmax", 0.9, steps=6), fh)
    with pytest.raises(app.UsageError, match="differ in more than --mixers"):
        recall.merge(paths, str(tmp_path / "bad.json"))
