"""Data for slaves: local data sources and the reference workload of DESIGN.md.

A slave names its data with one string (plus options), so an operator configures it in
one line of TOML:

* ``path.npz`` — arrays ``x`` (features) and ``y`` (integer labels), and optionally
  ``task`` (one task name per row, for ``[multitask]`` jobs); always loaded with
  ``allow_pickle=False``, so a data file can never execute code;
* ``path.csv`` — numeric rows, label in the last column unless ``label_column`` (index or
  header name) says otherwise; a header row is detected and optional; a column headed
  ``task`` holds each row's task name (text);
* ``module:function`` — an entry point returning a map-style torch ``Dataset``, called
  with the options as keyword arguments (for data the two formats above cannot express);
* ``reference:I`` / ``reference:I/N`` — shard I (0-based) of the reference split over N
  slaves (default 8), and ``reference:test`` — its test set.

The reference workload is scikit-learn's ``load_digits`` split as DESIGN.md fixes it.
`ReferenceSplit.save` writes the split's row indices to ``.npz`` so a benchmark (Flower)
can train on exactly the same shards.
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fedmq.common.errors import ConfigError

DEFAULT_SLAVES = 8
_MAX_SPLIT_ATTEMPTS = 1000


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: pixels scaled from 0..16 to [0, 1] as float32, labels int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ConfigError("scikit-learn is needed for the reference workload: "
                          "pip install 'fedmq[embedded]'") from exc
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)),
                         torch.from_numpy(np.ascontiguousarray(y)))


class TaskDataset(TensorDataset):
    """(x, y) rows that each belong to a task (a shared encoder's jobs: docs/PROTOCOL.md
    section 11.9); `tasks[i]` names row i's task, and `y[i]` is a class of that task."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, tasks: np.ndarray) -> None:
        super().__init__(x, y)
        self.tasks = tasks


def task_dataset(x: np.ndarray, y: np.ndarray, tasks: Sequence[Any] | np.ndarray) -> TaskDataset:
    """Rows tagged with task names (numbers are taken as their text)."""
    names = np.asarray([str(t) for t in np.asarray(tasks).tolist()], dtype=str)
    if names.ndim != 1 or len(names) != len(y):
        raise ConfigError(f"task: expected one task name per row ({len(y)} rows), got shape {names.shape}")
    base = _as_dataset(x, y)
    return TaskDataset(*base.tensors, names)


def task_counts(dataset: Dataset) -> dict[str, int]:
    """Samples per task, sorted by name; empty for data without a task column."""
    tasks = getattr(dataset, "tasks", None)
    if tasks is None:
        return {}
    names, counts = np.unique(tasks, return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def task_subset(dataset: Dataset, task: str) -> Subset:
    """The (x, y) rows of one task (its queue: samples are queued per task), read
    through `dataset` (any wrapper that keeps its `tasks`)."""
    tasks = getattr(dataset, "tasks", None)
    if tasks is None:
        raise ValueError("the data has no task column")
    return Subset(dataset, np.flatnonzero(tasks == task).tolist())


@dataclass(frozen=True)
class ReferenceSplit:
    """The reference train/test split and its non-IID shards.

    `slave_indices[i]` holds sorted row numbers into `train_x`; `train_rows`/`test_rows`
    are row numbers into ``load_digits()``, which is what `save` stores.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    slave_indices: list[np.ndarray]
    train_rows: np.ndarray
    test_rows: np.ndarray

    @classmethod
    def from_rows(cls, train_rows: np.ndarray, test_rows: np.ndarray,
                  slave_indices: Sequence[np.ndarray]) -> ReferenceSplit:
        x, y = _digits()
        return cls(train_x=x[train_rows], train_y=y[train_rows], test_x=x[test_rows],
                   test_y=y[test_rows], slave_indices=[np.asarray(s) for s in slave_indices],
                   train_rows=np.asarray(train_rows), test_rows=np.asarray(test_rows))

    @property
    def num_slaves(self) -> int:
        return len(self.slave_indices)

    def slave_dataset(self, i: int) -> TensorDataset:
        rows = self.slave_indices[i]
        return _as_dataset(self.train_x[rows], self.train_y[rows])

    def test_dataset(self) -> TensorDataset:
        return _as_dataset(self.test_x, self.test_y)

    def save(self, path: str | Path) -> None:
        """Write the row indices (not the pixels) to an ``.npz`` file."""
        np.savez(path, train_rows=self.train_rows, test_rows=self.test_rows,
                 slave_rows=np.concatenate(self.slave_indices),
                 slave_sizes=np.array([len(s) for s in self.slave_indices]))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceSplit:
        """Rebuild a split that `save` wrote (the digits come from scikit-learn again)."""
        arrays = _load_npz_arrays(path, ("train_rows", "test_rows", "slave_rows", "slave_sizes"))
        bounds = np.cumsum(arrays["slave_sizes"])[:-1]
        return cls.from_rows(arrays["train_rows"], arrays["test_rows"],
                             np.split(arrays["slave_rows"], bounds))


def dirichlet_partition(labels: np.ndarray, num_parts: int, alpha: float,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Split row numbers into `num_parts` label-skewed shards (Hsu et al. 2019).

    For every class (in sorted order) the class's rows are shuffled and cut in
    proportions drawn from Dirichlet(α·1): small α gives each shard few classes. The
    draw is repeated until no shard is empty. Shards come back sorted.
    """
    for _ in range(_MAX_SPLIT_ATTEMPTS):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            rng.shuffle(rows)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_parts, alpha)))[:-1] * len(rows))
            for shard, part in zip(shards, np.split(rows, cuts.astype(int))):
                shard.append(part)
        merged = [np.sort(np.concatenate(parts)) for parts in shards]
        if all(len(m) for m in merged):
            return merged
    raise ConfigError(f"alpha: {alpha} left a shard empty in {_MAX_SPLIT_ATTEMPTS} draws; "
                      f"use a larger alpha or fewer slaves")


