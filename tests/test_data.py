"""Tests for graphc.data: bundled digits, IDX, CIFAR-10 and batching."""

import ast
import gzip
from pathlib import Path

import numpy as np
import pytest

import graphc.data as gd
from graphc.data import (
    DataFormatError,
    DataLoader,
    batches,
    digits_split_indices,
    load_cifar10,
    load_digits,
    load_mnist,
    read_cifar10_batch,
    read_idx,
    write_idx,
)

# ----------------------------------------------------------------- layering


def test_data_package_imports_nothing_else_from_graphc():
    """graphc.data is a standalone tool layer: only numpy, stdlib, and itself."""
    pkg = Path(gd.__file__).parent
    for src in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{src.name} imports from outside graphc.data"
                if node.level == 0:
                    assert not node.module.startswith("graphc"), src.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("graphc"), src.name
                    assert not alias.name.startswith("sklearn"), src.name


def test_bundled_files_present():
    files = Path(gd.__file__).parent / "files"
    assert (files / "digits.csv.gz").is_file()
    notice = (files / "LICENSE-digits.txt").read_text()
    for needle in ("Alpaydin", "Kaynak", "CC BY 4.0", "BSD 3-Clause", "10.24432/C50P49"):
        assert needle in notice


# ------------------------------------------------------------------- digits

CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_known_facts():
    x, y = load_digits("all", normalize=False)
    assert x.shape == (1797, 1, 8, 8)
    assert np.bincount(y).tolist() == CLASS_COUNTS
    # First row of the UCI file is a 0 whose top row reads 0 0 5 13 9 1 0 0.
    assert y[0] == 0
    assert x[0, 0, 0].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]
    assert x.min() == 0 and x.max() == 16
    assert np.array_equal(x, np.round(x))  # integer counts 0..16


@pytest.mark.parametrize("split, n", [("train", 1437), ("test", 360), ("all", 1797)])
def test_digits_shapes_dtypes_ranges(split, n):
    x, y = load_digits(split)
    assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() == 1.0
    assert y.min() >= 0 and y.max() <= 9
    assert set(y.tolist()) == set(range(10))  # every class in every split


def test_digits_split_disjoint_complete_deterministic():
    train, test = digits_split_indices()
    assert len(train) == 1437 and len(test) == 360
    assert not set(train.tolist()) & set(test.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    # Pinned: a change here (e.g. NumPy's generator stream) would silently
    # change everyone's test set, so it must fail loudly.
    assert test[:10].tolist() == [2, 12, 13, 20, 28, 38, 44, 53, 60, 68]
    assert int(test.sum()) == 339627

    xa, ya = load_digits("all")
    xt, yt = load_digits("test")
    xr, yr = load_digits("train")
    assert np.array_equal(xt, xa[test]) and np.array_equal(yt, ya[test])
    assert np.array_equal(xr, xa[train]) and np.array_equal(yr, ya[train])
    x2, y2 = load_digits("test")
    assert np.array_equal(xt, x2) and np.array_equal(yt, y2)


def test_digits_results_are_independent_copies():
    x, y = load_digits("all")
    x[:] = -1
    y[:] = -1
    x2, y2 = load_digits("all")
    assert x2.min() == 0.0 and y2.min() == 0
    train, _ = digits_split_indices()
    saved = train.copy()
    train[:] = 0
    assert np.array_equal(digits_split_indices()[0], saved)


def test_digits_dtype_and_normalize_options():
    x, _ = load_digits("test", dtype=np.float64)
    assert x.dtype == np.float64
    raw, _ = load_digits("test", normalize=False, dtype=np.uint8)
    assert raw.dtype == np.uint8 and raw.max() == 16
    assert np.allclose(load_digits("test")[0], raw / 16)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")
    with pytest.raises(ValueError, match="size"):
        load_digits(size=32)
    with pytest.raises(ValueError, match="floating"):
        load_digits(dtype=np.int32)
    with pytest.raises(ValueError, match="size=28"):
        load_digits(size=28, normalize=False, dtype=np.uint8)


def test_digits_28_upscale_keeps_the_image():
    x8, y8 = load_digits("all")
    x28, y28 = load_digits("all", size=28)
    assert x28.shape == (1797, 1, 28, 28) and x28.dtype == np.float32
    assert np.array_equal(y8, y28)
    assert x28.min() >= 0.0 and x28.max() <= 1.0
    # MNIST-like empty 2-pixel border.
    border = x28.copy()
    border[:, :, 2:26, 2:26] = 0
    assert not border.any()

    # Downsample the 24x24 interior back to 8x8 by 3x3 block means.
    inner = x28[:, 0, 2:26, 2:26].astype(np.float64)
    back = inner.reshape(-1, 8, 3, 8, 3).mean(axis=(2, 4))
    orig = x8[:, 0].astype(np.float64)
    corr = np.corrcoef(back.ravel(), orig.ravel())[0, 1]
    assert corr > 0.97
    # Total ink is preserved exactly: each input pixel spreads weight 3x3 = 9.
    assert np.allclose(inner.sum(axis=(1, 2)) / 9, orig.sum(axis=(1, 2)), rtol=1e-5)

    # The intensity-weighted centre lands in the same place (in 8-px units).
    def centre(img, offset, scale):
        r = (np.arange(img.shape[-1]) - offset + 0.5) / scale
        w = img.sum(axis=(1, 2))
        return (img.sum(axis=2) @ r) / w, (img.sum(axis=1) @ r) / w

    cr8, cc8 = centre(orig, 0, 1)
    cr28, cc28 = centre(x28[:, 0].astype(np.float64), 2, 3)
    assert np.abs(cr8 - cr28).max() < 0.15 and np.abs(cc8 - cc28).max() < 0.15


# ---------------------------------------------------------------------- IDX

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", IDX_DTYPES)
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, dtype, compress):
    rng = np.random.default_rng(1)
    for shape in [(7,), (3, 4, 5)]:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        else:
            a = (rng.standard_normal(shape) * 1e3).astype(dtype)
        path = tmp_path / f"a{len(shape)}.idx"
        write_idx(path, a, gzip=compress)
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
        b = read_idx(path)
        assert b.dtype == np.dtype(dtype) and b.dtype.isnative
        assert b.shape == shape and np.array_equal(a, b)
        b[...] = 0  # writable


