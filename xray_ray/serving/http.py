"""The HTTP edge of the Serve application: refusing a request with a reason, reading bodies within caps.

Bodies are read with a size cap before anything parses them, and all the bodies a replica
holds at once share a byte budget (`BodyBudget`), so concurrent uploads cannot pile up in
memory; a refusal is an `ApiError` (status, short code, readable reason) that the app turns
into a JSON 4xx (429 when the replica is full: retry later).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from xray_ray.images.bounds import ImageDecodeError  # noqa: I001
from xray_ray.images.decode import describe_failure

RAW_CONTENT_TYPES = frozenset({"image/png", "image/jpeg", "image/tiff", "image/bmp",
                               "application/dicom", "application/octet-stream"})


class ApiError(Exception):
    """A request the service refuses: HTTP status, a short error code, a readable reason and the headers the
    status calls for (WWW-Authenticate with a 401, Retry-After with a 503)."""

    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason
        self.headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        self.headers.update(headers or {})


class BodyBudget:
    """Bytes of request bodies one replica holds at once; a request that would pass it is refused (429)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    @contextlib.contextmanager
    def request(self) -> Iterator[Share]:
        """One request's share of the budget, given back when the request is done."""
        share = Share(self)
        try:
            yield share
        finally:
            self.used -= share.held


class Share:
    """The bytes one request holds of a `BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.held = budget, 0

    def take(self, size: int) -> None:
        if self.budget.used + size > self.budget.limit:
            raise ApiError(429, "busy", "the service holds as many uploads as its memory budget allows; "
                                        "retry in a moment")
        self.budget.used += size
        self.held += size


def unusable(err: Exception) -> ApiError:
    """The 422 for bytes that failed to decode or preprocess, with `images.decode.describe_failure`'s code:
    the decoder's, or `internal_error:<type>` for anything unexpected (still this image's problem, never a 500).

    The reason of an unexpected error is a fixed sentence: its message is not the image's, and a client sees
    only reasons that `ImageDecodeError` vouches carry no internal or patient details.
    """
    code, reason = describe_failure(err)
    return ApiError(422, code, reason if isinstance(err, ImageDecodeError) else
                    "the image could not be decoded or preprocessed")


async def read_body(request: Request, limit: int, share: Share) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed), or with
    429 when the replica's body budget cannot hold it (every byte read is taken from `share`)."""
    too_large = ApiError(413, "body_too_large", f"the request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise too_large
        share.take(len(chunk))
        body += chunk
    return bytes(body)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def uploaded_files(request: Request, limit: int, max_files: int, share: Share) -> list[tuple[str, bytes]]:
    """(name, bytes) of each upload, in order: multipart file fields, or one raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit, share)
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
    except Exception as err:  # whatever else a hostile body makes the parser raise is still a bad body
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed ({type(err).__name__})") from err
    files = [(value.filename or key, await value.read()) for key, value in form.multi_items()
             if not isinstance(value, str)]
    if not files:
        raise ApiError(400, "no_file", "the multipart form holds no file field")
    return files


def wants_dicom(request: Request) -> bool:
    """True when the client's Accept header asks for `application/dicom` (a DICOM SR instead of JSON), with a
    quality above 0 and at least that of `application/json`."""
    quality = {}
    for item in request.headers.get("accept", "").split(","):
        kind, *params = (part.strip().lower() for part in item.split(";"))
        q = next((value for name, _, value in (p.partition("=") for p in params) if name.strip() == "q"), "1")
        try:
            quality[kind] = max(quality.get(kind, 0.0), float(q))
        except ValueError:
            continue
    return quality.get("application/dicom", 0.0) > 0 and quality["application/dicom"] >= quality.get(
        "application/json", 0.0)