def reference_split(num_slaves: int = DEFAULT_SLAVES, alpha: float = 0.5, seed: int = 0,
                    test_size: float = 0.2, split_seed: int = 0) -> ReferenceSplit:
    """The reference workload: digits, stratified test set, Dirichlet(α) shards.

    `split_seed` is the ``random_state`` of sklearn's ``train_test_split``; `seed` seeds
    ``numpy.random.default_rng`` (a PCG64 Generator, not the legacy RandomState) for
    the shards. Same arguments, same split, on every machine.
    """
    x, y = _digits()
    from sklearn.model_selection import train_test_split  # importable once _digits was

    if isinstance(num_slaves, bool) or not isinstance(num_slaves, int) \
            or not 1 <= num_slaves <= len(y) // 2:
        raise ConfigError(f"num_slaves: expected an int in [1, {len(y) // 2}], got {num_slaves!r}")
    if not alpha > 0:
        raise ConfigError(f"alpha: must be positive, got {alpha!r}")
    if not 0 < test_size < 1:
        raise ConfigError(f"test_size: must be in (0, 1), got {test_size!r}")
    train_rows, test_rows = train_test_split(np.arange(len(y)), test_size=test_size,
                                             stratify=y, random_state=split_seed)
    shards = dirichlet_partition(y[train_rows], num_slaves, alpha, np.random.default_rng(seed))
    return ReferenceSplit.from_rows(train_rows, test_rows, shards)