def test_idx_header_bytes_are_big_endian(tmp_path):
    path = tmp_path / "x"
    write_idx(path, np.array([[1, 2, 3]], dtype=np.int16))
    assert path.read_bytes() == bytes.fromhex("00000b02" "00000001" "00000003" "000100020003")


def test_idx_gzip_detected_by_magic_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_raw = tmp_path / "looks-compressed.gz"
    raw_named_plain = tmp_path / "looks-raw-idx1-ubyte"
    write_idx(gz_named_raw, a, gzip=False)
    write_idx(raw_named_plain, a, gzip=True)
    assert np.array_equal(read_idx(gz_named_raw), a)
    assert np.array_equal(read_idx(raw_named_plain), a)


def _good_idx_bytes():
    return bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-2], "expected 6 bytes, got 4"),                # truncated data
        (lambda b: b + b"junk", "expected 6 bytes, got 10"),          # trailing garbage
        (lambda b: b"\x01\x00" + b[2:], "magic"),                     # corrupt magic
        (lambda b: b"PK" + b[2:], "magic"),                           # a zip, say
        (lambda b: b[:2] + b"\x0a" + b[3:], "dtype code 0x0A"),      # unknown dtype
        (lambda b: b[:3] + b"\x00", "0 dimensions"),                  # ndim 0
        (lambda b: b[:4] + bytes(4) + b[8:], "size 0"),               # zero-size dim
        (lambda b: b[:6], "truncated IDX header"),                    # header cut
        (lambda b: b[:2], "truncated IDX header"),
        (lambda b: b"", "truncated IDX header"),
    ],
)
def test_idx_malformed_files_raise(tmp_path, mutate, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(mutate(_good_idx_bytes()))
    with pytest.raises(DataFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_idx_truncated_and_corrupt_gzip(tmp_path):
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(_good_idx_bytes()[:-1]))
    with pytest.raises(DataFormatError, match="expected 6 bytes, got 5") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    whole = gzip.compress(_good_idx_bytes())
    path.write_bytes(whole[: len(whole) // 2])  # cut-off download
    with pytest.raises(DataFormatError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_write_idx_rejects_unrepresentable(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        write_idx(tmp_path / "x", np.zeros((0, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))


def _write_mnist(directory, prefix, n, gz, n_labels=None):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_labels or n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images, gzip=gz)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels, gzip=gz)
    return images, labels


def test_load_mnist(tmp_path):
    tr_img, tr_lbl = _write_mnist(tmp_path, "train", 12, gz=True)
    te_img, te_lbl = _write_mnist(tmp_path, "t10k", 5, gz=False)
    x, y = load_mnist(tmp_path)
    assert x.shape == (12, 1, 28, 28) and x.dtype == np.float32
    assert y.dtype == np.int64 and np.array_equal(y, tr_lbl)
    assert np.allclose(x[:, 0] * 255, tr_img)
    assert 0.0 <= x.min() and x.max() <= 1.0
    x, y = load_mnist(str(tmp_path), split="test", normalize=False, dtype=np.uint8)
    assert x.dtype == np.uint8 and np.array_equal(x[:, 0], te_img)


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    _write_mnist(tmp_path, "train", 6, gz=False, n_labels=5)
    with pytest.raises(DataFormatError, match="6 images.*5 labels"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, split="val")
    with pytest.raises(NotADirectoryError):
        load_mnist(tmp_path / "nope")


# ----------------------------------------------------------------- CIFAR-10


def _cifar_bytes(images_u8, labels):
    recs = np.concatenate([np.asarray(labels, np.uint8)[:, None],
                           images_u8.reshape(len(labels), -1)], axis=1)
    return recs.tobytes()


def test_cifar_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    labels = np.array([0, 9, 3, 7])
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(_cifar_bytes(imgs, labels))
    x, y = read_cifar10_batch(path)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == [0, 9, 3, 7]
    assert np.allclose(x * 255, imgs)
    # Channel-major: the byte right after the label is red pixel (0, 0).
    raw = path.read_bytes()
    assert x[0, 0, 0, 0] * 255 == pytest.approx(raw[1])
    assert x[0, 1, 0, 0] * 255 == pytest.approx(raw[1 + 1024])


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (bytes(3073 + 10), "not a multiple of 3073"),
        (bytes(3072), "not a multiple of 3073"),
        (bytes([10]) + bytes(3072), "label 10"),
    ],
)
def test_cifar_corrupt_files(tmp_path, payload, message):
    path = tmp_path / "test_batch.bin"
    path.write_bytes(payload)
    with pytest.raises(DataFormatError, match=message) as info:
        read_cifar10_batch(path)
    assert str(path) in str(info.value)


def test_load_cifar10(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    rng = np.random.default_rng(4)
    for i in range(1, 6):
        imgs = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
        (root / f"data_batch_{i}.bin").write_bytes(_cifar_bytes(imgs, [i, i]))
    (root / "test_batch.bin").write_bytes(_cifar_bytes(np.zeros((3, 3, 32, 32), np.uint8), [1, 2, 3]))
    x, y = load_cifar10(root)
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    x, y = load_cifar10(tmp_path, split="test")  # the parent folder works too
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [1, 2, 3]
    (root / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4.bin"):
        load_cifar10(root)


# ----------------------------------------------------------------- batching


def test_batches_cover_every_sample_once():
    x = np.arange(23)
    y = x * 10
    for shuffle in (False, True):
        seen = []
        sizes = []
        for bx, by in batches((x, y), 5, shuffle=shuffle, seed=7):
            assert np.array_equal(by, bx * 10)  # aligned
            seen += bx.tolist()
            sizes.append(len(bx))
        assert sorted(seen) == list(range(23))
        assert sizes == [5, 5, 5, 5, 3]
        assert (seen == list(range(23))) == (not shuffle)


def test_batches_seeded_determinism():
    x = np.arange(100)

    def order(**kw):
        return np.concatenate([b for (b,) in batches((x,), 8, **kw)]).tolist()

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)


def test_batches_drop_last():
    x = np.arange(23)
    out = list(batches((x,), 5, shuffle=True, drop_last=True))
    assert [len(b) for (b,) in out] == [5, 5, 5, 5]
    assert len(np.unique(np.concatenate([b for (b,) in out]))) == 20
    assert list(batches((np.arange(3),), 5, drop_last=True)) == []


def test_batches_validation():
    with pytest.raises(ValueError, match=r"\[10, 9\]"):
        batches((np.zeros(10), np.zeros(9)), 2)  # raised eagerly, not at next()
    with pytest.raises(ValueError, match="batch_size"):
        batches((np.zeros(10),), 0)
    with pytest.raises(TypeError, match="batch_size"):
        batches((np.zeros(10),), 2.0)
    with pytest.raises(TypeError, match="tuple"):
        batches(np.zeros(10), 2)
    with pytest.raises(ValueError, match="at least one"):
        batches((), 2)


def test_dataloader_epochs_and_len():
    x = np.arange(10)
    loader = DataLoader((x, -x), batch_size=4, seed=3)
    assert len(loader) == 3
    assert len(DataLoader((x,), 4, drop_last=True)) == 2
    e0 = [b.tolist() for b, _ in loader]
    e1 = [b.tolist() for b, _ in loader]
    assert loader.epoch == 2
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(10))
    assert e0 != e1
    # Epoch k of the loader is exactly batches(..., epoch=k).
    assert e1 == [b.tolist() for b, _ in batches((x, -x), 4, seed=3, epoch=1)]
    loader.set_epoch(0)
    assert [b.tolist() for b, _ in loader] == e0
    with pytest.raises(ValueError, match="same length"):
        DataLoader((x, x[:5]), 2)
