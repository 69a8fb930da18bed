"""Pixel-side errors. Messages are one line: '<file>: <problem>'."""

from __future__ import annotations

from fedcore.errors import FedpathError


class WSIError(FedpathError):
    """Bad input at the pixel level (corrupt slide, checksum mismatch, unparsable annotation, ...)."""


class SlideOpenError(WSIError):
    """A slide that cannot be opened or decoded."""


class ChecksumMismatch(WSIError):
    """A file whose sha256 differs from the manifest's."""


class AnnotationError(WSIError):
    """An annotation file that does not parse or cannot be rasterised."""
