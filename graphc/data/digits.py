"""The bundled handwritten digits: 1797 real 8x8 images, no download needed.

The data is the UCI "Optical Recognition of Handwritten Digits" test set
(Alpaydin & Kaynak, 1998, CC BY 4.0) in the form scikit-learn distributes it;
see ``files/LICENSE-digits.txt`` for provenance, citation and licenses.
Each 8x8 pixel counts how many of the 16 pixels of a 4x4 block of the original
32x32 bitmap were inked, so values are integers 0..16.

It exists so examples and tests can train on real data (a LeNet-style model
reaches well above chance in seconds) without network access.
"""

from __future__ import annotations

import gzip
import importlib.resources

import numpy as np

from .idx import DataFormatError, check_output_dtype

__all__ = ["load_digits", "digits_split_indices", "DIGITS_COUNT", "DIGITS_TEST_COUNT"]

_FILE = "files/digits.csv.gz"

DIGITS_COUNT = 1797       # images in the file
DIGITS_TEST_COUNT = 360   # size of the fixed test split (about 20%)
_SPLIT_SEED = 0

# Parsed once per process: (pixels uint8 (n, 8, 8), labels int64 (n,)), both
# read-only so no caller can corrupt the cache (callers get copies).
_CACHE: tuple[np.ndarray, np.ndarray] | None = None
# (train indices, test indices), also computed once.
_SPLIT_CACHE: tuple[np.ndarray, np.ndarray] | None = None


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Parse the bundled CSV (64 pixels then the label per row), once."""
    global _CACHE
    if _CACHE is None:
        # importlib.resources rather than __file__, so it also works when the
        # package is installed inside a zip.
        resource = importlib.resources.files(__package__).joinpath(_FILE)
        with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.int64, ndmin=2)
        if table.shape != (DIGITS_COUNT, 65):
            raise DataFormatError(
                f"{_FILE}: expected {DIGITS_COUNT} rows of 65 values, got shape {table.shape}"
            )
        pixels, labels = table[:, :64], table[:, 64]
        if pixels.min() < 0 or pixels.max() > 16 or labels.min() < 0 or labels.max() > 9:
            raise DataFormatError(f"{_FILE}: pixel outside 0..16 or label outside 0..9")
        pixels = pixels.astype(np.uint8).reshape(-1, 8, 8)
        labels = labels.astype(np.int64)
        pixels.setflags(write=False)
        labels.setflags(write=False)
        _CACHE = (pixels, labels)
    return _CACHE


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into the full file) of the fixed ``(train, test)`` split.

    The split is a permutation from ``np.random.default_rng(0)``: its first 360
    entries are the test set, the other 1437 the training set. Each index
    array is sorted, so both splits keep the file's order. Not stratified, but
    every class has 25-45 test images. The split is pinned by the test suite,
    so a NumPy change to the generator's stream would be caught.
    """
    global _SPLIT_CACHE
    if _SPLIT_CACHE is None:
        perm = np.random.default_rng(_SPLIT_SEED).permutation(DIGITS_COUNT)
        test = np.sort(perm[:DIGITS_TEST_COUNT])
        train = np.sort(perm[DIGITS_TEST_COUNT:])
        train.setflags(write=False)
        test.setflags(write=False)
        _SPLIT_CACHE = (train, test)
    return _SPLIT_CACHE[0].copy(), _SPLIT_CACHE[1].copy()


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix M with ``M @ x`` the 1-D bilinear resize of x.

    Pixel centres are aligned (output pixel i samples the input at
    ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the edge), the convention of
    PIL, OpenCV and ``align_corners=False``. Rows sum to 1, so intensities stay
    in range and the image's brightness is kept.
    """
    m = np.zeros((n_out, n_in))
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _upscale_to_28(images: np.ndarray) -> np.ndarray:
    """(n, 8, 8) -> (n, 28, 28): bilinear 8->24, then a 2-pixel zero border.

    This mimics MNIST, whose digits sit in a 20x20 box centred in a 28x28
    frame with an empty margin; a 24x24 digit with a 2-pixel margin keeps the
    factor-3 resize exact and the digit centred, so LeNet-5 shapes work as is.
    """
    m = _bilinear_matrix(8, 24)
    resized = m @ images.astype(np.float64) @ m.T  # separable: rows, then columns
    out = np.zeros((images.shape[0], 28, 28))
    out[:, 2:26, 2:26] = resized
    return out


def load_digits(split: str = "train", size: int = 8, dtype=np.float32, normalize: bool = True):
    """Load the bundled 8x8 handwritten digits.

    Args:
        split: ``"train"`` (1437 images), ``"test"`` (360 images) or ``"all"``
            (1797, in file order). The train/test split is fixed and
            deterministic: see :func:`digits_split_indices`.
        size: 8 for the original images, or 28 for MNIST-sized ones (bilinear
            upscale 8 -> 24, then 2 px of zero padding on every side).
        dtype: dtype of the returned images; must be floating if *normalize*
            or ``size=28``.
        normalize: divide by 16 so pixels lie in [0, 1]; otherwise pixels
            keep the 0..16 scale.

    Returns:
        ``(images, labels)``: images ``(n, 1, size, size)`` (NCHW), labels
        int64 ``(n,)`` with values 0..9. Fresh arrays: safe to modify.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    if isinstance(size, bool) or size not in (8, 28):
        raise ValueError(f"load_digits: size must be 8 or 28, got {size!r}")
    # Interpolated pixels are fractional: an integer dtype would truncate them.
    why = "normalize=True" if normalize else "size=28"
    dt = check_output_dtype("load_digits", dtype, normalize or size == 28, why)

    pixels, labels = _load_raw()
    if split != "all":
        train, test = digits_split_indices()
        idx = train if split == "train" else test
        pixels, labels = pixels[idx], labels[idx]

    images = _upscale_to_28(pixels) if size == 28 else pixels
    images = images[:, None, :, :].astype(dt)
    if normalize:
        images /= np.asarray(16, dtype=dt)
    return images, labels.copy()
