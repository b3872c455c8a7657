"""Image data sets as uint8 tensors: CIFAR-10 (python batches, image folders, or an archive of either) and
scikit-learn's digits, split into train / validation / test.

Images are decoded once and cached as .npy files, so later runs start in about a second.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .errors import UserError
from .images import ARCHIVE_SUFFIXES, Files, decode_image, list_dir, read_tar
from .io import atomic_write_bytes, atomic_write_json
from .progress import progress_bar
from .refs import DatasetRef, SplitSizes

try:  # numpy >= 2 moved these; both are pure array constructors
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = ("cifar10", "digits", "folder")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_VAL_SIZE = 5000
DIGITS_TEST_SIZE = 360
DIGITS_VAL_SIZE = 360
CACHE_VERSION = 1  # bump when the decoded arrays would change for the same source
FINGERPRINT_CHARS = 24  # hex digits naming a cache entry after its data set: cifar10-0123abcd...
BATCH_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@dataclass(frozen=True)
class ImageSet:
    """Decoded images held as one tensor, with their labels and class names."""

    images: torch.Tensor  # uint8 (N, H, W, C)
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None) -> ImageSet:
        """From uint8 (N, H, W, C) images, or float (N, C, H, W) ones in [0, 1] (quantized to 1/255 steps, as exitwise
        holds images in uint8; normalization belongs in the model), and integer labels (classes: default 0..max)."""
        images, labels = torch.as_tensor(images), torch.as_tensor(labels).long()
        if images.dim() != 4:
            raise UserError(f"images must be (N, H, W, C) uint8 or (N, C, H, W) float, got {tuple(images.shape)}")
        if images.is_floating_point():
            if images.numel() and not (images.min() >= 0 and images.max() <= 1):
                raise UserError("float images must be in [0, 1] (unnormalized; the model normalizes its input)")
            images = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
        elif images.dtype != torch.uint8:
            raise UserError(f"images must be uint8 or float, got {images.dtype}")
        n = int(labels.max()) + 1 if len(labels) else 0
        classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(n))
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise UserError(f"labels must be in 0..{len(classes) - 1}")
        return cls(images.contiguous(), labels, classes)

    @classmethod
    def from_dataset(cls, dataset: torch.utils.data.Dataset, classes: Sequence[str] | None = None) -> ImageSet:
        """From a map-style Dataset of (image, label) pairs: images as (C, H, W) float tensors in [0, 1], (H, W, C)
        uint8 arrays or PIL images (all of one size). `classes` defaults to the dataset's `classes` attribute."""
        images, labels = [], []
        for i in range(len(dataset)):
            image, label = dataset[i]
            if isinstance(image, Image.Image):
                image = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
            images.append(torch.as_tensor(image))
            labels.append(int(label))
        if len({(im.dtype, tuple(im.shape)) for im in images}) > 1:
            raise UserError("the dataset's images differ in size (or type): resize them in the dataset")
        # stacked, they are what from_tensors takes: float (N, C, H, W) checked in [0, 1] and quantized, or uint8
        return cls.from_tensors(torch.stack(images), torch.tensor(labels), classes or getattr(dataset, "classes", None))

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 (B, C, H, W) in [0, 1], channels_last, not normalized; labels) in order; `batch_size` is checked
        at the call, not at the first batch."""
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        return self._batches(batch_size)

    def _batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            # permute of NHWC storage is channels_last already; .float() keeps that layout
            yield self.images[i:i + batch_size].permute(0, 3, 1, 2).float().div_(255), self.labels[i:i + batch_size]


@dataclass(frozen=True)
class Splits:
    """Train / validation / test sets of one data set, and where they came from."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    dataset: str
    source: str
    split_seed: int

    def sample(self, n: int, seed: int = 0) -> Splits:
        """`n` images of each split (fewer if it has fewer), drawn by `seed`: a smoke run on a class-ordered set."""
        train, val, test = (s.subset(_permutation(len(s), seed)[:n]) for s in (self.train, self.val, self.test))
        return Splits(train, val, test, self.dataset, self.source, self.split_seed)

    def describe(self) -> DatasetRef:
        """These splits as a study's results, its logits and a model card record them."""
        return DatasetRef(self.dataset, self.source, tuple(self.test.classes),
                          SplitSizes(len(self.train), len(self.val), len(self.test)), self.split_seed)


