"""Reading the CIFAR-10 binary batches (``cifar-10-batches-bin``).

Each batch file is a flat sequence of 3073-byte records::

    1 byte      label 0..9
    3072 bytes  pixels: 1024 red, then 1024 green, then 1024 blue, each a
                32x32 image in row-major order

so a record reshapes directly to channel-major (3, 32, 32), i.e. NCHW with no
transpose. There is no header, so the only structural checks possible are the
file size and the label range; both are enforced because a truncated download
would otherwise shift every later record by a few bytes and go unnoticed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .idx import DataFormatError, check_output_dtype, read_bytes_maybe_gzip

__all__ = ["read_cifar10_batch", "load_cifar10", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

_PIXELS = 3 * 32 * 32
_RECORD = 1 + _PIXELS  # 3073


def read_cifar10_batch(path: str | os.PathLike, normalize: bool = True, dtype=np.float32):
    """Read one CIFAR-10 binary batch file (raw, or gzip by magic bytes).

    Returns ``(images, labels)``: images ``(n, 3, 32, 32)`` in *dtype*, divided
    by 255 into [0, 1] when *normalize*; labels int64 ``(n,)``.

    Raises :class:`DataFormatError` if the file is empty, its size is not a
    multiple of 3073 bytes, or a label is greater than 9.
    """
    dtype = check_output_dtype("read_cifar10_batch", dtype, normalize)
    data = read_bytes_maybe_gzip(path)
    if len(data) == 0:
        raise DataFormatError(f"{path}: empty CIFAR-10 batch file")
    if len(data) % _RECORD:
        n_full, rest = divmod(len(data), _RECORD)
        raise DataFormatError(
            f"{path}: CIFAR-10 batch size {len(data)} bytes is not a multiple of "
            f"{_RECORD} (1 label + {_PIXELS} pixel bytes per record): "
            f"{n_full} whole records and {rest} stray bytes"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(
            f"{path}: record {i} has label {labels[i]}, expected 0..9 "
            f"({bad.size} bad labels in all)"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).astype(dtype)
    if normalize:
        images /= np.asarray(255, dtype=images.dtype)
    return images, labels.astype(np.int64)


_SPLIT_FILES = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}


def load_cifar10(directory: str | os.PathLike, split: str = "train",
                 normalize: bool = True, dtype=np.float32):
    """Load the CIFAR-10 training (batches 1-5) or test split from *directory*.

    *directory* is the extracted ``cifar-10-batches-bin`` folder, or its parent
    (the folder the ``.tar.gz`` was extracted into). Returns ``(images, labels)``
    as :func:`read_cifar10_batch` does, concatenated in file order.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"load_cifar10: split must be 'train' or 'test', got {split!r}")
    root = Path(directory)
    names = _SPLIT_FILES[split]
    # Accept the parent folder too: users often point at where they untarred.
    if not (root / names[0]).is_file() and (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"load_cifar10: missing in {root}: {', '.join(missing)}")

    parts = [read_cifar10_batch(root / n, normalize=normalize, dtype=dtype) for n in names]
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
