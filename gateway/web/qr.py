"""QR codes as SVG text, drawn here (``qrcode``'s SVG writer, no image library, no service)."""

from __future__ import annotations

import qrcode
import qrcode.image.svg


def svg(data: str) -> str:
    """A QR code of ``data`` as a standalone SVG document (dark modules on white)."""
    qr = qrcode.QRCode(border=2, image_factory=qrcode.image.svg.SvgPathFillImage)
    qr.add_data(data)
    text = qr.make_image().to_string(encoding="unicode")
    assert isinstance(text, str)
    return text