def load_splits(dataset: str, data_dir: str | Path | None = None, *, download: bool = False,
                val_size: int | None = None, split_seed: int = 0, cache_dir: str | Path | None = None,
                progress: bool = True, image_size: int | None = None) -> Splits:
    """Load `dataset` and split it: validation is `val_size` images of train chosen by `split_seed`.

    "folder": any image-folder tree train/<class>/*, test/<class>/* (or a .tar.gz of one), classes from the folder
    names in sorted order, images resized to `image_size` squared when given (else they must share one size)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if image_size is not None and (dataset != "folder" or image_size < 1):  # digits too: 8x8, not resized
        raise UserError(f"--image-size takes a positive size and --dataset folder, got {image_size} for {dataset}")
    if dataset == "digits":  # bundled with scikit-learn
        if data_dir is not None or download:
            raise UserError("--dataset digits ships with scikit-learn: it takes no --data-dir or --download")
        return _digits_splits(val_size, split_seed)
    if image_size is not None and image_size ** 2 > (Image.MAX_IMAGE_PIXELS or image_size ** 2):
        raise UserError(f"--image-size {image_size}: larger than PIL decodes any image ({Image.MAX_IMAGE_PIXELS:,} "
                        "pixels)")
    if data_dir is None:
        raise UserError(f"{dataset} needs --data-dir" + (" (add --download to fetch the official archive into it)"
                                                          if dataset == "cifar10" else ""))
    path = download_cifar10(data_dir, progress=progress) if download else Path(data_dir)
    decoded, source = _load_images(path, Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                                   progress, dataset, image_size)
    classes = decoded.classes
    train = ImageSet(torch.from_numpy(decoded.train_images), torch.from_numpy(decoded.train_labels), classes)
    test = ImageSet(torch.from_numpy(decoded.test_images), torch.from_numpy(decoded.test_labels), classes)
    return split_train(train, test, CIFAR10_VAL_SIZE if dataset == "cifar10" else None, val_size, split_seed,
                       dataset, source)


def split_train(train: ImageSet, test: ImageSet, default_val: int | None = None, val_size: int | None = None,
                split_seed: int = 0, dataset: str = "custom", source: str = "python") -> Splits:
    """Splits from a train and a test set: `val_size` train images (default: a tenth) held out by `split_seed`."""
    val_size = val_size if val_size is not None else default_val if default_val is not None else len(train) // 10
    _check_val_size(val_size, len(train))
    perm = _permutation(len(train), split_seed)
    return Splits(train.subset(perm[val_size:]), train.subset(perm[:val_size]), test, dataset, source, split_seed)


def download_cifar10(data_dir: str | Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5,
                     progress: bool = True) -> Path:
    """Fetch the CIFAR-10 archive into `data_dir` unless a verified copy is there; return its path."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--download needs a directory to put the archive in, but {str(data_dir)!r} is a file")
    target = data_dir / Path(urllib.parse.urlparse(url).path).name
    if target.is_file() and _file_md5(target) == md5:
        return target
    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create data directory {str(data_dir)!r}: {e.strerror or e}") from None
    tmp = target.with_name(f".{target.name}.download")
    digest = hashlib.md5(usedforsecurity=False)
    if progress:  # said even where no bar shows (not a terminal): a download is slow
        print(f"downloading {url} to {str(target)!r}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out, \
                progress_bar(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                             desc=f"downloading {target.name}", enabled=progress, file=sys.stderr) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise UserError(f"download of {url} is corrupt: MD5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, target)
    except OSError as e:  # urllib.error.URLError is an OSError
        raise UserError(f"cannot download {url} to {str(data_dir)!r}: {getattr(e, 'reason', None) or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        if created and not target.is_file():  # a failed download leaves no folder it made behind
            shutil.rmtree(data_dir, ignore_errors=True)
    return target


class _Decoded(NamedTuple):
    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def _load_images(path: Path, cache_dir: Path, progress: bool, dataset: str = "cifar10",
                 image_size: int | None = None) -> tuple[_Decoded, str]:
    """Decode CIFAR-10 (or, for "folder", any image tree) found at `path`, reading the cache when unchanged."""
    if not path.exists():
        raise UserError(f"data path {str(path)!r} does not exist")
    path = path.resolve()
    files = None
    if path.is_dir():
        files = list_dir(path)
        if not files.names:
            raise UserError(f"data directory {str(path)!r} is empty")
        if _detect(files.names) is None:
            path, files = _archive_in(files, dataset), None
    elif not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{str(path)!r} is not a data directory or a .tar.gz/.tgz/.tar archive")
    entry = cache_dir / f"{dataset}-{_fingerprint(path, files, image_size)}"
    decoded = _read_cache(entry)
    if decoded is None:
        decoded = _decode(files if files is not None else read_tar(path), progress, dataset, image_size)
        _write_cache(entry, decoded, str(path))
    return decoded, str(path)


def _detect(names: list[str]) -> tuple[str, str] | None:
    """("batches" or "tree", folder prefix) for the shallowest data set among `names`, or None.

    Either sits at the top or in one folder: top/cifar-10-batches-py/, top/train/<class>/ and the like."""
    found = []
    for name in names:
        folder, _, base = name.rpartition("/")
        if (base in BATCH_FILES or base == "batches.meta") and folder.count("/") < 2:
            found.append(("batches", folder + "/" if folder else ""))
        parts = name.split("/")
        if len(parts) in (3, 4) and parts[-3] in ("train", "test"):
            found.append(("tree", parts[0] + "/" if len(parts) == 4 else ""))
    return min(found, key=lambda f: f[1].count("/"), default=None)


def _archive_in(files: Files, dataset: str) -> Path:
    """The one archive lying directly in a folder that holds no unpacked data set (e.g. after --download)."""
    archives = [n for n in files.names if "/" not in n and n.lower().endswith(ARCHIVE_SUFFIXES)]
    if len(archives) == 1:
        return files.root / archives[0]
    if archives:
        raise UserError(f"{str(files.root)!r} holds several archives ({', '.join(archives)}): pass one as --data-dir")
    raise UserError(f"no {_NAMES[dataset]} data found in {str(files.root)!r}: expected {_LAYOUTS[dataset]}, "
                    "or a .tar.gz of it")


_NAMES = {"cifar10": "CIFAR-10", "folder": "image-folder"}
_LAYOUTS = {"cifar10": "cifar-10-batches-py/ or train/<class>/ and test/<class>/ image folders",
            "folder": "train/<class>/ and test/<class>/ image folders"}


def _decode(files: Files, progress: bool, dataset: str = "cifar10", image_size: int | None = None) -> _Decoded:
    kind = _detect(files.names)
    if kind is None or (dataset == "folder" and kind[0] != "tree"):
        raise UserError(f"no {_NAMES[dataset]} data found in {str(files.root)!r}: expected {_LAYOUTS[dataset]}")
    if kind[0] == "batches":
        return _decode_batches(files, kind[1], progress)
    return _decode_tree(files, kind[1], progress, CIFAR10_CLASSES if dataset == "cifar10" else None, image_size)


def _decode_tree(files: Files, prefix: str, progress: bool, classes: tuple[str, ...] | None = CIFAR10_CLASSES,
                 image_size: int | None = None) -> _Decoded:
    """Image folders train/<class>/* and test/<class>/*; labels follow `classes` (None: the train folders' names,
    sorted), images resized to `image_size` squared when given."""
    listing: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in sorted(files.names):
        parts = name[len(prefix):].split("/") if name.startswith(prefix) else []
        if len(parts) == 3 and parts[0] in listing:
            listing[parts[0]].setdefault(parts[1], []).append(name)
    classes = classes or tuple(sorted(listing["train"]))
    for split, folders in listing.items():
        if not folders:
            raise UserError(f"no {split}/ split in {files.where(prefix)!r}: expected {split}/<class>/ image folders")
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise UserError(f"unknown class folder {split}/{unknown[0]} in {files.where(prefix)!r}: "
                            f"expected the classes {', '.join(classes)}")
        missing = [c for c in classes if c not in folders]
        if missing:
            raise UserError(f"missing class folder {split}/{missing[0]} (or it has no images) "
                            f"in {files.where(prefix)!r}")
    total = sum(len(v) for folders in listing.values() for v in folders.values())
    with progress_bar(total=total, desc="decoding images (once)", unit="img", enabled=progress) as bar:
        train, test = (_decode_images(files, listing[split], bar, classes, image_size) for split in ("train", "test"))
    if train[0].shape[1:] != test[0].shape[1:]:
        raise UserError(f"train images are {train[0].shape[2]}x{train[0].shape[1]} but test images are "
                        f"{test[0].shape[2]}x{test[0].shape[1]} in {files.where(prefix)!r}")
    return _Decoded(*train, *test, classes)


def _decode_images(files: Files, folders: dict[str, list[str]], bar: tqdm, classes: tuple[str, ...],
                   image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the images of one split to RGB uint8 into one preallocated array."""
    names = [n for c in classes for n in folders[c]]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(folders[c]) for c in classes])
    images = None
    for i, name in enumerate(names):
        pixels = decode_image(files.read(name), files.where(name), image_size=image_size)
        if images is None:
            images = np.empty((len(names), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != images.shape[1:]:
            raise UserError(f"image {files.where(name)} is {pixels.shape[1]}x{pixels.shape[0]}, "
                            f"but the others are {images.shape[2]}x{images.shape[1]} (--image-size resizes them)")
        images[i] = pixels
        bar.update()
    return images, labels


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches: dicts of numpy arrays, lists and bytes. Any other global is refused,
    so a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # numpy arrays pickled with protocol 5
               ("numpy._core.numeric", "_frombuffer"): _frombuffer,
               ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return self.ALLOWED[module, name]


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a malformed pickle can raise nearly anything
        raise UserError(f"cannot read CIFAR-10 batch {where}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a CIFAR-10 batch (not a dict)")
    return obj


def _decode_batches(files: Files, prefix: str, progress: bool) -> _Decoded:
    """The official python version: data_batch_1..5 (train), test_batch, batches.meta (class names)."""
    names = set(files.names)
    missing = [b for b in BATCH_FILES if prefix + b not in names]
    if missing:
        split = "test" if missing == ["test_batch"] else "train" if "test_batch" not in missing else "train and test"
        raise UserError(f"missing {split} split in {files.where(prefix)!r}: no {', '.join(missing)}")
    classes = CIFAR10_CLASSES
    if prefix + "batches.meta" in names:
        meta = _unpickle(files.read(prefix + "batches.meta"), files.where(prefix + "batches.meta"))
        try:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"])
        except (KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{files.where(prefix + 'batches.meta')} has no valid label_names") from None
    batches = progress_bar(BATCH_FILES, desc="reading cifar10 batches (once)", unit="batch", enabled=progress)
    parts = [_batch(files, prefix + b, len(classes)) for b in batches]
    train = [np.concatenate(x) for x in zip(*parts[:-1])]
    return _Decoded(*train, *parts[-1], classes)


def _batch(files: Files, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    where = files.where(name)
    batch = _unpickle(files.read(name), where)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and labels is not None and len(labels) == len(data)):
        raise UserError(f"{where} is not a CIFAR-10 batch: expected uint8 data of shape (N, 3072) and N labels")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise UserError(f"{where} has labels outside 0..{num_classes - 1}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def default_cache_dir() -> Path:
    if os.environ.get("EXITWISE_CACHE_DIR"):
        return Path(os.environ["EXITWISE_CACHE_DIR"])
    import platformdirs
    return Path(platformdirs.user_cache_dir("exitwise"))


@dataclass(frozen=True)
class CacheEntry:
    """One decoded data set in the cache."""
    path: str
    source: str | None  # what was decoded (None: an unfinished entry)
    bytes: int


def cache_entries(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """The decoded data sets in the cache."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entries = []
    named = "[0-9a-f]" * FINGERPRINT_CHARS  # an entry's own name only: a user's cifar10-jpg/ there is not one
    found = sorted(p for d in ("cifar10", "folder") for p in root.glob(f"{d}-{named}")) if root.is_dir() else []
    for entry in found:
        if not entry.is_dir():
            continue
        try:
            source = json.loads((entry / "meta.json").read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            source = None
        try:
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        except OSError:  # a temporary file renamed while we looked: an entry being written
            size = 0
        entries.append(CacheEntry(str(entry), source, size))
    return entries


def clear_cache(cache_dir: str | Path | None = None) -> list[CacheEntry]:
    """Delete the cache's decoded data sets (its `cifar10-*` and `folder-*` entries); return what was deleted."""
    entries = cache_entries(cache_dir)
    for entry in entries:
        try:
            shutil.rmtree(entry.path)
        except OSError as e:
            raise UserError(f"cannot delete {entry.path!r}: {e.strerror or e}") from None
    return entries


def _fingerprint(path: Path, files: Files | None, image_size: int | None = None) -> str:
    """Hash of what identifies the decoded data: format version, absolute path, sizes and mtimes (and the resize)."""
    try:
        stats = [(name, (path / name).stat()) for name in files.names] if files else [("", path.stat())]
    except OSError as e:  # a broken link among the files
        raise UserError(f"cannot read {e.filename!r}: {e.strerror or e}") from None
    text = json.dumps([CACHE_VERSION, str(path), [(n, s.st_size, s.st_mtime_ns) for n, s in stats]]
                      + ([image_size] if image_size else []))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


_ARRAYS = _Decoded._fields[:4]


def _read_cache(entry: Path) -> _Decoded | None:
    """The decoded arrays stored in `entry`, or None when absent or unreadable."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = [np.load(entry / f"{name}.npy", allow_pickle=False) for name in _ARRAYS]
        return _Decoded(*arrays, tuple(meta["classes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(entry: Path, decoded: _Decoded, source: str) -> None:
    """Store the arrays, then meta.json last: an entry without it is never read. Failure only warns."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            buffer = io.BytesIO()
            np.save(buffer, getattr(decoded, name), allow_pickle=False)
            atomic_write_bytes(entry / f"{name}.npy", buffer.getvalue())
        atomic_write_json(entry / "meta.json", {"version": CACHE_VERSION, "source": source,
                                                "classes": list(decoded.classes)})
        for stale in cache_entries(entry.parent):  # the same source decoded before it changed
            if stale.source == source and stale.path != str(entry):
                shutil.rmtree(stale.path, ignore_errors=True)
    except OSError as e:
        warnings.warn(f"could not cache decoded images in {str(entry)!r}: {e.strerror or e}", stacklevel=3)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _check_val_size(val_size: int, most: int) -> None:
    """The study needs validation images; it does not train, so all of train may become validation."""
    if not 1 <= val_size <= most:
        raise UserError(f"validation size must be between 1 and {most} (the train images), got {val_size}")


def _digits_splits(val_size: int | None, split_seed: int) -> Splits:
    """scikit-learn's 1797 8x8 digits, scaled to 0..255: test 360, validation `val_size` (360), train the rest."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits dataset needs scikit-learn: pip install 'exitwise[demo]'") from None
    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None])
    data = ImageSet(images, torch.from_numpy(digits.target.astype(np.int64)), tuple(str(i) for i in range(10)))
    val_size = DIGITS_VAL_SIZE if val_size is None else val_size
    _check_val_size(val_size, len(data) - DIGITS_TEST_SIZE)
    perm = _permutation(len(data), split_seed)
    test, val, train = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:DIGITS_TEST_SIZE + val_size], \
        perm[DIGITS_TEST_SIZE + val_size:]
    return Splits(data.subset(train), data.subset(val), data.subset(test), "digits", "scikit-learn digits",
                  split_seed)
