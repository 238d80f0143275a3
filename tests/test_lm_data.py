"""The byte-level corpus: loading, the deterministic split, batches."""

from __future__ import annotations

import numpy as np
import pytest

import lm_data


def _write_tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_folder_split_is_by_file_and_stable(tmp_path):
    files = {f"pkg{i % 3}/mod{i}.txt": f"file {i} ".encode() * 50 for i in range(60)}
    _write_tree(tmp_path, files)
    corpus = lm_data.load_corpus(tmp_path, held_out_fraction=0.2)
    assert corpus.num_files == 60
    # Every byte lands in exactly one part (files are joined by one newline each).
    assert corpus.train.size + corpus.held_out.size == sum(map(len, files.values())) + 60 - 2
    # The split depends on each file's relative path only, not on the other files.
    _write_tree(tmp_path / "more", {"extra.txt": b"x" * 100})
    again = lm_data.load_corpus(tmp_path, held_out_fraction=0.2)
    held = {rel for rel in files if lm_data._held_out(rel, 0.2)}
    assert 0 < len(held) < 60
    for rel in held:
        assert files[rel] in again.held_out.tobytes()
        assert files[rel] not in again.train.tobytes()


def test_single_file_holds_out_its_tail(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(bytes(range(256)) * 4)
    corpus = lm_data.load_corpus(path, held_out_fraction=0.25)
    assert corpus.train.tobytes() + corpus.held_out.tobytes() == path.read_bytes()
    assert corpus.held_out.size == 256


def test_default_corpus_is_the_stdlib():
    corpus = lm_data.load_corpus(max_bytes=2_000_000)
    assert corpus.train.size > 1_000_000 and corpus.held_out.size > 10_000
    assert b"def " in corpus.train.tobytes()[:200_000]


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "empty_file"])
def test_bad_corpus(tmp_path, kind):
    if kind == "missing":
        path, match = tmp_path / "nope", "does not exist"
    elif kind == "empty_dir":
        path, match = tmp_path, "no readable, non-empty file"
    else:
        path = tmp_path / "empty.txt"
        path.write_bytes(b"")
        match = "too small to split"
    with pytest.raises(ValueError, match=match):
        lm_data.load_corpus(path)


def test_batches_are_a_function_of_the_step():
    data = np.frombuffer(bytes(range(256)) * 40, np.uint8)
    x1, y1 = lm_data.sample_batch(data, 4, 16, seed=3, step=7)
    x2, y2 = lm_data.sample_batch(data, 4, 16, seed=3, step=7)
    x3, _ = lm_data.sample_batch(data, 4, 16, seed=3, step=8)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (4, 16) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    np.testing.assert_array_equal((x1 + 1) % 256, y1)  # the data counts up by one


def test_a_batch_shard_is_its_block_of_the_global_batch():
    """What one process loads: rows x tokens of the step's batch, the same windows."""
    data = np.arange(50_000, dtype=np.int64).astype(np.uint16).view(np.uint8)  # distinct pairs
    x, y = lm_data.sample_batch(data, 4, 16, seed=3, step=7)
    starts = np.random.default_rng([3, 7]).integers(0, data.size - 16, size=4)
    np.testing.assert_array_equal(x, np.stack([data[s : s + 16] for s in starts]))
    blocks = [(slice(0, 2), slice(0, 8)), (slice(2, 4), slice(8, 16)), (slice(1, 4), slice(3, 9))]
    for rows, tokens in blocks:
        xs, ys = lm_data.sample_batch_shard(data, 4, 16, 3, 7, rows, tokens)
        assert xs.shape == (rows.stop - rows.start, tokens.stop - tokens.start)
        np.testing.assert_array_equal(xs, x[rows, tokens])
        np.testing.assert_array_equal(ys, y[rows, tokens])
    with pytest.raises(ValueError, match="tokens must be a contiguous slice"):
        lm_data.sample_batch_shard(data, 4, 16, 3, 7, slice(0, 4), slice(8, 17))
    with pytest.raises(ValueError, match="rows must be a contiguous slice"):
        lm_data.sample_batch_shard(data, 4, 16, 3, 7, slice(0, 4, 2), slice(0, 16))


def test_eval_batches_are_consecutive_windows():
    data = np.arange(100, dtype=np.uint8)
    batches = list(lm_data.eval_batches(data, 2, 9, max_batches=10))
    assert len(batches) == 5
    x, y = batches[1]
    np.testing.assert_array_equal(x[0], np.arange(20, 29))
    np.testing.assert_array_equal(y[1], np.arange(31, 40))
    with pytest.raises(ValueError, match="shorter than one eval batch"):
        list(lm_data.eval_batches(data[:10], 2, 9, max_batches=1))
