"""Reference split, local data sources and evaluation."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fedmq.common import workload
from fedmq.common.errors import ConfigError
from fedmq.common.workload import (
    ReferenceSplit,
    dirichlet_partition,
    evaluate,
    load_local_data,
    reference_split,
)


@pytest.fixture(scope="module")
def split() -> ReferenceSplit:
    return reference_split()


def test_reference_split_shapes_and_scaling(split):
    assert split.train_x.shape == (1437, 64) and split.test_x.shape == (360, 64)
    assert split.train_x.dtype == np.float32 and split.train_y.dtype == np.int64
    assert split.train_x.min() == 0.0 and split.train_x.max() == 1.0
    assert split.num_slaves == 8


def test_test_set_is_stratified(split):
    train_share = np.bincount(split.train_y) / len(split.train_y)
    test_share = np.bincount(split.test_y) / len(split.test_y)
    assert np.abs(train_share - test_share).max() < 0.01


def test_shards_are_disjoint_non_empty_and_cover_all_train_rows(split):
    assert all(len(s) > 0 for s in split.slave_indices)
    everything = np.concatenate(split.slave_indices)
    assert np.array_equal(np.sort(everything), np.arange(len(split.train_y)))


def test_split_is_deterministic_and_seed_dependent(split):
    again = reference_split()
    assert all(np.array_equal(a, b) for a, b in zip(split.slave_indices, again.slave_indices))
    assert np.array_equal(split.test_rows, again.test_rows)
    other = reference_split(seed=1)
    assert not all(np.array_equal(a, b)
                   for a, b in zip(split.slave_indices, other.slave_indices))


def test_shards_are_non_iid(split):
    overall = np.bincount(split.train_y, minlength=10) / len(split.train_y)
    distances = [0.5 * np.abs(np.bincount(split.train_y[s], minlength=10) / len(s)
                              - overall).sum() for s in split.slave_indices]
    assert np.mean(distances) > 0.3  # an IID split of this size is around 0.1


def test_save_and_load_round_trip(split, tmp_path):
    path = tmp_path / "split.npz"
    split.save(path)
    loaded = ReferenceSplit.load(path)
    assert all(np.array_equal(a, b) for a, b in zip(split.slave_indices, loaded.slave_indices))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(split, name), getattr(loaded, name))


def test_slave_and_test_datasets(split):
    x, y = split.slave_dataset(2)[:]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(y) == len(split.slave_indices[2])
    assert len(split.test_dataset()) == 360


def test_dirichlet_gives_up_when_shards_must_stay_empty():
    labels = np.repeat(np.arange(3), 5)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(labels, 20, 0.5, np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, key", [({"num_slaves": 0}, "num_slaves"),
                                         ({"alpha": 0}, "alpha"),
                                         ({"test_size": 1.0}, "test_size")])
def test_reference_split_rejects_bad_arguments(kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        reference_split(**kwargs)


def test_missing_scikit_learn_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedmq\[embedded\]'"):
        reference_split()


def test_reference_sources(split):
    x, y = load_local_data("reference:3")[:]
    assert torch.equal(y, split.slave_dataset(3)[:][1])
    four = reference_split(num_slaves=4)
    assert torch.equal(load_local_data("reference:3/4")[:][0], four.slave_dataset(3)[:][0])
    assert len(load_local_data("reference:test")) == 360
    assert len(load_local_data("reference:0/2", alpha=100.0)) > 500


@pytest.mark.parametrize("source", ["reference:8", "reference:-1/4", "reference:x",
                                    "reference:1/y", "reference:"])
def test_bad_reference_sources(source):
    with pytest.raises(ConfigError, match="reference:I"):
        load_local_data(source)


def test_npz_source(tmp_path):
    path = tmp_path / "local.npz"
    np.savez(path, x=np.arange(12, dtype=np.float64).reshape(4, 3), y=np.array([0, 1, 1, 0]))
    x, y = load_local_data(str(path))[:]
    assert x.dtype == torch.float32 and x.shape == (4, 3)
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 1, 0]


def test_npz_is_loaded_without_pickle(tmp_path, monkeypatch):
    path = tmp_path / "local.npz"
    np.savez(path, x=np.zeros((2, 2)), y=np.zeros(2, dtype=np.int64))
    calls = []
    real_load = np.load
    monkeypatch.setattr(workload.np, "load",
                        lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    load_local_data(str(path))
    assert calls == [{"allow_pickle": False}]


def test_npz_with_object_arrays_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(ConfigError, match="not a readable .npz"):
        load_local_data(str(path))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 2))}, "missing arrays \\['y'\\]"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(2, dtype=int)}, "one label per row"),
    ({"x": np.zeros(3), "y": np.zeros(3, dtype=int)}, "x must be a numeric array"),
    ({"x": np.zeros((2, 2)), "y": np.array([0.5, 1.0])}, "integer class ids"),
])
def test_bad_npz_contents(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=message):
        load_local_data(str(path))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_local_data(str(tmp_path / "nope.npz"))
    with pytest.raises(ConfigError, match="file not found"):
        load_local_data(str(tmp_path / "nope.csv"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable"):
        load_local_data(str(tmp_path / "junk.npz"))


def test_csv_without_header_label_last(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("0.5,1,2\n1.5,2,0\n\n2.5,3,1\n")
    x, y = load_local_data(str(path))[:]
    assert x.tolist() == [[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]] and y.tolist() == [2, 0, 1]


def test_csv_with_header_and_named_or_indexed_label(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("label,a,b\n1,0.1,0.2\n0,0.3,0.4\n")
    for label_column in ("label", 0):
        x, y = load_local_data(str(path), label_column=label_column)[:]
        assert y.tolist() == [1, 0]
        assert torch.allclose(x, torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    semicolons = tmp_path / "s.csv"
    semicolons.write_text("1;2;3\n")
    assert load_local_data(str(semicolons), delimiter=";")[:][1].tolist() == [3]


@pytest.mark.parametrize("text, opts, message", [
    ("1,2,0\n1,2\n", {}, "line 2: 2 fields, expected 3"),
    ("1,2,0\n1,x,1\n", {}, "line 2: could not convert"),
    ("a,b\n", {}, "no data rows"),
    ("1,2,0.5\n", {}, "integer class ids"),
    ("a,b\n1,0\n", {"label_column": "c"}, "data.label_column: 'c' is not a column"),
    ("1,0\n", {"label_column": 2}, "data.label_column: 2 is not a column index"),
    ("1,0\n", {"label_col": 0}, "data.label_col: not an option of .csv"),
])
def test_bad_csv(tmp_path, text, opts, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_local_data(str(path), **opts)


def test_entry_point_source(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset

        class Factory:
            @staticmethod
            def make(n=3):
                return TensorDataset(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))

        def not_a_dataset():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert len(load_local_data("my_data:Factory.make", n=5)) == 5
    with pytest.raises(ConfigError, match="not a map-style Dataset"):
        load_local_data("my_data:not_a_dataset")
    with pytest.raises(ConfigError, match="no samples"):
        load_local_data("my_data:Factory.make", n=0)
    with pytest.raises(ConfigError, match="cannot load entry point"):
        load_local_data("my_data:missing")
    with pytest.raises(ConfigError, match="cannot load entry point"):
        load_local_data("no_such_module_xyz:f")


def test_unknown_source_forms_and_options(tmp_path):
    with pytest.raises(ConfigError, match="expected a .npz or .csv file"):
        load_local_data("data.parquet")
    with pytest.raises(ConfigError, match="data.mmap: not an option of .npz"):
        load_local_data(str(tmp_path / "x.npz"), mmap=True)
    with pytest.raises(ConfigError, match="data.shuffle: not an option of reference"):
        load_local_data("reference:0", shuffle=True)


def test_evaluate_reports_accuracy_and_loss_and_restores_mode():
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(10 * torch.eye(3))
        model.bias.zero_()
    data = torch.utils.data.TensorDataset(torch.eye(3).repeat(2, 1),
                                          torch.tensor([0, 1, 2, 0, 1, 0]))
    model.train()
    result = evaluate(model, data, batch_size=4)
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["samples"] == 6
    expected_loss = torch.nn.functional.cross_entropy(model(data[:][0]), data[:][1])
    assert result["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert model.training
