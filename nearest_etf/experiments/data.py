"""Offline classification data sets as tensors, and loaders for user-supplied image files.

Built in (no download): "mnist1d" (generated locally by the `mnist1d` package's
`make_dataset`, 4000 train / 1000 test signals of length 40), "digits" (scikit-learn's bundled
8x8 digits, 1797 images), "gaussian" (a K-class Gaussian mixture). A directory is read as
MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, optionally ``.gz``) or CIFAR-10 python
batches (``data_batch_1..5``, ``test_batch``, possibly in a ``cifar-10-batches-py`` subfolder).

Inputs are standardised with the training split's statistics (per channel for images).

Files are checked as they are read: a `ValueError` names the file and what is wrong with it
(not the format, truncated, image and label counts that differ, labels that are not 0..K-1 with
every class in the training split). CIFAR-10 batches are pickles, which can reference any Python
callable; they are read with a restricted unpickler (`CifarUnpickler`) that admits only what the
format holds (dicts, lists, bytes, numbers, NumPy arrays and dtypes) and refuses anything else.
"""

from __future__ import annotations

import gzip
import pickle
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

__all__ = [
    "BUILTIN_DATASETS",
    "BalancedBatchSampler",
    "CifarUnpickler",
    "DataSplits",
    "gaussian_mixture",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "load_mnist1d",
    "make_loader",
    "read_idx",
]

BUILTIN_DATASETS = ("mnist1d", "digits", "gaussian")
_TEST_FRACTION = 0.2  # the test share of the randomly split built-in data sets (digits, gaussian)
_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class DataSplits:
    """Train/test tensors: x[N, ...] float32 (images [N, C, H, W], vectors [N, D]), y[N] int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, train: int | None = None, test: int | None = None) -> DataSplits:
        """The first `train` training and `test` test samples (None: all)."""
        return DataSplits(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_test[:test],
            self.y_test[:test],
            self.num_classes,
        )


def _check_labels(source: str, y_train: np.ndarray, y_test: np.ndarray) -> int:
    """K = max label + 1, after checking that the labels are integers 0..K-1 and that every
    class occurs in the training split; `ValueError` naming `source` otherwise."""
    if len(y_train) == 0 or len(y_test) == 0:
        raise ValueError(f"{source}: the training or the test split is empty")
    y_all = np.concatenate([y_train, y_test])
    if not np.issubdtype(y_all.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got {y_all.dtype}")
    if y_all.min() < 0:
        raise ValueError(f"{source}: negative label {y_all.min()}; labels must be 0..K-1")
    classes = int(y_all.max()) + 1
    missing = np.setdiff1d(np.arange(classes), y_train)
    if missing.size:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if missing.size > 5 else "")
        raise ValueError(
            f"{source}: labels run from 0 to {classes - 1} but {missing.size} of these classes "
            f"never occur in the training split ({shown}); labels must be 0..K-1 with every "
            "class present"
        )
    return classes


def _standardised(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    source: str | None = None,
) -> DataSplits:
    """Standardise with the training statistics (per channel for [N, C, H, W]) and wrap; the
    labels are checked (`_check_labels`, errors naming `source`, default `name`)."""
    source = source or name
    for split, x, y in (("training", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise ValueError(f"{source}: {len(x)} {split} inputs but {len(y)} labels")
    classes = _check_labels(source, y_train, y_test)
    axes = (0, 2, 3) if x_train.ndim == 4 else tuple(range(x_train.ndim))
    x_train = x_train.astype(np.float64)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return DataSplits(
        name,
        torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        torch.from_numpy(y_train.astype(np.int64)),
        torch.from_numpy(((x_test.astype(np.float64) - mean) / std).astype(np.float32)),
        torch.from_numpy(y_test.astype(np.int64)),
        classes,
    )


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> DataSplits:
    """MNIST-1D generated locally with `mnist1d.data.make_dataset` (80/20 split; the package's
    default arguments, `num_samples` and `seed` aside). Python's and NumPy's global random states
    are restored afterwards (the package reseeds them)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return _standardised("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"])


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> DataSplits:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    return _standardised(name, x[train], y[train], x[test], y[test])


