"""Image files to uint8 arrays, without torch: folders, single files and tar archives.

Shared by the CIFAR-10 reader (`exitwise.data`) and `exitwise predict`, which runs an ONNX export
on a machine that may have no torch at all.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo without PIL's per-image Python work: a CIFAR-size JPEG in 8 us instead of 69 (docs/serve.md)
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel: PIL decodes everything
    simplejpeg = None

from .errors import UserError
from .progress import progress_bar

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")


class Files(NamedTuple):
    """The files of a source, by relative POSIX path, and a way to read each."""

    root: Path
    names: list[str]
    read: Callable[[str], bytes]

    def where(self, name: str) -> str:
        return str(self.root / name)


def list_dir(root: Path, max_depth: int = 4) -> Files:
    """Non-hidden files under `root`, at most `max_depth` levels down (enough for top/train/class/file)."""
    names = []
    for folder, dirs, filenames in os.walk(root):
        rel = Path(folder).relative_to(root)
        depth = len(rel.parts) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < max_depth else []
        names += [(rel / f).as_posix() for f in sorted(filenames) if not f.startswith(".")]

    def read(name: str) -> bytes:
        try:
            return (root / name).read_bytes()
        except OSError as e:  # unreadable (permissions), gone since it was listed, a broken link
            raise UserError(f"cannot read {str(root / name)!r}: {e.strerror or e}") from None

    return Files(root, names, read)


def read_tar(path: Path) -> Files:
    """Every regular file of a tar archive, read in one streaming pass (nothing is extracted to disk)."""
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if member.isfile() and not any(p.startswith(".") for p in name.split("/")):
                    contents[name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise UserError(f"cannot read archive {str(path)!r}: {e}") from None
    if not contents:
        raise UserError(f"archive {str(path)!r} is empty")
    return Files(path, list(contents), contents.__getitem__)


def decode_image(data: bytes, where: str, channels: int = 3, image_size: int | None = None,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, channels) uint8 pixels of an encoded image: RGB for 3 channels, grayscale for 1; resized
    (bilinear) to `image_size` squared when given. `size` (H, W): an image of another size is refused as its header
    says, before its pixels are decoded (a file of a few hundred bytes may declare 12000x12000 pixels)."""
    pixels = _plain_jpeg(data, channels, size)
    if pixels is not None and (image_size is None or pixels.shape[:2] == (image_size, image_size)):
        return pixels
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if size is not None and (height, width) != tuple(size):
                pixels = None  # refused below, undecoded
            else:
                converted = image.convert("RGB" if channels == 3 else "L")
                if image_size is not None and converted.size != (image_size, image_size):
                    converted = converted.resize((image_size, image_size), Image.Resampling.BILINEAR)
                pixels = np.asarray(converted)
    except UnidentifiedImageError:
        raise UserError(f"cannot decode image {where}: not an image format PIL reads") from None
    except Exception as e:  # noqa: BLE001  PIL's readers raise what they meet on a malformed file (OSError, ValueError,
        # SyntaxError, a decompression bomb, but also NotImplementedError, AttributeError, ...): the file's fault each
        raise UserError(f"cannot decode image {where}: {str(e) or type(e).__name__}") from None
    if pixels is None:
        raise UserError(f"image {where} is {width}x{height}, but the model takes {size[1]}x{size[0]}")
    return pixels if pixels.ndim == 3 else pixels[..., None]


def _plain_jpeg(data: bytes, channels: int, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """A colour JPEG as RGB (or a grey one as grey) through simplejpeg: the pixels PIL gives (both are
    libjpeg-turbo's; checked equal on all 60,000 CIFAR-10 JPEGs, tests/test_data.py checks a few), for a tenth
    of the time. None where PIL decides: not a JPEG, another colour space or a conversion, over PIL's
    decompression-bomb limit, not of `size` (H, W) where given, or anything simplejpeg refuses (PIL then decodes it
    or gives its own error)."""
    if simplejpeg is None or not simplejpeg.is_jpeg(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (colorspace, channels) not in (("YCbCr", 3), ("Gray", 1)) or height * width > (Image.MAX_IMAGE_PIXELS or 2**62):
            return None
        if size is not None and (height, width) != tuple(size):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "GRAY")
    except ValueError:
        return None


def _sources(paths: Sequence[str | Path]) -> list[tuple[Files, str]]:
    """(files, name) of every image: a folder's or a tar's image files (by suffix, recursively), a file."""
    found = []
    for path in map(Path, paths):
        if path.is_dir() or path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
            files, kind = (list_dir(path, max_depth=16), "folder") if path.is_dir() else (read_tar(path), "archive")
            names = [n for n in (files.names if kind == "folder" else sorted(files.names))
                     if n.lower().endswith(IMAGE_SUFFIXES)]
            if not names:
                raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {kind} {str(path)!r}")
        elif path.is_file():
            files = Files(path.parent, [path.name], lambda name, folder=path.parent: (folder / name).read_bytes())
            names = [path.name]
        else:
            raise UserError(f"no such image, folder or archive: {str(path)!r}")
        found += [(files, name) for name in names]
    return found


def read_images(paths: Sequence[str | Path], shape: Sequence[int], progress: bool = False
                ) -> tuple[list[str], np.ndarray]:
    """Every image named by `paths` (files, folders, .tar.gz/.tgz/.tar) as (names, uint8 (N, H, W, C)).

    `shape` is the (C, H, W) a model takes; an image of another size is refused, never resized, so a
    prediction is never made on an image the model was not built for."""
    c, h, w = shape
    sources = _sources(paths)
    images = np.empty((len(sources), h, w, c), dtype=np.uint8)
    for i, (files, name) in enumerate(progress_bar(sources, desc="reading images", unit="img", enabled=progress,
                                                   leave=False)):
        where = files.where(name)
        try:
            data = files.read(name)
        except OSError as e:
            raise UserError(f"cannot read image {where}: {e.strerror or e}") from None
        images[i] = decode_image(data, where, c, size=(h, w))  # another size refused from its header, undecoded
    return [files.where(name) for files, name in sources], images