def _load_npz_arrays(path: str | Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Named arrays (`keys`, and `optional` ones if present) from an ``.npz``, never
    unpickling (object arrays are refused)."""
    if not Path(path).is_file():
        raise ConfigError(f"data source {str(path)!r}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise ConfigError(f"data source {str(path)!r}: missing arrays {missing} "
                                  f"(found {npz.files})")
            return {k: npz[k] for k in (*keys, *optional) if k in npz.files}
    except (OSError, ValueError, EOFError) as exc:  # not a zip, object arrays, truncated
        raise ConfigError(f"data source {str(path)!r}: not a readable .npz file: {exc}") from exc


def _labels(source: str, y: np.ndarray) -> np.ndarray:
    """Integer class ids as int64; the trainer's cross-entropy needs nothing else."""
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise ConfigError(f"data source {source!r}: labels must be integer class ids")


def _features(source: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "iuf" or x.ndim < 2:
        raise ConfigError(f"data source {source!r}: x must be a numeric array with one row "
                          f"per sample, got dtype {x.dtype} and shape {x.shape}")
    return x.astype(np.float32)


def _npz_source(source: str) -> TensorDataset:
    arrays = _load_npz_arrays(source, ("x", "y"), optional=("task",))
    x, y, tasks = arrays["x"], arrays["y"], arrays.get("task")
    if y.ndim != 1 or len(x) != len(y):
        raise ConfigError(f"data source {source!r}: y must be 1-D with one label per row "
                          f"of x (x {x.shape}, y {y.shape})")
    if tasks is None:
        return _as_dataset(_features(source, x), _labels(source, y))
    if tasks.dtype.kind not in "UiuS" or tasks.ndim != 1:
        raise ConfigError(f"data source {source!r}: task must be a 1-D array of task names or numbers")
    if tasks.dtype.kind == "S":
        tasks = tasks.astype(str)
    return task_dataset(_features(source, x), _labels(source, y), tasks)


def _csv_source(source: str, label_column: int | str = -1, delimiter: str = ",") -> TensorDataset:
    if not Path(source).is_file():
        raise ConfigError(f"data source {source!r}: file not found")
    with open(source, newline="") as f:
        rows = [(n, r) for n, r in enumerate(csv.reader(f, delimiter=delimiter), 1) if r]
    header: list[str] | None = None
    if rows:
        try:
            [float(v) for v in rows[0][1]]
        except ValueError:
            header = [h.strip() for h in rows[0][1]]
            rows = rows[1:]
    if not rows:
        raise ConfigError(f"data source {source!r}: no data rows")
    tasks = None
    if header is not None and "task" in header:  # the one text column: each row's task
        col = header.index("task")
        if any(len(r) != len(header) for _, r in rows):
            bad = next(n for n, r in rows if len(r) != len(header))
            raise ConfigError(f"data source {source!r}, line {bad}: {len(header)} fields expected")
        tasks = [r[col].strip() for _, r in rows]
        rows = [(n, r[:col] + r[col + 1:]) for n, r in rows]
        header = header[:col] + header[col + 1:]
    width = len(rows[0][1])
    values = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        try:
            if len(row) != width:
                raise ValueError(f"{len(row)} fields, expected {width}")
            values[i] = [float(v) for v in row]
        except ValueError as exc:
            raise ConfigError(f"data source {source!r}, line {line}: {exc}") from exc
    if isinstance(label_column, str):
        if header is None or label_column not in header:
            raise ConfigError(f"data.label_column: {label_column!r} is not a column of "
                              f"{source!r} (header: {header})")
        label_column = header.index(label_column)
    if isinstance(label_column, bool) or not isinstance(label_column, int) \
            or not -width <= label_column < width or width < 2:
        raise ConfigError(f"data.label_column: {label_column!r} is not a column index of "
                          f"{source!r}, which has {width} columns")
    y = values[:, label_column]
    x = np.delete(values, label_column % width, axis=1)
    if tasks is not None:
        return task_dataset(x.astype(np.float32), _labels(source, y), tasks)
    return _as_dataset(x.astype(np.float32), _labels(source, y))


def _reference_source(source: str, which: str, opts: dict[str, Any]) -> TensorDataset:
    shard, _, count = which.partition("/")
    try:
        num_slaves = int(count) if count else DEFAULT_SLAVES
        index = None if shard == "test" else int(shard)
    except ValueError:
        index = num_slaves = -1
    if index is not None and not 0 <= index < num_slaves:
        raise ConfigError(f"data source {source!r}: expected reference:I, reference:I/N "
                          f"(0 <= I < N) or reference:test")
    allowed = {"alpha", "seed", "test_size", "split_seed"}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ConfigError(f"data.{unknown[0]}: not an option of reference sources "
                          f"(options: {', '.join(sorted(allowed))})")
    split = reference_split(num_slaves=num_slaves, **opts)
    return split.test_dataset() if index is None else split.slave_dataset(index)


def _entry_point(source: str, opts: dict[str, Any]) -> Dataset:
    module_name, _, attr_path = source.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"data source {source!r}: cannot load entry point: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"data source {source!r}: {attr_path} is not callable")
    dataset = target(**opts)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ConfigError(f"data source {source!r}: returned {type(dataset).__name__}, "
                          f"not a map-style Dataset")
    return dataset


def load_local_data(source: str, **opts: Any) -> Dataset:
    """Open a slave's local data source (see the module docstring for the forms)."""
    suffix = Path(source).suffix.lower()
    if source.startswith("reference:"):
        dataset = _reference_source(source, source.removeprefix("reference:"), opts)
    elif suffix in (".npz", ".csv"):
        allowed = {".npz": set(), ".csv": {"label_column", "delimiter"}}[suffix]
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ConfigError(f"data.{unknown[0]}: not an option of {suffix} sources "
                              f"(options: {', '.join(sorted(allowed)) or 'none'})")
        dataset = _npz_source(source) if suffix == ".npz" else _csv_source(source, **opts)
    elif ":" in source:
        dataset = _entry_point(source, opts)
    else:
        raise ConfigError(f"data source {source!r}: expected a .npz or .csv file, "
                          f"module:function or reference:I[/N]")
    if len(dataset) == 0:
        raise ConfigError(f"data source {source!r}: no samples")
    return dataset


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier on a dataset (no gradients).

    The model is put in eval mode (dropout off, BatchNorm running statistics) and its
    previous mode is restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        with torch.no_grad():
            for x, y in DataLoader(dataset, batch_size=batch_size):
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = len(dataset)
    return {"accuracy": correct / n, "loss": loss_sum / n, "samples": n}


def data_misfit(model: nn.Module, dataset: Dataset, task: str | None = None) -> str | None:
    """Why `dataset` (or its rows of `task`) cannot train or evaluate `model` (None if it can).

    Checked before a job relies on the data -- a slave before it confirms, the master
    on its evaluation set at start -- so a mismatch is one line that names it, not a
    traceback in every round: the first samples must go through the model, and every
    label must be a class of its output.
    """
    if task is not None:
        dataset = task_subset(dataset, task)
        if len(dataset) == 0:
            return f"no samples of task {task!r}"
    loader = DataLoader(dataset, batch_size=1024)
    x, _ = next(iter(loader))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x[:8])
    except Exception as exc:  # noqa: BLE001 - any failure here is the mismatch to report
        return f"samples with features of shape {list(x.shape[1:])} do not fit the model: {exc}"
    finally:
        model.train(was_training)
    if logits.ndim != 2:
        return f"the model's output has shape {list(logits.shape)}, not [batch, classes]"
    classes = logits.shape[1]
    low, high = min(int(y.min()) for _, y in loader), max(int(y.max()) for _, y in loader)
    if low < 0 or high >= classes:
        return f"labels {low}..{high} do not fit the model's {classes} classes (0..{classes - 1})"
    return None
