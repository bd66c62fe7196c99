"""Chart images as the student sees them."""

from __future__ import annotations

WHITE = (255, 255, 255)


def to_rgb(image):
    """A PIL image in RGB (itself when it already is); transparent pixels are composited on white (a chart's background), not
    dropped to black as ``convert("RGB")`` does. For every reader of chart images (training, generation,
    ``write``; ingest may use it too)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")
