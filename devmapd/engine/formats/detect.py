"""Recognise what a file is from its first bytes (and, for zips, nothing more here)."""
from __future__ import annotations

import struct

# torch.save's legacy (pre-1.6) stream starts with pickle PROTO 2 and the LONG1 magic number
# 0x1950a86a20f9469cfc6c (torch.serialization.MAGIC_NUMBER).
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
HEAD_BYTES = 512

# Formats we do not serve but can name, so the diagnosis says what the file is.
_FOREIGN = (
    (b"GGUF", "a GGUF file (llama.cpp), not a PyTorch checkpoint"),
    (b"\x93NUMPY", "a NumPy .npy array, not a PyTorch checkpoint"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (e.g. Keras), not a PyTorch checkpoint"),
    (b"\x1f\x8b", "a gzip-compressed file; decompress it first"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file; decompress it first"),
    (b"BZh", "a bzip2-compressed file; decompress it first"),
    (b"\xfd7zXZ\x00", "an xz-compressed file; decompress it first"),
)


def detect(head: bytes, size: int) -> tuple[str, str | None]:
    """Return (kind, description): kind is empty|zip|torch-legacy|safetensors|pickle|tar|foreign|unknown."""
    if size == 0:
        return "empty", None
    if head[:4] in ZIP_MAGICS:
        return "zip", None
    if head.startswith(LEGACY_MAGIC):
        return "torch-legacy", None
    if looks_like_safetensors(head, size):
        return "safetensors", None
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar", "a tar archive (torch.save before 0.4), which weights-only loading cannot read"
    for magic, what in _FOREIGN:
        if head.startswith(magic):
            return "foreign", what
    if head[:1] == b"\x80" and len(head) > 1 and 1 <= head[1] <= 5:
        return "pickle", "a plain Python pickle, not a torch.save checkpoint (invalid magic number)"
    return "unknown", None


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """8-byte little-endian header length, then a JSON object: '{' (after optional spaces)."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2:
        return False
    body = head[8:8 + min(n, len(head) - 8)].lstrip(b" ")
    return body[:1] == b"{"
