"""The images of a download shard's tar (webdataset: ``<key>.<ext>`` members), decoded one at
a time in tar order: what every stage that looks at the images reads."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Container, Iterator
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp"}


def read_images(
    tar: Path, skip: Container[str] = frozenset(), only: Container[str] | None = None
) -> Iterator[tuple[str, Image.Image | None, str | None]]:
    """(key, image, None) per image in a download tar, or (key, None, reason) if undecodable.

    Images whose key is in ``skip``, or not in ``only`` when given, are not decoded."""
    with tarfile.open(tar) as t:
        for member in t:
            key, _, ext = member.name.partition(".")
            if ext.lower() not in IMAGE_EXTENSIONS or key in skip:
                continue
            if only is not None and key not in only:
                continue
            data = t.extractfile(member).read()
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except (OSError, Image.DecompressionBombError) as err:
                yield key, None, f"image does not decode: {err}"
                continue
            yield key, image.convert("RGB"), None
