"""RLE Lossless frames decoded with pylibjpeg-rle's segment decoder: a pydicom decoding plugin.

pylibjpeg-rle's frame decoder (Rust) panics when a segment decodes to more bytes than the image
has pixels: it is raised as ``PanicException`` (so the next decoder is tried), but Rust prints
"thread panicked at src/lib.rs ... index out of bounds" on stderr first, with a 60-line
backtrace when ``RUST_BACKTRACE`` is set, from the worker that decoded it. Such padding is
found in real files (pydicom issue 1438: a segment one byte too long), and mutations make more.
pydicom's own RLE decoder accepts that padding but decodes in pure Python (3-7 times slower on a
1475 x 1475 RGB image, measured here). This plugin decodes each segment with pylibjpeg-rle's
``decode_segment``, which returns every decoded byte without panicking, and lays the frame out
exactly as pydicom's plugin does (planar configuration 1, little endian samples), with pydicom's
rules: the segment count must match, a short segment is an error, trailing padding is dropped.

Registered on pydicom's RLE decoder by ``transforms.transcode`` under :data:`PLUGIN`; it needs
pylibjpeg-rle (the codecs extra), and is unavailable without it.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

#: The plugin's label on pydicom's RLE Lossless decoder.
PLUGIN = "rle-segments"
_RLE_LOSSLESS = "1.2.840.10008.1.2.5"
#: pydicom's plugin contract: what the plugin needs per transfer syntax (pip names).
DECODER_DEPENDENCIES = {_RLE_LOSSLESS: ("pylibjpeg-rle",)}


def is_available(uid: str) -> bool:
    """pydicom's plugin contract: whether this plugin can decode ``uid`` here."""
    if uid != _RLE_LOSSLESS:
        return False
    try:
        from rle.utils import decode_segment  # noqa: F401
    except ImportError:
        return False
    return True


def decode_frame(src: bytes, runner: Any) -> memoryview:
    """Decode one RLE frame (pydicom's ``DecodeRunner`` gives its geometry).

    Returns the frame's bytes (a flat view, which pydicom copies into its array) as pydicom's
    RLE plugin lays them out: each sample's plane in turn (planar configuration 1), each value's
    bytes least significant first.

    Raises:
        ValueError: a header that is not RLE's, a segment count that does not match
            SamplesPerPixel x BitsAllocated / 8, or a segment that decodes to fewer bytes than
            the image has pixels.
        NotImplementedError: BitsAllocated is not a multiple of 8.
    """
    from rle.utils import decode_segment

    rows, columns = int(runner.rows), int(runner.columns)
    samples, bits = int(runner.samples_per_pixel), int(runner.bits_allocated)
    if bits % 8:
        raise NotImplementedError(f"RLE cannot hold {bits} bits allocated")
    if len(src) < 64:
        raise ValueError("the RLE frame is shorter than its 64-byte header")
    count, *offsets = struct.unpack("<16L", src[:64])
    width = bits // 8
    if count != samples * width:
        raise ValueError(
            f"the RLE header gives {count} segments where the image needs {samples * width}"
        )
    bounds = [*offsets[:count], len(src)]
    plane = rows * columns
    big_endian = runner.get_option("rle_segment_order", ">") == ">"
    frame = np.empty((samples, plane, width), dtype=np.uint8)
    for index in range(count):
        start, end = bounds[index], bounds[index + 1]
        if not 64 <= start <= end:
            raise ValueError(f"RLE segment {index + 1} has an offset outside the frame")
        # (an empty segment would panic the Rust decoder: it is short by definition)
        segment = decode_segment(src[start:end]) if end > start else b""
        if len(segment) < plane:
            raise ValueError(
                f"RLE segment {index + 1} decodes to {len(segment)} bytes where the image has "
                f"{plane} pixels"
            )
        sample, byte = divmod(index, width)
        frame[sample, :, width - 1 - byte if big_endian else byte] = np.frombuffer(
            segment, dtype=np.uint8, count=plane
        )
    runner.set_option("planar_configuration", 1)
    return frame.reshape(-1).data
