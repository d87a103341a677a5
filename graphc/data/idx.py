"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is::

    byte 0, 1   0x00 0x00                magic: two zero bytes
    byte 2      dtype code               0x08 ubyte, 0x09 sbyte, 0x0B int16,
                                         0x0C int32, 0x0D float32, 0x0E float64
    byte 3      ndim
    4 * ndim    dimension sizes          big-endian uint32 each
    rest        the data                 row-major, big-endian

Files may be gzip-compressed (MNIST is distributed that way); compression is
detected from the gzip magic bytes, not the file name, because downloads are
often renamed or decompressed by browsers without renaming.

Every malformed file raises :class:`DataFormatError` naming the file and what
was wrong, so a half-downloaded dataset fails loudly instead of training on
garbage.
"""

from __future__ import annotations

import gzip as _gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DataFormatError", "read_idx", "write_idx", "load_mnist"]


class DataFormatError(ValueError):
    """A data file is malformed (bad header, truncated, trailing bytes, ...)."""


# IDX type code -> big-endian NumPy dtype. One-byte types have no byte order.
_CODE_TO_DTYPE = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Reverse map keyed by (kind, itemsize) so native and big-endian inputs both match.
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}

_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes_maybe_gzip(path: str | os.PathLike) -> bytes:
    """Return the (decompressed) contents of *path*.

    gzip is recognised by its two magic bytes. A corrupt or truncated gzip
    stream becomes a :class:`DataFormatError` naming the file.
    """
    raw = Path(path).read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return _gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt gzip stream ({exc})") from exc


def check_output_dtype(func: str, dtype, need_float: bool, why: str = "normalize=True"):
    """Return ``np.dtype(dtype)``, refusing non-float dtypes when *need_float*.

    Shared by the loaders: scaling (or interpolating) into an integer array
    would silently truncate the pixels.
    """
    dt = np.dtype(dtype)
    if need_float and not np.issubdtype(dt, np.floating):
        raise ValueError(f"{func}: {why} needs a floating dtype, got {dt}")
    return dt


def _native(dtype: np.dtype) -> np.dtype:
    """The same dtype in the machine's byte order (what users expect to get)."""
    return dtype.newbyteorder("=")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a NumPy array.

    Returns a writable array in native byte order with the file's dtype
    (uint8, int8, int16, int32, float32 or float64) and shape.

    Raises :class:`DataFormatError` on a bad magic number, an unknown type
    code, zero dimensions, a truncated header or body, or trailing bytes.
    """
    data = read_bytes_maybe_gzip(path)
    if len(data) < 4:
        raise DataFormatError(
            f"{path}: truncated IDX header: expected at least 4 bytes, got {len(data)}"
        )
    if data[0] != 0 or data[1] != 0:
        raise DataFormatError(
            f"{path}: bad IDX magic: expected first two bytes 0x00 0x00, "
            f"got 0x{data[0]:02x} 0x{data[1]:02x} (not an IDX file?)"
        )
    code, ndim = data[2], data[3]
    if code not in _CODE_TO_DTYPE:
        known = ", ".join(f"0x{c:02X}" for c in _CODE_TO_DTYPE)
        raise DataFormatError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataFormatError(f"{path}: IDX header declares 0 dimensions")

    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataFormatError(
            f"{path}: truncated IDX header: expected {header_len} bytes for "
            f"{ndim} dimensions, got {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if 0 in dims:
        raise DataFormatError(f"{path}: IDX dimension of size 0 in shape {dims}")

    dtype = _CODE_TO_DTYPE[code]
    # Python ints, so a huge (corrupt) header cannot overflow.
    expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
    got = len(data) - header_len
    if got < expected:
        raise DataFormatError(
            f"{path}: truncated IDX data for shape {dims} {dtype.name}: "
            f"expected {expected} bytes, got {got}"
        )
    if got > expected:
        raise DataFormatError(
            f"{path}: trailing garbage after IDX data for shape {dims}: "
            f"expected {expected} bytes, got {got} ({got - expected} extra)"
        )
    # frombuffer over bytes is read-only and may be big-endian; astype gives a
    # fresh, writable, native-order array.
    arr = np.frombuffer(data, dtype=dtype, offset=header_len)
    return arr.astype(_native(dtype)).reshape(dims)


def write_idx(path: str | os.PathLike, array, gzip: bool = False) -> None:
    """Write *array* to *path* as an IDX file, gzip-compressed if *gzip*.

    The array's dtype must be one IDX can hold (uint8, int8, int16, int32,
    float32, float64): nothing is cast silently. Every dimension must be
    non-zero, since :func:`read_idx` rejects empty files.
    """
    arr = np.asarray(array)
    code = _KIND_SIZE_TO_CODE.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise ValueError(
            f"write_idx: dtype {arr.dtype} has no IDX type code; "
            "use uint8, int8, int16, int32, float32 or float64"
        )
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"write_idx: IDX needs 1..255 dimensions, got {arr.ndim}")
    if 0 in arr.shape:
        raise ValueError(f"write_idx: cannot write an empty array of shape {arr.shape}")
    if max(arr.shape) >= 2**32:
        raise ValueError(f"write_idx: dimension too large for IDX in shape {arr.shape}")

    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = np.ascontiguousarray(arr, dtype=_CODE_TO_DTYPE[code]).tobytes()
    payload = header + body
    if gzip:
        # mtime=0 makes the output byte-for-byte reproducible.
        payload = _gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


# Standard MNIST / Fashion-MNIST names. Some mirrors (e.g. Kaggle) use a dot
# before "idx"; accept both, with or without ".gz".
_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _find_mnist_file(directory: Path, prefix: str, kind: str, idx_ndim: int) -> Path:
    candidates = []
    for sep in ("-", "."):
        base = f"{prefix}-{kind}{sep}idx{idx_ndim}-ubyte"
        candidates += [base, base + ".gz"]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no MNIST {kind} file in {directory}; looked for: {', '.join(candidates)}"
    )


def load_mnist(
    path_or_dir: str | os.PathLike,
    split: str = "train",
    normalize: bool = True,
    dtype=np.float32,
):
    """Load MNIST (or Fashion-MNIST, same layout) from a directory of IDX files.

    Looks in *path_or_dir* for ``train-images-idx3-ubyte`` /
    ``train-labels-idx1-ubyte`` (``split="train"``) or ``t10k-...``
    (``split="test"``), each optionally ending in ``.gz``.

    Returns ``(images, labels)``: images shaped ``(n, 1, rows, cols)`` (NCHW,
    28x28 for MNIST) in *dtype*, divided by 255 into [0, 1] when *normalize*;
    labels int64 of shape ``(n,)``. Raises :class:`DataFormatError` if the files
    are malformed or the image and label counts differ.
    """
    if split not in _MNIST_PREFIX:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    dtype = check_output_dtype("load_mnist", dtype, normalize)
    directory = Path(path_or_dir)
    if not directory.is_dir():
        raise NotADirectoryError(f"load_mnist: {directory} is not a directory")
    prefix = _MNIST_PREFIX[split]
    img_path = _find_mnist_file(directory, prefix, "images", 3)
    lbl_path = _find_mnist_file(directory, prefix, "labels", 1)

    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(
            f"{img_path}: expected uint8 images of shape (n, rows, cols), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataFormatError(
            f"{lbl_path}: expected uint8 labels of shape (n,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataFormatError(
            f"MNIST {split} count mismatch: {img_path} has {len(images)} images, "
            f"{lbl_path} has {len(labels)} labels"
        )

    out = images[:, None, :, :].astype(dtype)
    if normalize:
        out /= np.asarray(255, dtype=out.dtype)  # in place: no second full-size copy
    return out, labels.astype(np.int64)
