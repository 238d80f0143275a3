"""Byte-level text corpora for the language-model experiments, with no download.

The default corpus is the Python standard library's own source files (found
through `sysconfig`), which every machine with Python has. Any text file or
folder can be used instead. Files are split deterministically into train and
held-out parts by a hash of their relative path, so the split does not depend
on the order files are listed in or on which other files exist.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np

VOCAB_SIZE = 256  # bytes
DEFAULT_SUFFIXES = (".py",)


class Corpus(NamedTuple):
    """uint8 byte streams of the train and held-out files, and where they came from.

    `train_docs` `[n, 2]` int64: (start, stop) of each train document (file) in
    `train`, whose files are joined by one b"\\n" each; None for a corpus built
    by hand, which then counts as one document.
    """

    train: np.ndarray
    held_out: np.ndarray
    source: str
    num_files: int
    train_docs: np.ndarray | None = None


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages"))
        for name in sorted(filenames):
            if suffixes is None or name.endswith(suffixes):
                files.append(Path(dirpath) / name)
    return files


def _held_out(rel_path: str, fraction: float) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    held_out_fraction: float = 0.05,
    max_bytes: int | None = None,
) -> Corpus:
    """Loads a byte-level corpus and splits it into train and held-out streams.

    Args:
      path: a text file or a folder (every file below it, recursively); None:
        the `.py` files of the Python standard library.
      held_out_fraction: share of files that go to the held-out part (by a hash
        of each file's path relative to the root, so the split is stable).
      max_bytes: stop reading once this many bytes are loaded (files in sorted
        order), for quick runs.

    Returns:
      A `Corpus` with uint8 arrays `train` and `held_out`.

    Raises:
      ValueError: the path does not exist, holds no readable file, or gives an
        empty train or held-out part.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    if path is None:
        root, suffixes = stdlib_dir(), DEFAULT_SUFFIXES
    else:
        root, suffixes = Path(path), None
    if not root.exists():
        raise ValueError(f"corpus path {str(root)!r} does not exist")
    files = _list_files(root, suffixes)
    if len(files) == 1:  # one file: hold out its tail instead
        return _split_single_file(files[0], held_out_fraction, max_bytes)
    train, held, total, read = [], [], 0, 0
    for file in files:
        try:
            data = file.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        read += 1
        rel = file.relative_to(root).as_posix()
        (held if _held_out(rel, held_out_fraction) else train).append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return _make_corpus(train, held, str(root), read)


def _split_single_file(file: Path, held_out_fraction: float, max_bytes: int | None) -> Corpus:
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ValueError(f"corpus file {str(file)!r} is not readable: {err}") from err
    if max_bytes is not None:
        data = data[:max_bytes]
    cut = int(len(data) * (1.0 - held_out_fraction))
    return _make_corpus([data[:cut]], [data[cut:]], str(file), 1)


def _make_corpus(train: list[bytes], held: list[bytes], source: str, num_files: int) -> Corpus:
    if num_files == 0:
        raise ValueError(f"corpus {source!r} holds no readable, non-empty file")
    train_arr = np.frombuffer(b"\n".join(train), np.uint8)
    held_arr = np.frombuffer(b"\n".join(held), np.uint8)
    if train_arr.size < 2 or held_arr.size < 2:
        raise ValueError(
            f"corpus {source!r} is too small to split: {train_arr.size} train and "
            f"{held_arr.size} held-out bytes"
        )
    lengths = np.array([len(doc) for doc in train], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)  # +1: b"\n"
    docs = np.stack([starts, starts + lengths], axis=1)
    return Corpus(train_arr, held_arr, source, num_files, docs)


def sample_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int):
    """Random windows of seq_len + 1 bytes; a pure function of (seed, step).

    Returns int32 (inputs, targets), each [batch_size, seq_len]; targets are the
    inputs shifted by one byte. Being a function of the step alone, a resumed
    run sees exactly the batches an uninterrupted one would.
    """
    return sample_batch_shard(
        data, batch_size, seq_len, seed, step, slice(0, batch_size), slice(0, seq_len)
    )


