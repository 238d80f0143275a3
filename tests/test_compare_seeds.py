"""experiments/compare_seeds.py: held-out losses of several --compare seeds joined."""

from __future__ import annotations

import json

import compare_seeds
import pytest
from absl import app


def _compare(losses: dict[str, float]) -> dict:
    runs = {
        mixer: dict(
            eval_loss=loss,
            eval_bpb=loss * 1.5,
            median_tokens_per_sec=100.0,
            eval_curve=[[50, loss + 1.0], [100, loss]],
        )  # fmt: skip
        for mixer, loss in losses.items()
    }
    return dict(command="python train_lm.py --compare=...", runs=runs)


def test_summarize_gives_mean_std_and_range_per_mixer(tmp_path):
    paths = []
    for seed, (a, b) in enumerate(((2.0, 2.3), (2.2, 2.1), (2.4, 2.2))):
        (tmp_path / str(seed)).mkdir()
        with open(tmp_path / str(seed) / "compare.json", "w") as fh:
            json.dump(_compare(dict(lightning=a, softmax=b)), fh)
        paths.append(str(tmp_path / str(seed)))
    summary = compare_seeds.summarize(compare_seeds.load_runs(paths))
    loss = summary["lightning"]["eval_loss"]
    assert loss["mean"] == pytest.approx(2.2) and loss["std"] == pytest.approx(0.2)
    assert (loss["min"], loss["max"]) == (2.0, 2.4)
    assert summary["softmax"]["eval_bpb"]["mean"] == pytest.approx(1.5 * 2.2)
    assert summary["softmax"]["curve"]["mean"] == pytest.approx([3.2, 2.2])
    assert summary["softmax"]["curve"]["min"] == pytest.approx([3.1, 2.1])
    with open(tmp_path / "0" / "compare.json", "w") as fh:
        json.dump(_compare(dict(lightning=2.0)), fh)
    with pytest.raises(app.UsageError, match="compare different mixers"):
        compare_seeds.load_runs(paths)
    with pytest.raises(app.UsageError, match="no compare.json"):
        compare_seeds.load_runs([str(tmp_path / "missing")])
