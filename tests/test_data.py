"""The synthetic task is reproducible and split; .npz files are validated field by field."""

import numpy as np
import pytest
import torch

from moe_energy.config import ConfigError
from moe_energy.data import load_npz, make_dataset, synthetic


def test_synthetic_is_reproducible_and_shaped():
    x1, y1 = synthetic(500, 784, 10, seed=3)
    x2, y2 = synthetic(500, 784, 10, seed=3)
    x3, _ = synthetic(500, 784, 10, seed=4)
    assert x1.shape == (500, 784) and y1.shape == (500,)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert set(np.unique(y1)) == set(range(10))  # every class occurs


def test_split_is_held_out():
    d = make_dataset(1000, 40, 4, seed=0, test_fraction=0.2)
    assert len(d.x_test) == 200 and len(d.x_train) == 800
    train_rows = {tuple(r) for r in d.x_train[:, :5].tolist()}
    assert not any(tuple(r) in train_rows for r in d.x_test[:, :5].tolist())
    assert d.input_dim == 40 and d.classes == 4
    assert 0.25 <= d.chance_accuracy < 0.6


def test_npz_loader_takes_shape_from_file(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.rand(50, 7).astype(np.float64), y=np.arange(50) % 3)
    d = make_dataset(0, 784, 10, seed=0, test_fraction=0.2, path=str(p))
    assert d.input_dim == 7 and d.classes == 3 and d.x_train.dtype == torch.float32


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"x": np.zeros((4, 2))}, "needs arrays 'x' and 'y'"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, int)}, "x has 4 rows but y has 3"),
        ({"x": np.full((4, 2), np.nan), "y": np.arange(4) % 2}, "NaN or inf"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, "labels must be >= 0"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "integer class labels"),
        ({"x": np.zeros(4), "y": np.zeros(4, int)}, "must be 2-D"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, "at least 2 samples"),
    ],
)
def test_bad_npz(tmp_path, arrays, needle):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ConfigError, match=needle):
        load_npz(p)


def test_missing_and_non_npz(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_npz(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="not a readable .npz"):
        load_npz(junk)


def test_synthetic_task_states_its_held_out_ceiling():
    """The N(0, 0.2) score noise flips ~39 % of the seed task's labels away from the noise-free argmax, which no
    model can predict: held-out accuracy tops out near 61 % (train accuracy of 99.5 % is memorised noise)."""
    from moe_energy.commands.tables import accuracy_lines
    from moe_energy.data import synthetic_with_clean
    from moe_energy.runner.seed import dataset_fields

    x, y, clean = synthetic_with_clean(10_000, 784, 10, seed=0)
    assert np.array_equal(y, synthetic(10_000, 784, 10, seed=0)[1])  # the same task as before
    d = make_dataset(10_000, 784, 10, seed=0, test_fraction=0.2)
    assert d.ceiling_accuracy == pytest.approx(0.609)  # 1,218 of 2,000 held-out labels are the noise-free argmax
    assert d.chance_accuracy == pytest.approx(0.118)
    fields = dataset_fields(d)
    assert fields["ceiling_accuracy"] == d.ceiling_accuracy
    assert accuracy_lines(fields)[0].startswith("held-out accuracy: chance 11.8%, ceiling 60.9%")
    assert clean.shape == y.shape and (clean != y).mean() == pytest.approx(0.39, abs=0.01)


def test_user_data_has_no_ceiling(tmp_path):
    from moe_energy.commands.tables import accuracy_lines
    from moe_energy.runner.seed import dataset_fields

    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.rand(50, 7).astype(np.float32), y=np.arange(50) % 3)
    d = make_dataset(0, 784, 10, seed=0, test_fraction=0.2, path=str(p))
    assert d.ceiling_accuracy is None and accuracy_lines(dataset_fields(d)) == []
