"""Training examples streamed from the bucketed split's Parquet files, one file in memory.

mf_softmax learns from the positive rows (``label == 1``) of the train split: ``(user index,
item index, weight)``. The split is written as one Parquet file per user bucket
(``.../bucket=NNN/<part>.parquet``, columns named by ``nightrec.core.schema``). Instead of
reading every bucket into one frame, :class:`PositiveStream` serves batches from them:

- per epoch, a seeded order of the files (``seed``, ``epoch``);
- a file is read one row group at a time (only the four columns it needs; row groups whose
  label statistics say they hold no positive are skipped), its positives kept, then shuffled
  with a seeded generator (``seed``, ``epoch``, the file's position in ``paths``);
- the epoch is those shuffled files one after another, cut into ``batch_size`` batches (the
  last may be smaller; a batch may span two files).

Every positive row of every file comes exactly once per epoch, in an order fixed by ``seed``
and the epoch. Shuffling is within a bucket: a bucket is a hash sample of users, so a batch
is one bucket's users and their items, not a sample of all users.

Memory: the positives of at most two files (12 bytes a row), plus one row group's four columns
while a file is read. Construction reads the label column once (per row group, only where the
Parquet statistics cannot tell) to count positives, so ``len()`` is exact.

:func:`keras_dataset` wraps a stream as a ``keras.utils.PyDataset`` for ``model.fit``.
Importing this module imports numpy and pyarrow only; Keras is imported (through
``models.keras_module``) when :func:`keras_dataset` is called.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nightrec.core import schema

COLUMNS = (schema.USER_IDX, schema.ITEM_IDX, schema.WEIGHT, schema.LABEL)
CACHED_FILES = 2  # the file a batch ends in and the one before: a batch spans at most two
# (unless files hold fewer positives than a batch; then it reads them in turn, still correct)

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # users int32, items int32, weights float32


class PositiveStream:
    """Batches of positive rows from Parquet files, seeded, one epoch at a time.

    ``paths``: local Parquet files (at least one), each with the int ``USER_IDX``/``ITEM_IDX``
    columns, a numeric ``WEIGHT`` and an int ``LABEL``; a row is a positive when its label is 1
    (null is not). ``batch_size`` >= 1. ``seed``: int. Raises ValueError on a missing column,
    on no positive row at all, or (when a batch is read) on a file whose positives changed
    since construction.

    ``len(stream)`` is the batches per epoch, ``stream.n_rows`` the positives per epoch;
    ``stream.batch(i)`` is batch ``i`` (0 <= i < len) of the current epoch as ``(users int32,
    items int32, weights float32)``; ``stream.set_epoch(e)`` moves to epoch ``e``. Thread-safe.
    """

    def __init__(self, paths: Sequence[str | Path], *, batch_size: int, seed: int,
                 epoch: int = 0):
        self.batch_size = batch_size
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise ValueError("PositiveStream needs at least one Parquet file")
        self.seed = int(seed)
        # positives per (file, row group): what a file read must find, and the epoch's length
        self.group_rows = [_count_positives(p) for p in self.paths]
        self.file_rows = np.array([int(g.sum()) for g in self.group_rows], np.int64)
        self.n_rows = int(self.file_rows.sum())
        if self.n_rows == 0:
            raise ValueError(f"no positive ({schema.LABEL} == 1) row in {len(self.paths)} files")
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, Batch] = OrderedDict()
        self.set_epoch(epoch)

    @property
    def batch_size(self) -> int:
        """Rows per batch (>= 1); settable between epochs (``len`` follows), so a caller can
        size batches from ``n_rows``."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {value!r}")
        self._batch_size = int(value)

    def __len__(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` (>= 0) current: its file order; cached files are dropped."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        with self._lock:
            self.epoch = int(epoch)
            self.file_order = np.random.default_rng([self.seed, self.epoch]).permutation(
                len(self.paths))
            # where each file (in epoch order) starts in the epoch's stream of rows
            self._starts = np.concatenate([[0], np.cumsum(self.file_rows[self.file_order])])
            self._cache.clear()

    def batch(self, i: int) -> Batch:
        """Batch ``i`` of the current epoch: rows ``[i * batch_size, (i + 1) * batch_size)``
        of the epoch's stream (the last batch may be shorter)."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range: the epoch has {len(self)}")
        start = i * self.batch_size
        stop = min(start + self.batch_size, self.n_rows)
        pieces = []
        with self._lock:
            k = int(np.searchsorted(self._starts, start, side="right")) - 1
            while start < stop:
                file_start, file_stop = int(self._starts[k]), int(self._starts[k + 1])
                if file_stop > start:
                    rows = self._file(int(self.file_order[k]))
                    lo, hi = start - file_start, min(stop, file_stop) - file_start
                    pieces.append(tuple(col[lo:hi] for col in rows))
                    start = file_start + hi
                k += 1
        if len(pieces) == 1:
            return pieces[0]
        return tuple(np.concatenate(cols) for cols in zip(*pieces, strict=True))

    def __iter__(self) -> Iterator[Batch]:
        """The current epoch's batches, in order."""
        return (self.batch(i) for i in range(len(self)))

    def iter_files(self) -> Iterator[Batch]:
        """Each file's positives ``(users, items, weights)`` in file order, unshuffled, one file
        in memory at a time: a pass for item counts or the seen matrix."""
        for path, groups in zip(self.paths, self.group_rows, strict=True):
            yield _read_positives(path, groups)

    def _file(self, index: int) -> Batch:
        """File ``index``'s positives, shuffled for the current epoch (caller holds the lock)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        users, items, weights = _read_positives(self.paths[index], self.group_rows[index])
        order = np.random.default_rng([self.seed, self.epoch, index]).permutation(len(users))
        rows = (users[order], items[order], weights[order])
        self._cache[index] = rows
        while len(self._cache) > CACHED_FILES:
            self._cache.popitem(last=False)
        return rows


def _count_positives(path: str) -> np.ndarray:
    """Positives per row group of ``path``; the label column is read only where the row
    group's statistics (min, max, nulls) cannot say."""
    f = pq.ParquetFile(path)
    missing = [c for c in COLUMNS if c not in f.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    label = f.schema_arrow.names.index(schema.LABEL)
    counts = np.zeros(f.metadata.num_row_groups, np.int64)
    for g in range(f.metadata.num_row_groups):
        column = f.metadata.row_group(g).column(label)
        stats = column.statistics
        rows = f.metadata.row_group(g).num_rows
        if (stats is not None and stats.has_min_max and stats.has_null_count
                and stats.null_count == 0):
            if stats.min == stats.max == 1:
                counts[g] = rows
                continue
            if not stats.min <= 1 <= stats.max:
                continue
        elif rows == 0:
            continue
        labels = f.read_row_group(g, columns=[schema.LABEL]).column(0)
        counts[g] = pc.sum(pc.fill_null(pc.equal(labels, 1), False)).as_py() or 0
    return counts


def _read_positives(path: str, group_rows: np.ndarray) -> Batch:
    """``path``'s positive rows, row group by row group, in file order."""
    f = pq.ParquetFile(path)
    parts = []
    for g in np.flatnonzero(group_rows):
        table = f.read_row_group(int(g), columns=list(COLUMNS))
        table = table.filter(pc.fill_null(pc.equal(table.column(schema.LABEL), 1), False))
        parts.append(tuple(_numpy(table.column(c), dtype) for c, dtype in (
            (schema.USER_IDX, np.int32), (schema.ITEM_IDX, np.int32), (schema.WEIGHT, np.float32))))
    if not parts:
        rows = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    else:
        rows = tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))
    if len(rows[0]) != int(group_rows.sum()):
        raise ValueError(f"{path}: {len(rows[0])} positive rows, {int(group_rows.sum())} when "
                         "the stream was built (the file changed)")
    return rows


def _numpy(column: pa.ChunkedArray, dtype) -> np.ndarray:
    if column.null_count:
        raise ValueError(f"null in {column.type} column of a positive row")
    return column.to_numpy().astype(dtype, copy=False)


def default_inputs(users: np.ndarray, items: np.ndarray, weights: np.ndarray,
                   rng: np.random.Generator):
    """The full softmax's ``(x, y, sample_weight)``: users in, the item as the class."""
    del rng
    return users, items, weights


def keras_dataset(stream: PositiveStream, *,
                  to_inputs: Callable[..., tuple] = default_inputs, **pydataset_kwargs):
    """``stream`` as a ``keras.utils.PyDataset``: ``len`` is ``len(stream)``, item ``i`` is
    ``to_inputs(users, items, weights, rng)`` of batch ``i``, and each epoch's end moves the
    stream to the next epoch (new file order, new shuffles).

    ``rng`` is ``np.random.default_rng([stream.seed, epoch, i])``: what ``to_inputs`` draws
    (sampled softmax negatives) depends on the batch, not on the order batches are asked for.
    ``pydataset_kwargs`` (``workers``, ``use_multiprocessing``, ``max_queue_size``) go to
    PyDataset; keep ``use_multiprocessing`` False (the stream's cache is per process), and
    ``workers`` > 1 only for a costly ``to_inputs`` (batches are read in turn under a lock).
    """
    from nightrec.ml import models

    keras = models.keras_module()

    class StreamDataset(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(**pydataset_kwargs)
            self.stream = stream

        def __len__(self):
            return len(stream)

        def __getitem__(self, i):
            users, items, weights = stream.batch(i)
            return to_inputs(users, items, weights,
                             np.random.default_rng([stream.seed, stream.epoch, i]))

        def on_epoch_end(self):
            stream.set_epoch(stream.epoch + 1)

    return StreamDataset()