def load_digits(test_fraction: float = _TEST_FRACTION, seed: int = 0) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1797 x 64, 10 classes), a seeded random split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return _split("digits", bunch.data, bunch.target, test_fraction, seed)


def gaussian_mixture(
    num_classes: int = 10,
    dim: int = 32,
    samples_per_class: int = 200,
    separation: float = 3.0,
    test_fraction: float = _TEST_FRACTION,
    seed: int = 0,
) -> DataSplits:
    """x = separation * m_y + noise, m_k ~ N(0, I/dim) class centres, noise ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim)) / np.sqrt(dim)
    y = np.repeat(np.arange(num_classes), samples_per_class)
    x = separation * np.sqrt(dim) * centres[y] + rng.standard_normal((len(y), dim))
    return _split("gaussian", x, y, test_fraction, seed)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (the MNIST format: 2 zero bytes, a type byte, a dimension count, big-endian
    uint32 sizes, then the data), optionally gzip-compressed. `ValueError` naming the file if
    it is not one (or is truncated)."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: not a complete gzip file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says {shape} ({expected} bytes), file has "
            f"{len(raw) - header} data bytes"
        )
    return np.frombuffer(raw[header:], dtype=dtype).reshape(shape)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (name, name + ".gz", name.replace("-idx", ".idx")):
        if (directory / candidate).is_file():
            return directory / candidate
    return None


def load_idx_dataset(directory: str | Path) -> DataSplits:
    """MNIST or Fashion-MNIST from the four IDX files in `directory`; images [N, 1, 28, 28]."""
    directory = Path(directory)
    arrays, paths = {}, {}
    for key, name in _IDX_NAMES.items():
        path = _find(directory, name)
        if path is None:
            raise FileNotFoundError(f"{directory} has no {name}[.gz] (MNIST IDX layout)")
        arrays[key] = read_idx(path)
        paths[key] = path
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1:
            raise ValueError(
                f"{paths[f'x_{split}']} and {paths[f'y_{split}']}: expected images [N, H, W] "
                f"and labels [N], got shapes {x.shape} and {y.shape}"
            )
        if len(x) != len(y):
            raise ValueError(
                f"{paths[f'x_{split}']} has {len(x)} images but {paths[f'y_{split}']} has "
                f"{len(y)} labels"
            )
    x_train, x_test = (arrays[k][:, None].astype(np.float64) / 255 for k in ("x_train", "x_test"))
    labels = f"{paths['y_train']} / {paths['y_test']}"
    return _standardised(
        directory.name or "idx", x_train, arrays["y_train"], x_test, arrays["y_test"], labels
    )


class CifarUnpickler(pickle.Unpickler):
    """A pickle reader for CIFAR-10 python batches that resolves only NumPy's array and dtype
    reconstructors (the one place the format names a callable); any other global, e.g.
    ``os.system``, is refused with `pickle.UnpicklingError`. Bytes are kept as bytes
    (``encoding="bytes"``, the format's Python 2 strings)."""

    ALLOWED = frozenset(
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    ) | {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                "bytes, numbers and NumPy arrays"
            )
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 3, 32, 32] uint8, labels [N] int64) of one batch file; `ValueError` naming
    the file if it is not a CIFAR-10 python batch."""
    try:
        with path.open("rb") as f:
            batch = CifarUnpickler(f).load()
    except Exception as exc:  # foreign bytes fail in many ways (UnpicklingError, EOFError, ...)
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__})")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise ValueError(
                f"{path}: a CIFAR-10 batch needs the key {key!r}; it has {list(batch)}"
            )
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable data or labels ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1:
        raise ValueError(
            f"{path}: expected data [N, 3072] and labels [N], got {data.shape} and {labels.shape}"
        )
    if len(data) != len(labels):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(directory: str | Path) -> DataSplits:
    """CIFAR-10 python batches (`data_batch_1`..`data_batch_5`, `test_batch`) in `directory` or
    its `cifar-10-batches-py` subfolder; images [N, 3, 32, 32]. (These are pickles: load only
    files you trust.)"""
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    train_files = sorted(directory.glob("data_batch_*"))
    if not train_files or not (directory / "test_batch").is_file():
        raise FileNotFoundError(
            f"{directory} has neither MNIST/Fashion-MNIST IDX files (train-images-idx3-ubyte "
            "...) nor CIFAR-10 python batches (data_batch_*, test_batch)"
        )
    parts = [_cifar_batch(p) for p in train_files]
    x_test, y_test = _cifar_batch(directory / "test_batch")
    x_train = np.concatenate([x for x, _ in parts]).astype(np.float64) / 255
    y_train = np.concatenate([y for _, y in parts])
    x_test = x_test.astype(np.float64) / 255
    return _standardised("cifar10", x_train, y_train, x_test, y_test, f"CIFAR-10 in {directory}")


def load_dataset(name: str, seed: int = 0) -> DataSplits:
    """A built-in data set by name (BUILTIN_DATASETS) or a directory of MNIST/Fashion-MNIST IDX
    files or CIFAR-10 batches. `seed` picks the split of digits and the gaussian mixture."""
    if name == "mnist1d":
        return load_mnist1d()
    if name == "digits":
        return load_digits(seed=seed)
    if name == "gaussian":
        return gaussian_mixture(seed=seed)
    directory = Path(name)
    if not directory.is_dir():
        builtin = ", ".join(BUILTIN_DATASETS)
        if directory.exists():
            problem = f"dataset {name} is a file, not a directory"
        elif "/" in name or "\\" in name or name.startswith("."):
            problem = f"dataset directory {name} does not exist"
        else:
            problem = f"unknown dataset {name!r}"
        raise ValueError(
            f"{problem}: use one of {builtin} or a directory of MNIST/Fashion-MNIST IDX files "
            "or CIFAR-10 python batches"
        )
    if _find(directory, _IDX_NAMES["x_train"]) is not None:
        return load_idx_dataset(directory)
    return load_cifar10(directory)


class BalancedBatchSampler(Sampler[list[int]]):
    """Stratified batches of `batch_size` indices: in each epoch every class's samples are
    shuffled (by `generator`) and spread evenly over the epoch, so every batch holds about
    batch_size * n_k / N samples of class k (n_k of the N samples have label k). The incomplete
    last batch is dropped."""

    def __init__(self, labels: Tensor, batch_size: int, generator: torch.Generator) -> None:
        if len(labels) < batch_size:
            raise ValueError(f"{len(labels)} samples < batch size {batch_size}")
        self.labels = labels.cpu()
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        # sample i of class k at rank r_i in a random order of class k gets the position
        # (r_i + u_i) / n_k in [0, 1) (u_i uniform): sorted by position, the classes interleave
        # in proportion to their sizes
        n = len(self.labels)
        position = torch.empty(n, dtype=torch.float64)
        jitter = torch.rand(n, generator=self.generator, dtype=torch.float64)
        for k in torch.unique(self.labels):
            members = torch.nonzero(self.labels == k).flatten()
            order = members[torch.randperm(len(members), generator=self.generator)]
            rank = torch.arange(len(members), dtype=torch.float64)
            position[order] = (rank + jitter[order]) / len(members)
        order = torch.argsort(position).tolist()
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


def make_loader(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    balanced: bool = False,
) -> DataLoader:
    """A DataLoader over (x, y), shuffled by a generator seeded with `seed` (reproducible).
    With `balanced` (needs `shuffle`; the last incomplete batch is dropped) the batches are
    stratified by class (`BalancedBatchSampler`, from the same generator)."""
    if drop_last and len(x) < batch_size:
        raise ValueError(
            f"{len(x)} samples < batch size {batch_size}: with the incomplete last batch "
            "dropped there is no batch to train on"
        )
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if balanced:
        if generator is None:
            raise ValueError("balanced batches need shuffle=True")
        sampler = BalancedBatchSampler(y, batch_size, generator)
        return DataLoader(TensorDataset(x, y), batch_sampler=sampler, generator=generator)
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
    )
