"""The seed's synthetic learnable task, and a loader for a user's own .npz data.

Each class c owns a block of input features; its score is tanh of a weighted sum of that block, plus
0.5 x sigmoid of a small random mix of all features, plus N(0, 0.2) noise; the label is the argmax.
Unlike the seed, accuracy is measured on a held-out split.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .storage.fileio import os_reason


@dataclass
class Dataset:
    x_train: Tensor  # [N_train, d] float32
    y_train: Tensor  # [N_train] int64
    x_test: Tensor  # [N_test, d]
    y_test: Tensor  # [N_test]
    source: str
    num_classes: int | None = None  # declared by the user (--classes); else the largest label + 1
    ceiling_accuracy: float | None = None  # synthetic: the noise-free labels' held-out accuracy (the most a model gets)

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def classes(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def fingerprint(self) -> str:
        """A hash of the data's contents: the ranks of a job (on several machines) must hold the same rows."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of always answering the held-out set's most common label."""
        counts = torch.bincount(self.y_test)
        return float(counts.max()) / len(self.y_test)


def synthetic(samples: int, input_dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's task: x ~ N(0, 1) [N, d]; y [N] in [0, classes)."""
    x, y, _ = synthetic_with_clean(samples, input_dim, classes, seed)
    return x, y


def synthetic_with_clean(samples: int, input_dim: int, classes: int, seed: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``synthetic``'s x and y, and the labels without the N(0, 0.2) score noise: the best any model can do is
    predict those (the noise is independent of x), so their agreement with y is the task's accuracy ceiling."""
    if input_dim < classes:
        raise ConfigError(f"input_dim={input_dim} must be >= classes={classes} for the synthetic task")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, input_dim), dtype=np.float32)
    block = input_dim // classes  # 78 for the seed's 784 / 10
    scores = np.empty((samples, classes), dtype=np.float32)
    mix = rng.standard_normal((input_dim, classes)).astype(np.float32) * 0.01  # small mix of all features
    for c in range(classes):
        w = rng.standard_normal(block).astype(np.float32) / np.sqrt(block)
        scores[:, c] = np.tanh(x[:, c * block : (c + 1) * block] @ w)
    scores += 0.5 / (1.0 + np.exp(-(x @ mix)))
    clean = scores.argmax(axis=1).astype(np.int64)
    scores += rng.normal(0.0, 0.2, size=scores.shape).astype(np.float32)
    return x, scores.argmax(axis=1).astype(np.int64), clean


# More classes than this is a mistake in the labels (ids, hashes), not a classification task.
MAX_CLASSES = 100_000


def load_npz(path: str | Path, classes: int | None = None,
             input_dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` float [N, d] and ``y`` int [N] with labels 0..C-1; every flaw is a one-line ConfigError.

    ``classes``/``input_dim``, when the user gave them too, must agree with the file.
    """
    p = Path(path)
    where = f"--data {p}"
    x, y = _read_arrays(p, where)
    _check_features(x, y, where, input_dim)
    _check_labels(y, where, classes)
    return x.astype(np.float32), y.astype(np.int64)


def _read_arrays(p: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The file's ``x`` and ``y``, or why it is not an .npz holding them."""
    try:
        found = p.is_file()
        what = "is a directory" if p.is_dir() else "no such file"
    except OSError as e:  # a name the OS refuses (too long, say): the user's to fix, not a traceback
        raise ConfigError(f"{where}: cannot use this path ({os_reason(e)}); choose another") from None
    if not found:
        raise ConfigError(f"{where}: {what}; give an .npz with arrays x [N, d] and y [N]")
    npy = ConfigError(f"{where}: a single .npy array, not an .npz archive; save x and y with "
                      "numpy.savez(path, x=x, y=y)")
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise npy
        with z:
            names = set(z.files)
            if not {"x", "y"} <= names:
                raise ConfigError(f"{where}: needs arrays 'x' and 'y', found {sorted(names) or 'none'}")
            return z["x"], z["y"]
    except ConfigError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, KeyError) as e:
        why = ("object arrays need pickle, which is not loaded" if "pickle" in str(e) else
               "corrupt compressed data" if isinstance(e, zlib.error) else type(e).__name__)
        raise ConfigError(f"{where}: not a readable .npz file ({why}); give numeric arrays x [N, d] and y [N]") \
            from None


def _check_features(x: np.ndarray, y: np.ndarray, where: str, input_dim: int | None) -> None:
    if x.ndim != 2 or y.ndim != 1:
        raise ConfigError(f"{where}: x must be 2-D [N, d] and y 1-D [N]; got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ConfigError(f"{where}: x has {len(x)} rows but y has {len(y)}; they must match")
    if len(x) < 2:
        raise ConfigError(f"{where}: needs at least 2 samples, found {len(x)}")
    if x.shape[1] < 1:
        raise ConfigError(f"{where}: x has no feature columns (shape {x.shape}); give x as [N, d] with d >= 1")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ConfigError(f"{where}: x must be real numbers, found dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ConfigError(f"{where}: x contains NaN or inf; clean the features first")
    if x.dtype.itemsize > 4 and np.abs(x).max() > np.finfo(np.float32).max:
        raise ConfigError(f"{where}: x holds values beyond float32's range (|x| > 3.4e38); rescale the features")
    if input_dim is not None and x.shape[1] != input_dim:
        raise ConfigError(f"{where}: x has {x.shape[1]} features but input_dim={input_dim}; drop --input-dim "
                          "(the file then decides) or give the matching file")


def _check_labels(y: np.ndarray, where: str, classes: int | None) -> None:
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{where}: y must be integer class labels, found dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise ConfigError(f"{where}: labels must be >= 0, found {lo}")
    if hi < 1:
        raise ConfigError(f"{where}: needs at least 2 classes, all labels are {hi}")
    if classes is not None and hi >= classes:
        raise ConfigError(f"{where}: label {hi} is out of range for classes={classes}; labels must be 0..{classes - 1}"
                          " (or drop --classes: the file then decides)")
    if hi >= MAX_CLASSES:
        raise ConfigError(f"{where}: label {hi} is out of range; labels must be class indices 0..C-1 with "
                          f"C <= {MAX_CLASSES}")


def make_dataset(
    samples: int, input_dim: int, classes: int, seed: int, test_fraction: float, path: str | None = None,
    declared: dict[str, int] | None = None,
) -> Dataset:
    """Synthetic data (or the user's file), shuffled with ``seed`` and split into train / held-out test.

    With a file, ``declared`` holds the ``classes``/``input_dim`` the user also gave: the file must agree.
    """
    declared = declared or {}
    clean = None
    if path:
        x, y = load_npz(path, declared.get("classes"), declared.get("input_dim"))
        source = f"npz:{path}"
    else:
        x, y, clean = synthetic_with_clean(samples, input_dim, classes, seed)
        source = f"synthetic(seed={seed})"
    order = np.random.default_rng(seed + 1).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    if n_test >= len(x):
        raise ConfigError(f"test_fraction={test_fraction} leaves no training data for {len(x)} samples")
    test, train = order[:n_test], order[n_test:]
    t = torch.from_numpy
    ceiling = None if clean is None else float((clean[test] == y[test]).mean())
    return Dataset(t(x[train]), t(y[train]), t(x[test]), t(y[test]), source,
                   declared.get("classes") if path else None, ceiling)
