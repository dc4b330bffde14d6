"""Images at the edge: what a chat message's images must be before a job carries them.

Each image is checked where it is named (`generation.messages[0].images[1]`): its size, its format by
its first bytes (PNG, JPEG or WebP, whatever `mime_type` claims), its dimensions from its header, and
that Pillow decodes it whole; then the request's image count and total. A job carries an image as
`{"data": <base64>, "mime_type"}` in its message (JSON in Redis); the replica feeds it through the
checkpoint's vision tower (`workers/images.py`). Pillow is imported only when a request has images.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Sequence
from typing import Any

from blockpress.runtime.config import RuntimeSettings
from blockpress.runtime.contracts.errors import InvalidArgument

__all__ = ["MIME_TYPES", "check_images", "sniff"]

MIME_TYPES = ("image/png", "image/jpeg", "image/webp")


def sniff(data: bytes) -> str | None:
    """The image format of `data` by its magic bytes, as a MIME type; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_images(messages: Sequence[Any], where: str, settings: RuntimeSettings) -> list[list[dict[str, str]]]:
    """Every message's images checked, as the job carries them (one list per message).

    Args:
        messages: the request's messages, each with `images` of `data` (bytes) and `mime_type`.
        where: the task's field (`generation`, `agent`).
        settings: the gateway's limits.

    Raises:
        InvalidArgument: naming the image, or the messages for the count and the total.
    """
    out: list[list[dict[str, str]]] = []
    count = total = 0
    for i, message in enumerate(messages):
        carried = []
        for j, image in enumerate(message.images):
            field = f"{where}.messages[{i}].images[{j}]"
            if where == "agent":
                raise InvalidArgument(field, "agent tasks take text; send images in a generation's messages")
            if message.role != "user":
                raise InvalidArgument(field, f"images go in user messages, not in a {message.role!r} message")
            count += 1
            total += len(image.data)
            carried.append(_checked(image.data, image.mime_type, field, settings))
        out.append(carried)
    if count > settings.max_images:
        raise InvalidArgument(f"{where}.messages", f"has {count} images, limit {settings.max_images}")
    if total > settings.max_images_bytes:
        raise InvalidArgument(
            f"{where}.messages", f"has {total} bytes of images, more than the limit of {settings.max_images_bytes}"
        )
    return out


def _checked(data: bytes, mime_type: str, field: str, settings: RuntimeSettings) -> dict[str, str]:
    if not data:
        raise InvalidArgument(f"{field}.data", "is empty; send the image file's bytes")
    if len(data) > settings.max_image_bytes:
        raise InvalidArgument(
            f"{field}.data", f"is {len(data)} bytes, more than the limit of {settings.max_image_bytes}"
        )
    found = sniff(data)
    if found is None:
        raise InvalidArgument(f"{field}.data", "is not a PNG, JPEG or WebP image (by its first bytes)")
    if mime_type and mime_type.lower() not in MIME_TYPES:
        raise InvalidArgument(f"{field}.mime_type", f"{mime_type!r} is not one of {', '.join(MIME_TYPES)}")
    if mime_type and mime_type.lower() != found:
        raise InvalidArgument(f"{field}.mime_type", f"says {mime_type!r} but the bytes are {found}")
    _decodes(data, field, settings)
    return {"data": base64.b64encode(data).decode("ascii"), "mime_type": found}


def _decodes(data: bytes, field: str, settings: RuntimeSettings) -> None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # The pixel limit below is ours; Pillow's own bomb warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > settings.max_image_pixels:
                    raise InvalidArgument(
                        f"{field}.data",
                        f"is {width}x{height} pixels, more than the limit of {settings.max_image_pixels} pixels",
                    )
                image.load()
    except InvalidArgument:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidArgument(f"{field}.data", f"does not decode as an image ({exc})") from None
