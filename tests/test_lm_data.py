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


def test_corpus_train_docs_are_the_files(tmp_path):
    files = {f"d{i:02d}.txt": f"<{i}>".encode() * (i + 1) for i in range(40)}
    _write_tree(tmp_path, files)
    corpus = lm_data.load_corpus(tmp_path, held_out_fraction=0.2)
    docs = [corpus.train[start:stop].tobytes() for start, stop in corpus.train_docs]
    train_files = [data for data in files.values() if data not in corpus.held_out.tobytes()]
    assert docs == train_files  # every train file, whole, in the listing's (sorted) order
    assert b"\n".join(docs) == corpus.train.tobytes()


def _documents(seed: int = 0) -> list[bytes]:
    """Random byte documents: 1 byte (nothing to predict), short, and longer than a row."""
    rng = np.random.default_rng(seed)
    lengths = [5, 1, 2, 40, 17, 3, 100, 16, 17, 1, 9]
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]


def _rows_of(documents: list[bytes], seq_len: int, pack: bool) -> lm_data.DocumentRows:
    data = np.frombuffer(b"\n".join(documents), np.uint8)
    starts = np.cumsum([0] + [len(d) + 1 for d in documents[:-1]])
    spans = np.stack([starts, starts + [len(d) for d in documents]], axis=1)
    return lm_data.DocumentRows(data, spans, seq_len, pack=pack)


def test_packing_keeps_every_byte_in_order_and_ids_change_at_documents():
    documents, seq_len = _documents(), 16
    rows = _rows_of(documents, seq_len, pack=True)
    inputs, targets, ids, weights = rows.gather(np.arange(rows.num_rows))
    real = weights.ravel() == 1
    predicted = [d for d in documents if len(d) > 1]
    # Every (byte, next byte) pair of every document, in order, and nothing else.
    expected_inputs = np.frombuffer(b"".join(d[:-1] for d in predicted), np.uint8)
    expected_targets = np.frombuffer(b"".join(d[1:] for d in predicted), np.uint8)
    np.testing.assert_array_equal(inputs.ravel()[real], expected_inputs)
    np.testing.assert_array_equal(targets.ravel()[real], expected_targets)
    # One id per document: the id sequence changes exactly at the document boundaries.
    expected_ids = np.repeat(np.arange(1, len(predicted) + 1), [len(d) - 1 for d in predicted])
    np.testing.assert_array_equal(ids.ravel()[real], expected_ids)
    # Padding: only the last row's tail, id 0 (no document's), weight 0, input/target 0.
    assert rows.num_rows == -(-expected_inputs.size // seq_len)
    assert real[: expected_inputs.size].all() and not real[expected_inputs.size :].any()
    assert (ids.ravel()[~real] == 0).all()
    assert (inputs.ravel()[~real] == 0).all() and (targets.ravel()[~real] == 0).all()
    pads = rows.num_rows * seq_len - expected_inputs.size
    assert rows.pad_fraction == pytest.approx(pads / (rows.num_rows * seq_len))
    np.testing.assert_array_equal(
        rows.real_tokens(np.arange(rows.num_rows)), weights.sum(axis=1).astype(int)
    )


def test_one_document_per_row_pads_each_piece():
    documents, seq_len = _documents(), 16
    rows = _rows_of(documents, seq_len, pack=False)
    inputs, targets, ids, weights = rows.gather(np.arange(rows.num_rows))
    predicted = [d for d in documents if len(d) > 1]
    assert rows.num_rows == sum(-(-(len(d) - 1) // seq_len) for d in predicted)
    row = 0
    for doc in predicted:  # each document: its pieces in consecutive rows, a padded tail each
        pairs = len(doc) - 1
        for start in range(0, pairs, seq_len):
            n = min(seq_len, pairs - start)
            assert list(inputs[row, :n]) == list(doc[start : start + n])
            assert list(targets[row, :n]) == list(doc[start + 1 : start + n + 1])
            np.testing.assert_array_equal(weights[row], np.arange(seq_len) < n)
            np.testing.assert_array_equal(ids[row], (np.arange(seq_len) < n).astype(int))
            assert (inputs[row, n:] == 0).all() and (targets[row, n:] == 0).all()
            row += 1
    assert rows.pad_fraction == pytest.approx(1 - weights.mean())


@pytest.mark.parametrize("pack", [True, False])
def test_document_batches_are_a_function_of_the_step(pack):
    rows = _rows_of(_documents(), 8, pack=pack)
    n = rows.num_rows
    # Every row once per epoch: steps of 3 rows walk through seeded permutations.
    seen = np.concatenate([rows.row_indices(3, seed=5, step=s) for s in range(2 * n)])
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(seen[epoch * n : (epoch + 1) * n]), np.arange(n))
    np.testing.assert_array_equal(rows.row_indices(3, 5, 7), rows.row_indices(3, 5, 7))
    assert not np.array_equal(rows.row_indices(3, 5, 0), rows.row_indices(3, 6, 0))
    # A process's block is that block of the global batch.
    full = rows.batch_shard(4, 5, 7, slice(0, 4), slice(0, 8))
    for block in [
        (slice(0, 2), slice(0, 4)),
        (slice(2, 4), slice(4, 8)),
        (slice(1, 3), slice(2, 7)),
    ]:
        for part, whole in zip(rows.batch_shard(4, 5, 7, *block), full, strict=True):
            np.testing.assert_array_equal(part, whole[block])


def test_document_rows_refuse_bad_input():
    data = np.frombuffer(b"a\nb\nc", np.uint8)
    with pytest.raises(ValueError, match="no document has 2 or more bytes"):
        lm_data.DocumentRows(data, np.array([[0, 1], [2, 3], [4, 5]]), 8, pack=True)
    with pytest.raises(ValueError, match="seq_len"):
        lm_data.DocumentRows(data, None, 0, pack=True)
    with pytest.raises(ValueError, match="docs must be"):
        lm_data.DocumentRows(data, np.array([[0, 9]]), 8, pack=False)
