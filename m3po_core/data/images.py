"""Reading images: a dataset's image reference resolved inside its image root, and an image read by
URL (a local path or any fsspec URL) into RGB, with errors that name the file.

A reference is a path relative to its root. Refused, naming the file and record: an absolute path, a
URL of its own (``s3://``, ``http://``, ``file:``), a ``..`` that climbs out of the root, and, for a
local root, a symlink whose target lies outside it (an image read from outside the root could be
sent to a remote judge). Images over ``MAX_IMAGE_PIXELS`` are refused before they are decoded (a
decompression bomb is a small file that decodes to gigabytes); PIL's own check stays as a backstop.
Limit: symlinks are resolved on local roots only (object stores have none).
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import warnings

from PIL import Image

from m3po_core.errors import InputError
from m3po_core.store import open_url

# 50 megapixels: SA-1B's largest images are ~2250x1500 (3.4 MP), COCO's 640x480; a 7070x7070 image
# decodes to 150 MB of RGB. Refused above this, before decoding.
MAX_IMAGE_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL raises DecompressionBombError at twice this
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def resolve_image_ref(image_root: str, name: object, where: str) -> str:
    """`name` joined to `image_root`, or InputError naming `where` if it would leave the root."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: field 'image' must be a non-empty path, got {name!r}")
    if _SCHEME.match(name) or name.startswith(("/", "\\")) or "\\" in name:
        raise InputError(f"{where}: image {name!r} is not a path relative to the image root {image_root!r} "
                         "(absolute paths, URLs and backslashes are refused)")
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        raise InputError(f"{where}: image {name!r} leads outside the image root {image_root!r}")
    if not image_root:
        return normal
    url = f"{image_root.rstrip('/')}/{normal}"
    if not _SCHEME.match(image_root) or image_root.startswith("file:"):
        root = os.path.realpath(image_root.removeprefix("file://"))
        target = os.path.realpath(url.removeprefix("file://"))
        if os.path.commonpath([root, target]) != root:
            raise InputError(f"{where}: image {name!r} is a link to {target}, outside the image root {root}")
    return url


def load_image(url: str, where: str, sha256: str | None = None) -> Image.Image:
    """Open an image by URL; a missing, undecodable or oversized file is an InputError naming it and
    `where`, and so is one whose bytes no longer have the `sha256` recorded for it (replaced after the
    prompts stage read it: a re-run gives its prompts new keys)."""
    try:
        with open_url(url) as f:
            data = f.read()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise InputError(f"{url}: the image changed after the prompts stage read it ({where}); run again "
                             "to recompute the shards that hold it")
        img = open_unchecked(data)
        check_pixels(img, url, where)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{url}: image file not found ({where})") from None
    except InputError:
        raise
    except Exception as e:  # PIL raises several types for corrupt data
        raise InputError(f"{url}: cannot decode image ({where}): {e}") from None


def open_unchecked(data: bytes) -> Image.Image:
    """Image.open without PIL's DecompressionBombWarning: the size is checked by `check_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def check_pixels(img: Image.Image, url: str, where: str) -> None:
    """Refuse an opened (not yet decoded) image over MAX_IMAGE_PIXELS."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{url}: image of {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS:,} "
                         f"(m3po_core.data.images.MAX_IMAGE_PIXELS; {where})")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
