"""The HTTP edge of the Serve application: refusing a request with a reason, reading bodies within a cap.

Bodies are read with a size cap before anything parses them; a refusal is an `ApiError`
(status, short code, readable reason) that the app turns into a JSON 4xx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

RAW_CONTENT_TYPES = frozenset({"image/png", "image/jpeg", "image/tiff", "image/bmp",
                               "application/dicom", "application/octet-stream"})


class ApiError(Exception):
    """A request the service refuses: HTTP status, a short error code and a readable reason."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    too_large = ApiError(413, "body_too_large", f"the request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def uploaded_files(request: Request, limit: int, max_files: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each upload, in order: multipart file fields, or one raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
    if content_type in RAW_CONTENT_TYPES:
        return [("body", body)]
    if content_type != "multipart/form-data":
        accepted = ", ".join(sorted(RAW_CONTENT_TYPES | {"multipart/form-data"}))
        raise ApiError(415, "unsupported_content_type",
                       f"content type {content_type or '(none)'!r} is not accepted; send one of: {accepted}")
    try:
        form = await MultiPartParser(request.headers, _once(body), max_files=max_files,
                                     max_part_size=limit).parse()
    except MultiPartException as err:
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {err.message}") from err
    files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
             if not isinstance(value, str)]
    if not files:
        raise ApiError(400, "no_file", "the multipart form holds no file field")
    return files