def sample_batch_shard(
    data: np.ndarray,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
    rows: slice,
    tokens: slice,
):
    """One process's share of `sample_batch(data, batch_size, seq_len, seed, step)`.

    Returns int32 (inputs, targets), each [rows, tokens] of the global
    [batch_size, seq_len] batch: exactly `sample_batch(...)[i][rows, tokens]`,
    but only the bytes of that block are read. In a multi-process run each
    process loads its own block (a function of the step and of which devices the
    process holds), so a resumed run gets the same batches.

    Args:
      rows: contiguous rows of the global batch (`slice(start, stop)`).
      tokens: contiguous token positions of every row (`slice(start, stop)`).
    """
    if data.size < seq_len + 1:
        raise ValueError(
            f"the data ({data.size} bytes) is shorter than seq_len + 1 = {seq_len + 1}"
        )
    for name, part, size in (("rows", rows, batch_size), ("tokens", tokens, seq_len)):
        bounds = (part.start, part.stop)
        contiguous = part.step in (None, 1) and all(isinstance(b, int) for b in bounds)
        if not (contiguous and 0 <= part.start < part.stop <= size):
            raise ValueError(f"{name} must be a contiguous slice within [0, {size}), got {part}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, data.size - seq_len, size=batch_size)[rows]
    windows = np.stack([data[s + tokens.start : s + tokens.stop + 1] for s in starts]).astype(
        np.int32
    )
    return windows[:, :-1], windows[:, 1:]


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int, max_batches: int):
    """Consecutive non-overlapping windows from the start of the held-out data."""
    per_batch = batch_size * (seq_len + 1)
    count = min(max_batches, data.size // per_batch)
    if count == 0:
        raise ValueError(
            f"held-out data ({data.size} bytes) is shorter than one eval batch "
            f"({batch_size} x {seq_len + 1})"
        )
    for b in range(count):
        chunk = data[b * per_batch : (b + 1) * per_batch].astype(np.int32)
        windows = chunk.reshape(batch_size, seq_len + 1)
        yield windows[:, :-1], windows[:, 1:]


BATCHINGS = ("stream", "pack", "pad")


class DocumentRows:
    """Training rows of `seq_len` (input, target) byte pairs cut from whole documents.

    A document of L bytes gives L - 1 pairs (byte i predicts byte i + 1); a
    1-byte document gives none and is dropped. No pair crosses a document
    boundary. Two layouts of the same pairs:

    * packed (`pack=True`): every document's pairs, in corpus order, laid end
      to end and cut into rows of seq_len. A document continues in the next row
      where a row ends inside it (there as a new context: the state starts at
      zero in every row). Segment ids: document index + 1, so the id changes
      exactly at every document boundary; only the last row has a padding tail
      (id 0).
    * one document per row (`pack=False`): each document cut into row-sized
      pieces, each piece a row of its own, padded to seq_len (id 1 real, 0 pad).

    Pad positions have input 0, target 0 and weight 0. Which rows a step gets
    is a pure function of (seed, step): epochs of a seeded permutation of the
    rows, so a resumed run sees the same batches.
    """

    def __init__(self, data: np.ndarray, docs: np.ndarray | None, seq_len: int, *, pack: bool):
        """data: uint8 `[N]`; docs: int `[n, 2]` (start, stop) in data, None: one document.

        Raises:
          ValueError: seq_len < 1, a span outside data, or no document of 2+ bytes.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        docs = np.array([[0, data.size]] if docs is None else docs, np.int64).reshape(-1, 2)
        if docs.size and (
            docs.min() < 0 or docs.max() > data.size or (docs[:, 1] < docs[:, 0]).any()
        ):
            raise ValueError(f"docs must be (start, stop) spans within the {data.size} bytes")
        pairs = docs[:, 1] - docs[:, 0] - 1
        keep = pairs > 0
        if not keep.any():
            raise ValueError("no document has 2 or more bytes: there is nothing to predict")
        self.data, self.seq_len, self.pack = data, int(seq_len), pack
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self.doc_starts, self.doc_pairs = docs[keep, 0], pairs[keep]
        self.num_docs = int(keep.sum())
        self.num_pairs = int(self.doc_pairs.sum())
        if pack:
            self.pair_offsets = np.concatenate([[0], np.cumsum(self.doc_pairs)])
            self.num_rows = -(-self.num_pairs // self.seq_len)
        else:  # row r: piece of document piece_doc[r], pairs piece_start[r] : + piece_len[r]
            pieces = -(-self.doc_pairs // self.seq_len)
            self.piece_doc = np.repeat(np.arange(self.num_docs), pieces)
            first = np.concatenate([[0], np.cumsum(pieces)[:-1]])
            self.piece_start = (np.arange(pieces.sum()) - np.repeat(first, pieces)) * self.seq_len
            self.piece_len = np.minimum(
                self.seq_len, self.doc_pairs[self.piece_doc] - self.piece_start
            )
            self.num_rows = int(pieces.sum())

    @property
    def pad_fraction(self) -> float:
        """Share of pad positions over all rows."""
        return 1.0 - self.num_pairs / (self.num_rows * self.seq_len)

    def row_indices(self, batch_size: int, seed: int, step: int) -> np.ndarray:
        """int `[batch_size]` rows of the step: consecutive places in epochs of permutations."""
        places = step * batch_size + np.arange(batch_size, dtype=np.int64)
        epochs, within = np.divmod(places, self.num_rows)
        rows = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            order = self._epoch_order(seed, int(epoch))
            rows[epochs == epoch] = order[within[epochs == epoch]]
        return rows

    def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's permutation of the rows, kept for the next calls: a step draws it
        twice (its batch, its real-token count) and every step of an epoch uses the same."""
        key = (seed, epoch)
        if key not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.clear()
            self._orders[key] = np.random.default_rng([seed, epoch, 1]).permutation(self.num_rows)
        return self._orders[key]

    def real_tokens(self, rows: np.ndarray) -> np.ndarray:
        """int `[len(rows)]`: the real (non-pad) positions of each row."""
        if self.pack:
            return np.clip(self.num_pairs - np.asarray(rows) * self.seq_len, 0, self.seq_len)
        return self.piece_len[rows]

    def gather(self, rows: np.ndarray, tokens: slice = slice(None)):
        """The given rows, positions `tokens`: (inputs, targets, segment_ids, weights).

        Returns int32 inputs, targets, segment_ids and float32 weights (1 real, 0
        pad), each `[len(rows), positions]`.
        """
        start, stop, _ = tokens.indices(self.seq_len)
        rows = np.asarray(rows, np.int64)[:, None]
        t = np.arange(start, stop, dtype=np.int64)[None, :]
        if self.pack:
            place = rows * self.seq_len + t
            real = place < self.num_pairs
            doc = np.searchsorted(self.pair_offsets, np.minimum(place, self.num_pairs - 1), "right")
            doc -= 1
            local = place - self.pair_offsets[doc]
            ids = np.where(real, doc + 1, 0)
        else:
            doc = self.piece_doc[rows] + 0 * t
            local = self.piece_start[rows] + t
            real = t < self.piece_len[rows]
            ids = real.astype(np.int64)
        source = self.doc_starts[doc] + np.where(real, local, 0)
        inputs = np.where(real, self.data[source], 0).astype(np.int32)
        targets = np.where(real, self.data[source + 1], 0).astype(np.int32)
        return inputs, targets, ids.astype(np.int32), real.astype(np.float32)

    def batch_shard(self, batch_size: int, seed: int, step: int, rows: slice, tokens: slice):
        """One process's block [rows, tokens] of the step's global `[batch_size, seq_len]` batch.

        A function of (seed, step, rows, tokens) only, as `sample_batch_shard`.
        Returns (inputs, targets, segment_ids, weights) as `gather`.
        """
        return self.gather(self.row_indices(batch_size, seed, step)[rows], tokens)
