"""Data loading: every CIFAR-10 layout decodes to the same tensors, splits are seeded, decoding is cached,
the download is verified, and every user mistake is one clear UserError."""
import functools
import importlib.util
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exitwise import data
from exitwise.data import CIFAR10_CLASSES, DATASETS, ImageSet, download_cifar10, load_splits
from exitwise.errors import UserError

CIFAR_JPG = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpg.tar.gz"
PER_CLASS = {"train": 2, "test": 1}  # images per class in the generated trees


def random_pixels(n, seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def make_batches(folder: Path, per_batch=3, protocol=pickle.DEFAULT_PROTOCOL):
    """The official python layout: pickled dicts of numpy arrays (N x 3072, CHW rows) and label lists."""
    folder.mkdir(parents=True)
    images, labels = {}, {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        pixels = random_pixels(per_batch, seed=i)
        target = [(i + j) % 10 for j in range(per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": target, b"filenames": [b"x.png"] * per_batch,
                 b"data": pixels.transpose(0, 3, 1, 2).reshape(per_batch, 3072)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        images[name], labels[name] = pixels, target
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072, b"num_cases_per_batch": 3}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    train = [n for n in images if n != "test_batch"]
    return (np.concatenate([images[n] for n in train]), np.concatenate([labels[n] for n in train]),
            images["test_batch"], np.array(labels["test_batch"]))


def make_tree(root: Path, suffix=".png", skip=None, extra=None, size=32):
    """train/<class>/*, test/<class>/* of random images; returns the pixels expected per split (class order)."""
    expected = {}
    for s, (split, n) in enumerate(PER_CLASS.items()):
        pixels = random_pixels(n * 10, seed=100 + s, size=size)
        expected[split] = pixels
        for label, name in enumerate(CIFAR10_CLASSES + ((extra,) if extra else ())):
            if name == skip:
                continue
            (root / split / name).mkdir(parents=True)
            for j in range(n):
                Image.fromarray(pixels[(label % 10) * n + j]).save(root / split / name / f"{j:04d}{suffix}")
    return expected


def make_tar(source: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def load(path, tmp_path, **kwargs):
    return load_splits("cifar10", path, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def canonical(images, labels):
    """(image, label) pairs in a fixed order, to compare sets of images whatever order they come in."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    key = [bytes(img.flatten().numpy()) + bytes([int(lab)]) for img, lab in zip(images, labels)]
    order = sorted(range(len(key)), key=key.__getitem__)
    return images[order], labels[order]


def whole_train(splits):
    """Train and validation put back together (the validation split is a permutation of train)."""
    return canonical(torch.cat([splits.train.images, splits.val.images]),
                     torch.cat([splits.train.labels, splits.val.labels]))


def assert_batches_loaded(splits, expected):
    train_images, train_labels, test_images, test_labels = expected
    assert splits.test.classes == CIFAR10_CLASSES
    assert torch.equal(splits.test.images, torch.from_numpy(test_images))
    assert splits.test.labels.tolist() == test_labels.tolist()
    got, want = whole_train(splits), canonical(train_images, train_labels)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- the supported formats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [4, 5])  # numpy pickles arrays differently from protocol 5 on
def test_python_batches_load_exactly(tmp_path, protocol):
    expected = make_batches(tmp_path / "d" / "cifar-10-batches-py", protocol=protocol)
    for path in (tmp_path / "d", tmp_path / "d" / "cifar-10-batches-py"):  # the folder or its parent
        splits = load(path, tmp_path, val_size=5)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 5, 3)
        assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
        assert_batches_loaded(splits, expected)


def test_image_tree_loads_png_pixels_exactly_with_standard_class_order(tmp_path):
    expected = make_tree(tmp_path / "tree")
    splits = load(tmp_path / "tree", tmp_path, val_size=4)
    assert splits.train.classes == CIFAR10_CLASSES  # "airplane" is 0 and "truck" 9, not alphabetical order
    assert splits.test.labels.tolist() == list(range(10))
    assert torch.equal(splits.test.images, torch.from_numpy(expected["test"]))
    labels = np.repeat(np.arange(10), PER_CLASS["train"])
    got, want = whole_train(splits), canonical(expected["train"], labels)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert splits.source == str((tmp_path / "tree").resolve())


def test_image_tree_of_jpegs_decodes_to_rgb(tmp_path):
    make_tree(tmp_path / "tree", suffix=".jpg")
    Image.new("L", (32, 32), 77).save(tmp_path / "tree/test/cat/0000.jpg")  # grayscale becomes RGB
    splits = load(tmp_path / "tree", tmp_path, val_size=2)
    assert splits.test.images.shape == (10, 32, 32, 3) and splits.test.images.dtype == torch.uint8
    assert (splits.test.images[3].int() - 77).abs().max() <= 2
    assert sorted(whole_train(splits)[1].tolist()) == np.repeat(np.arange(10), 2).tolist()


@pytest.mark.parametrize("arcname, name", [("cifar10", "tree.tar.gz"), (".", "tree.tgz"), ("top", "tree.tar")])
def test_archive_of_an_image_tree_loads_like_the_folder(tmp_path, arcname, name):
    make_tree(tmp_path / "tree")
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz" if name != "tree.tar" else "w") as tar:
        tar.add(tmp_path / "tree", arcname=arcname)
    from_dir, from_tar = load(tmp_path / "tree", tmp_path, val_size=4), load(archive, tmp_path, val_size=4)
    for a, b in [(from_dir.train, from_tar.train), (from_dir.val, from_tar.val), (from_dir.test, from_tar.test)]:
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert from_tar.source == str(archive)


def test_official_archive_layout_loads(tmp_path):
    expected = make_batches(tmp_path / "src" / "cifar-10-batches-py")
    archive = make_tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz",
                       "cifar-10-batches-py")
    assert_batches_loaded(load(archive, tmp_path, val_size=5), expected)
    # a folder holding only the archive (as --download leaves it) reads the archive
    (tmp_path / "dl").mkdir()
    os.replace(archive, tmp_path / "dl" / archive.name)
    splits = load(tmp_path / "dl", tmp_path, val_size=5)
    assert_batches_loaded(splits, expected)
    assert splits.source == str((tmp_path / "dl" / archive.name).resolve())


def test_digits_are_bundled_8x8_grayscale():
    splits = load_splits("digits", split_seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1797 - 720, 360, 360)
    assert splits.test.images.shape == (360, 8, 8, 1) and splits.test.images.dtype == torch.uint8
    assert splits.train.images.max() == 255 and splits.train.classes == tuple("0123456789")
    assert set(splits.test.labels.tolist()) == set(range(10))
    assert len(load_splits("digits", val_size=100).val) == 100
    assert splits.describe().source == "scikit-learn digits"
    with pytest.raises(UserError, match="--image-size takes a positive size and --dataset folder, got 32 for digits"):
        load_splits("digits", image_size=32)  # was 8x8 images, silently
    for given in ({"data_dir": "cifar10-jpg.tar.gz"}, {"download": True}):  # were ignored: digits was studied
        with pytest.raises(UserError, match="digits ships with scikit-learn: it takes no --data-dir or --download"):
            load_splits("digits", **given)


# --- ImageSet and Splits -------------------------------------------------------------------------------------

def test_batches_are_float_nchw_channels_last_in_unit_range():
    images = torch.randint(0, 256, (10, 5, 6, 3), dtype=torch.uint8)
    data_set = ImageSet(images, torch.arange(10), tuple("abcdefghij"))
    got = list(data_set.batches(4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    for i, (x, y) in enumerate(got):
        assert x.dtype == torch.float32 and x.shape == (len(y), 3, 5, 6)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, images[4 * i:4 * i + len(y)].permute(0, 3, 1, 2).float() / 255)
        assert torch.equal(y, torch.arange(4 * i, 4 * i + len(y)))
    picked = data_set.subset(torch.tensor([7, 2]))
    assert len(picked) == 2 and picked.labels.tolist() == [7, 2] and torch.equal(picked.images[1], images[2])
    with pytest.raises(UserError, match="batch size"):
        next(data_set.batches(0))


def test_split_is_seeded_and_test_is_untouched(tmp_path):
    make_batches(tmp_path / "b")
    a, b, c = (load(tmp_path / "b", tmp_path, val_size=5, split_seed=s) for s in (0, 0, 1))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)
    assert torch.equal(whole_train(a)[0], whole_train(c)[0])  # the same images, only split differently
    d1, d2 = load_splits("digits", split_seed=3), load_splits("digits", split_seed=4)
    assert torch.equal(d1.val.images, load_splits("digits", split_seed=3).val.images)
    assert not torch.equal(d1.test.labels, d2.test.labels)


def test_describe_is_json(tmp_path):
    make_batches(tmp_path / "b")
    description = json.loads(json.dumps(load(tmp_path / "b", tmp_path, val_size=5, split_seed=7).describe().to_json()))
    assert description == {"name": "cifar10", "source": str((tmp_path / "b").resolve()),
                           "classes": list(CIFAR10_CLASSES), "sizes": {"train": 10, "val": 5, "test": 3},
                           "split_seed": 7, "val_size": 5}


def test_default_cifar10_validation_is_5000(tmp_path):
    make_batches(tmp_path / "b")
    with pytest.raises(UserError, match="validation size must be between 1 and 15"):
        load(tmp_path / "b", tmp_path)


# --- the cache -----------------------------------------------------------------------------------------------

def test_second_load_reads_the_cache_until_the_source_changes(tmp_path):
    make_tree(tmp_path / "tree")
    archive = make_tar(tmp_path / "tree", tmp_path / "t.tar.gz", "t")
    first = load(archive, tmp_path, val_size=3)
    assert len(list((tmp_path / "cache").glob("cifar10-*/meta.json"))) == 1
    stat = archive.stat()
    archive.write_bytes(b"\xff" * stat.st_size)  # same size and mtime: the cache is trusted, the file not read
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load(archive, tmp_path, val_size=3)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # changed: decoded again, and fails
    with pytest.raises(UserError, match="cannot read archive"):
        load(archive, tmp_path, val_size=3)


def test_a_changed_source_replaces_its_stale_cache_entry(tmp_path):
    make_tree(tmp_path / "tree")
    archive = make_tar(tmp_path / "tree", tmp_path / "t.tar.gz", "t")
    load(archive, tmp_path, val_size=3)
    before = list((tmp_path / "cache").glob("cifar10-*"))
    os.utime(archive, ns=(0, archive.stat().st_mtime_ns + 10**9))
    load(archive, tmp_path, val_size=3)
    after = list((tmp_path / "cache").glob("cifar10-*"))
    assert len(before) == len(after) == 1 and before != after


def test_cache_directory_comes_from_the_environment(tmp_path, monkeypatch):
    make_batches(tmp_path / "b")
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(tmp_path / "env-cache"))
    load_splits("cifar10", tmp_path / "b", val_size=5, progress=False)
    arrays = sorted(p.name for p in (tmp_path / "env-cache").glob("cifar10-*/*"))
    assert arrays == ["meta.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]


def test_cache_lists_and_clears_only_its_decoded_data_sets(tmp_path, monkeypatch, capsys):
    from exitwise.cli import main
    make_batches(tmp_path / "b")
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("EXITWISE_CACHE_DIR", str(cache))
    load_splits("cifar10", tmp_path / "b", val_size=5, progress=False)
    (cache / "notes.txt").write_text("a user's file")
    for users in ("cifar10-jpg", "folder-photos"):  # EXITWISE_CACHE_DIR set to a folder of the user's own data
        (cache / users).mkdir()
        (cache / users / "keep.png").write_bytes(b"")
    assert main(["cache"]) == 0
    listed = capsys.readouterr().out
    assert str(tmp_path / "b") in listed and "cached: 1 decoded data sets" in listed
    assert main(["cache", "--clear"]) == 0
    assert "deleted: 1 decoded data sets" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == ["cifar10-jpg", "folder-photos", "notes.txt"]
    assert (cache / "cifar10-jpg" / "keep.png").is_file()
    load_splits("cifar10", tmp_path / "b", val_size=5, progress=False)  # decoded again
    assert len(list(cache.glob("cifar10-*/meta.json"))) == 1


def test_unwritable_cache_only_warns(tmp_path):
    make_batches(tmp_path / "b")
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        splits = load_splits("cifar10", tmp_path / "b", val_size=5, cache_dir=tmp_path / "file", progress=False)
    assert len(splits.test) == 3


# --- download ------------------------------------------------------------------------------------------------

@pytest.fixture
def served_archive(tmp_path):
    """A small archive in the official format, its file:// URL and MD5."""
    make_batches(tmp_path / "src" / "cifar-10-batches-py")
    (tmp_path / "served").mkdir()
    archive = make_tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "served" / "cifar-10-python.tar.gz",
                       "cifar-10-batches-py")
    return archive.as_uri(), data._file_md5(archive)


def test_download_verifies_and_then_loads(tmp_path, served_archive, capsys, monkeypatch):
    url, md5 = served_archive
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "cifar-10-python.tar.gz").write_bytes(b"a stale partial file")  # replaced
    path = download_cifar10(tmp_path / "dl", url=url, md5=md5)
    assert path == tmp_path / "dl" / "cifar-10-python.tar.gz" and data._file_md5(path) == md5
    assert f"downloading {url}" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "dl").iterdir()] == [path.name]  # no temporary file left
    gone = url.replace("/served/", "/gone/")
    assert download_cifar10(tmp_path / "dl", url=gone, md5=md5, progress=False) == path  # verified: not fetched
    monkeypatch.setattr(data, "download_cifar10", functools.partial(download_cifar10, url=url, md5=md5))
    splits = load_splits("cifar10", tmp_path / "dl", download=True, val_size=5, cache_dir=tmp_path / "c",
                         progress=False)
    assert len(splits.test) == 3 and splits.source == str(path)


def test_download_with_wrong_md5_leaves_nothing(tmp_path, served_archive):
    url, md5 = served_archive
    with pytest.raises(UserError, match="corrupt: MD5"):
        download_cifar10(tmp_path / "dl", url=url, md5="0" * 32, progress=False)
    assert not (tmp_path / "dl").exists()  # the folder it made goes too
    with pytest.raises(UserError, match="cannot download"):
        download_cifar10(tmp_path / "dl", url=url.replace("/served/", "/gone/"), md5=md5, progress=False)
    assert not (tmp_path / "dl").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays, empty as it was
    with pytest.raises(UserError, match="corrupt: MD5"):
        download_cifar10(tmp_path / "mine", url=url, md5="0" * 32, progress=False)
    assert list((tmp_path / "mine").iterdir()) == []


# --- user mistakes -------------------------------------------------------------------------------------------

def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError, match=", ".join(DATASETS)):
        load_splits("imagenet")


