"""Reading images by URL (a local path or any fsspec URL) into RGB, with errors that name the file.

Limit: a reference is read as given; nothing here confines it to an image root.
"""
from __future__ import annotations

import io

from PIL import Image

from m3po_core.errors import InputError
from m3po_core.store import open_url


def load_image(url: str, where: str) -> Image.Image:
    """Open an image by URL; a missing or undecodable file is an InputError naming it and `where`."""
    try:
        with open_url(url) as f:
            img = Image.open(io.BytesIO(f.read()))
            img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{url}: image file not found ({where})") from None
    except Exception as e:  # PIL raises several types for corrupt data
        raise InputError(f"{url}: cannot decode image ({where}): {e}") from None


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
