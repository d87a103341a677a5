"""graphc.data: datasets and mini-batching for training graphc models.

A standalone tool layer: it depends only on NumPy and the standard library,
never on the rest of graphc, so it can be used (and tested) on its own.

- :func:`load_digits` — 1797 real handwritten 8x8 digits bundled with the
  package (UCI, CC BY 4.0), with a fixed train/test split; optional 28x28
  MNIST-like upscale.
- :func:`read_idx`, :func:`write_idx`, :func:`load_mnist` — the IDX format of
  MNIST and Fashion-MNIST, raw or gzip.
- :func:`read_cifar10_batch`, :func:`load_cifar10` — CIFAR-10 binary batches.
- :func:`batches`, :class:`DataLoader` — seeded, reproducible mini-batches.

Images are always NCHW; labels are int64. Malformed files raise
:class:`DataFormatError` (a ``ValueError``) naming the file and the problem.
"""

from .cifar import CIFAR10_CLASSES, load_cifar10, read_cifar10_batch
from .digits import digits_split_indices, load_digits
from .idx import DataFormatError, load_mnist, read_idx, write_idx
from .loader import DataLoader, batches

__all__ = [
    "DataFormatError",
    "load_digits",
    "digits_split_indices",
    "read_idx",
    "write_idx",
    "load_mnist",
    "read_cifar10_batch",
    "load_cifar10",
    "CIFAR10_CLASSES",
    "batches",
    "DataLoader",
]