def test_cifar10_needs_a_data_dir():
    with pytest.raises(UserError, match="--data-dir"):
        load_splits("cifar10")


def a_missing_path(p):
    return p / "nope"


def an_empty_folder(p):
    (p / "empty").mkdir()
    return p / "empty"


def a_folder_of_other_files(p):
    (p / "x").mkdir()
    (p / "x" / "notes.txt").write_text("hi")
    return p / "x"


def a_zip_file(p):
    (p / "data.zip").write_bytes(b"PK")
    return p / "data.zip"


def a_broken_archive(p):
    (p / "bad.tar.gz").write_bytes(b"not gzip")
    return p / "bad.tar.gz"


@pytest.mark.parametrize("setup, message", [
    (a_missing_path, "does not exist"), (an_empty_folder, "is empty"),
    (a_folder_of_other_files, "no CIFAR-10 data found"), (a_zip_file, "not a data directory or a .tar.gz"),
    (a_broken_archive, "cannot read archive")])
def test_bad_data_dir(tmp_path, setup, message):
    with pytest.raises(UserError, match=message):
        load(setup(tmp_path), tmp_path)


def test_corrupt_image_is_named(tmp_path):
    make_tree(tmp_path / "tree")
    (tmp_path / "tree/train/dog/0001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match=r"cannot decode image .*train/dog/0001\.png"):
        load(tmp_path / "tree", tmp_path)


def test_a_file_that_cannot_be_read_is_named_in_one_line(tmp_path):
    make_tree(tmp_path / "tree")
    (tmp_path / "tree/train/dog/0001.png").unlink()
    (tmp_path / "tree/train/dog/0001.png").symlink_to(tmp_path / "gone.png")  # a broken link: was a traceback
    with pytest.raises(UserError, match=r"cannot read .*train/dog/0001\.png.*No such file"):
        load(tmp_path / "tree", tmp_path)
    from exitwise.images import list_dir
    files = list_dir(tmp_path / "tree")
    with pytest.raises(UserError, match=r"cannot read .*train/dog/0001\.png"):
        files.read("train/dog/0001.png")


def test_missing_and_unknown_class_folders_are_named(tmp_path):
    make_tree(tmp_path / "a", skip="frog")
    with pytest.raises(UserError, match="missing class folder train/frog"):
        load(tmp_path / "a", tmp_path)
    make_tree(tmp_path / "b", extra="unicorn")
    with pytest.raises(UserError, match="unknown class folder train/unicorn"):
        load(tmp_path / "b", tmp_path)


def test_mixed_image_sizes_are_refused(tmp_path):
    make_tree(tmp_path / "tree")
    Image.new("RGB", (16, 16)).save(tmp_path / "tree/train/cat/0000.png")
    with pytest.raises(UserError, match="cat/0000.png is 16x16"):
        load(tmp_path / "tree", tmp_path)


def test_missing_split_is_an_error(tmp_path):
    make_tree(tmp_path / "tree")
    for f in (tmp_path / "tree/test").rglob("*.png"):
        f.unlink()
    with pytest.raises(UserError, match="no test/ split"):
        load(tmp_path / "tree", tmp_path)
    make_batches(tmp_path / "b")
    (tmp_path / "b/test_batch").unlink()
    with pytest.raises(UserError, match="missing test split .* no test_batch"):
        load(tmp_path / "b", tmp_path)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    make_batches(tmp_path / "b")
    marker = tmp_path / "pwned"
    (tmp_path / "b/data_batch_3").write_bytes(pickle.dumps({b"data": Evil(marker), b"labels": [0]}))
    with pytest.raises(UserError, match=r"data_batch_3: refusing to load (posix|nt)\.system"):
        load(tmp_path / "b", tmp_path)
    assert not marker.exists()


def test_a_pickle_that_is_not_a_batch_is_refused(tmp_path):
    make_batches(tmp_path / "b")
    (tmp_path / "b/data_batch_1").write_bytes(pickle.dumps({b"data": [1, 2, 3], b"labels": [0]}))
    with pytest.raises(UserError, match="data_batch_1 is not a CIFAR-10 batch"):
        load(tmp_path / "b", tmp_path)
    (tmp_path / "b/data_batch_1").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read CIFAR-10 batch"):
        load(tmp_path / "b", tmp_path)


def test_digits_validation_size_is_checked():
    with pytest.raises(UserError, match="validation size must be between 1 and 1437"):
        load_splits("digits", val_size=1438)
    assert len(load_splits("digits", val_size=1437).train) == 0


# --- the real data, when ../shared has it ----------------------------------------------------------------------

@pytest.mark.cifar
@pytest.mark.skipif(not CIFAR_JPG.is_file(), reason="../shared/data/cifar10-jpg.tar.gz not present")
def test_real_cifar10_jpeg_archive(tmp_path):
    splits = load_splits("cifar10", CIFAR_JPG, cache_dir=tmp_path / "cache", progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45000, 5000, 10000)
    assert splits.test.labels.bincount().tolist() == [1000] * 10
    assert splits.train.images.shape[1:] == (32, 32, 3) and splits.train.images.dtype == torch.uint8
    assert splits.test.classes == CIFAR10_CLASSES


# --- any image-folder tree (--dataset folder) ------------------------------------------------------------------

def make_folder_tree(root: Path, classes=("cats", "ants", "bees"), sizes=((20, 12), (9, 9))):
    """train/<class>/*, test/<class>/* with images of several sizes; grayscale among them."""
    for split in ("train", "test"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j, size in enumerate(sizes):
                c = 40 * i + j
                Image.new("L" if j else "RGB", size, color=c if j else (c, c, c)).save(root / split / name / f"{j}.png")
    return root


def test_any_image_tree_gets_its_classes_from_the_folder_names_and_a_common_size(tmp_path):
    tree = make_folder_tree(tmp_path / "tree")
    splits = load_splits("folder", tree, cache_dir=tmp_path / "cache", progress=False, image_size=8, val_size=2)
    assert splits.test.classes == ("ants", "bees", "cats")
    assert splits.test.images.shape == (6, 8, 8, 3)
    assert splits.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.test.images[0, 0, 0].tolist() == [40, 40, 40]  # "ants" (the second folder made), RGB, resized
    archive = make_tar(tree, tmp_path / "tree.tar.gz", "tree")
    again = load_splits("folder", archive, cache_dir=tmp_path / "cache", progress=False, image_size=8, val_size=2)
    assert torch.equal(again.test.images, splits.test.images)


def test_an_image_tree_of_several_sizes_needs_image_size(tmp_path):
    tree = make_folder_tree(tmp_path / "tree")
    with pytest.raises(UserError, match="--image-size resizes them"):
        load_splits("folder", tree, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(UserError, match="--image-size takes"):
        load_splits("cifar10", tree, cache_dir=tmp_path / "cache", progress=False, image_size=8)
    with pytest.raises(UserError, match="--image-size 100000: larger than PIL decodes"):  # not 30 GB per image
        load_splits("folder", tree, cache_dir=tmp_path / "cache", progress=False, image_size=100_000)


def test_a_sample_of_splits_is_seeded_and_draws_from_every_split():
    splits = load_splits("digits")
    a, b = splits.sample(50), splits.sample(50)
    assert [len(s) for s in (a.train, a.val, a.test)] == [50, 50, 50]
    assert torch.equal(a.test.images, b.test.images) and not torch.equal(a.test.images, splits.test.images[:50])


@pytest.mark.parametrize("mode, channels, subsampling", [("RGB", 3, 0), ("RGB", 3, 2), ("RGB", 1, 2), ("L", 1, 0),
                                                         ("L", 3, 0), ("CMYK", 3, 0)])
def test_every_jpeg_decodes_to_the_pixels_pil_gives_whichever_decoder_runs(mode, channels, subsampling):
    import io
    from exitwise.images import _plain_jpeg, decode_image
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 4), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode) if mode != "CMYK" else Image.fromarray(pixels, "CMYK")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **({"subsampling": subsampling} if mode != "L" else {}))
    with Image.open(io.BytesIO(buffer.getvalue())) as reference:
        expected = np.asarray(reference.convert("RGB" if channels == 3 else "L"))
    got = decode_image(buffer.getvalue(), "x.jpg", channels)
    fast = _plain_jpeg(buffer.getvalue(), channels) is not None  # simplejpeg for colour as RGB, grey as grey
    has_simplejpeg = importlib.util.find_spec("simplejpeg") is not None  # a core dependency; PIL where it is missing
    assert fast == (has_simplejpeg and (mode, channels) in {("RGB", 3), ("L", 1)})
    assert got.shape == (24, 40, channels) and got.dtype == np.uint8
    assert (got.reshape(expected.shape) == expected).all()


def test_a_truncated_jpeg_is_refused_in_one_line():
    import io
    from exitwise.images import decode_image
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(1, 0)[0]).save(buffer, "JPEG")
    with pytest.raises(UserError, match="cannot decode image cut.jpg"):
        decode_image(buffer.getvalue()[:300], "cut.jpg")


def test_a_decoder_error_without_a_message_is_named_by_its_type(monkeypatch):
    import io
    from exitwise.images import decode_image
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(1, 0)[0]).save(buffer, "PNG")

    def out_of_memory(*args, **kwargs):
        raise MemoryError()  # what PIL's resize of a huge image raises, with no message
    monkeypatch.setattr(Image.Image, "convert", out_of_memory)
    with pytest.raises(UserError, match="cannot decode image x.png: MemoryError$"):
        decode_image(buffer.getvalue(), "x.png")
