"""The scoring job's PACS client over DICOMweb: QIDO-RS finds a night's instances, WADO-RS fetches one instance's
DICOM file, STOW-RS stores results. Failures are `PacsError`s with a short `code`, one error row per instance.

`DICOMwebClient.retrieve_instance` raised `InvalidDicomError` against Orthanc 1.10.1 + DICOMweb 1.7 although the
multipart answer was well formed: Orthanc stores and returns the bytes it was sent, and instances stored with
`store_instances` lack the 128-byte preamble and "DICM" (it encodes with pydicom 3's `dcmwrite`, which writes them
only when asked), so the client's `dcmread` refused them. Here WADO-RS returns the part's bytes unparsed (the
decoder reads preamble-less DICOM) and `store` sends only Part-10 files, so such instances are not made.
"""

from __future__ import annotations

import base64
import email.parser
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

import requests
from dicomweb_client import DICOMwebClient

from xray_ray.config_services import is_date_range
from xray_ray.images.decode import looks_like_dicom
from xray_ray.images.dicom_results import MANUFACTURER as RESULTS_MANUFACTURER
from xray_ray.loopback import is_loopback_host

SKIP_CODES = frozenset({"not_radiograph", "not_chest", "lateral_view", "other_view"})
"""Codes `SelectionRules.skip_reason` gives an instance left out; the ledger commits them as `skipped` rows."""
LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"})
VIEW_POSITION, BODY_PART, MODALITY, MANUFACTURER_TAG = "00185101", "00180015", "00080060", "00080070"
STUDY_UID, SERIES_UID, SOP_UID, STUDY_DATE = "0020000D", "0020000E", "00080018", "00080020"
INSTANCE_FIELDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "StudyDate", "Modality", "BodyPartExamined",
                   "ViewPosition", "Manufacturer"]
"""What the instance search asks for: where each instance is, and what the selection rules judge."""
FRAMING_BYTES = 64 * 1024  # room for the multipart boundary and part headers around an instance's bytes
_INSTANCE_URL = re.compile(r"^https?://.+/studies/([0-9.]{1,64})/series/([0-9.]{1,64})/instances/([0-9.]{1,64})$")


class PacsError(Exception):
    """A PACS request that failed: `code` names the failure for reports and error rows, the message says why."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class PacsUnreachable(PacsError):
    """The PACS did not answer at all: connection refused, DNS, TLS, time-out."""


@dataclass(frozen=True)
class SelectionRules:
    """Which instances a run scores; values compare case-insensitively, '' stands for an absent attribute."""

    modalities: tuple = ("CR", "DX", "DR")
    body_parts: tuple = ("CHEST", "")
    view_positions: tuple = ("PA", "AP", "")

    def skip_reason(self, modality: str, body_part: str, view: str | None = None) -> str:
        """Why an instance is left out (one of SKIP_CODES), or '' when it is scored; `view` None judges the series
        attributes only."""
        def allowed(value: str, choices: tuple) -> bool:
            return value.strip().upper() in {choice.strip().upper() for choice in choices}

        if not allowed(modality, self.modalities):
            return "not_radiograph"
        if not allowed(body_part, self.body_parts):
            return "not_chest"
        if view is None or allowed(view, self.view_positions):
            return ""
        return "lateral_view" if view.strip().upper() in LATERAL_VIEWS else "other_view"


@dataclass(frozen=True)
class Candidate:
    """One instance QIDO-RS found, with the attributes the rules judged and why it is skipped ('' if selected)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    view_position: str
    study_date: str
    skip_reason: str


def instance_url(url: str, candidate: Candidate) -> str:
    """The WADO-RS URL of a candidate under the DICOMweb root `url`: the path of its row in the scoring job."""
    return (f"{url.rstrip('/')}/studies/{candidate.study_uid}/series/{candidate.series_uid}"
            f"/instances/{candidate.sop_uid}")


def parse_instance_url(text: str) -> tuple[str, str, str]:
    """(study, series, SOP instance UID) of an `instance_url`; ValueError for anything else."""
    match = _INSTANCE_URL.match(text)
    if not match:
        raise ValueError(f"not a DICOMweb instance URL: {text!r}")
    return match.group(1), match.group(2), match.group(3)


def instance_sop(path: str) -> str:
    """The SOP Instance UID of a row's path when it is an `instance_url`, else '' (an archive file)."""
    match = _INSTANCE_URL.match(path)
    return match.group(3) if match else ""


def read_credentials(path: str) -> dict[str, str]:
    """The Authorization header a credentials file gives: JSON {"basic": {"user": U, "password": P}} or
    {"bearer": TOKEN}. Like ssh, a file that its group or others may read or write is refused."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if mode & 0o077:
                raise PacsError(f"credentials file {path} is open to others (mode {mode & 0o777:04o}): "
                                "chmod 600 it", "bad_credentials")
            data = json.loads(file.read())
    except OSError as err:
        raise PacsError(f"cannot read credentials file {path}: {err.strerror}", "bad_credentials") from None
    except ValueError:
        raise PacsError(f"credentials file {path} is not JSON", "bad_credentials") from None
    data = data if isinstance(data, dict) else {}
    basic = data.get("basic") if isinstance(data.get("basic"), dict) else {}
    if isinstance(data.get("bearer"), str) and data["bearer"]:
        return {"Authorization": f"Bearer {data['bearer']}"}
    if isinstance(basic.get("user"), str) and isinstance(basic.get("password"), str):
        token = base64.b64encode(f"{basic['user']}:{basic['password']}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    raise PacsError(f'credentials file {path} holds neither {{"basic": {{"user": ..., "password": ...}}}} '
                    'nor {"bearer": TOKEN}', "bad_credentials")


def _date_range(study_date: str) -> str:
    """`study_date` checked: YYYYMMDD or YYYYMMDD-YYYYMMDD, real dates, in order."""
    if not is_date_range(study_date):
        raise ValueError(f"study date {study_date!r} is neither YYYYMMDD nor a range YYYYMMDD-YYYYMMDD")
    return study_date


def _value(item: dict, tag: str) -> str:
    """The first value of `tag` in a DICOM JSON object, as stripped text ('' when absent)."""
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0]).strip()


def _failure(err: Exception, what: str) -> PacsError:
    """The PacsError for a failed request (`what` names it)."""
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status, reason = err.response.status_code, err.response.reason
        why = {401: ": the PACS refused the credentials", 403: ": the credentials do not give access"}.get(status, "")
        return PacsError(f"{what}: HTTP {status} {reason}{why}", "pacs_not_found" if status == 404 else "pacs_refused")
    if isinstance(err, requests.Timeout):
        return PacsUnreachable(f"{what}: no answer in time ({err.__class__.__name__})", "pacs_timeout")
    if isinstance(err, requests.exceptions.SSLError):
        return PacsUnreachable(f"{what}: TLS failed ({err})", "pacs_unreachable")
    if isinstance(err, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
        why = cause[1] if cause else type(err).__name__
        return PacsUnreachable(f"{what}: cannot connect or connection lost ({why})", "pacs_unreachable")
    return PacsError(f"{what}: {err.__class__.__name__}: {err}", "pacs_refused")


@contextmanager
def _failures(what: str) -> Iterator[None]:
    """Requests failures (and unreadable answers) inside become `_failure`s of `what`."""
    try:
        yield
    except (requests.RequestException, ValueError) as err:
        raise _failure(err, what) from None


class PacsClient:
    """A DICOMweb PACS at `url` (its root, e.g. https://pacs/dicom-web). It holds only its settings when pickled
    into Ray tasks; the HTTP session is built (and the credentials file read) on first use in each process."""

    def __init__(self, url: str, credentials_file: str | None = None, verify_tls: bool = True,
                 timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.credentials_file = credentials_file
        self.verify_tls = verify_tls
        self.timeout_s = timeout_s

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("session", "client")}

    @cached_property
    def session(self) -> requests.Session:
        """The HTTP session, carrying the credentials; refused over plain http to a host other than loopback."""
        session = requests.Session()
        session.verify = self.verify_tls
        if self.credentials_file:
            parts = urlsplit(self.url)
            if parts.scheme != "https" and not is_loopback_host(parts.hostname or ""):
                raise PacsError(f"credentials would cross the network in clear text to {self.url}: use https",
                                "bad_credentials")
            session.headers.update(read_credentials(self.credentials_file))
        return session

    @cached_property
    def client(self) -> DICOMwebClient:
        """dicomweb-client over `session`, for the QIDO-RS searches and WADO-RS metadata. It tries a request that
        failed to connect or was answered 408, 429, 503 or 504 up to 3 times, 1 s then 2 s apart (its own default,
        5 times over 30 s, held a run 30 s before it could say that the PACS is down)."""
        client = DICOMwebClient(self.url, session=self.session, timeout=self.timeout_s)
        client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)
        return client

    def check(self) -> None:
        """One cheap search proving the PACS answers and takes the credentials; PacsUnreachable if it does not
        answer, PacsError if it refuses."""
        with _failures(f"PACS {self.url}"):
            self.client.search_for_studies(limit=1)

    def find_instances(self, study_date: str, rules: SelectionRules) -> Iterator[Candidate]:
        """Every instance of the studies of `study_date` (YYYYMMDD or YYYYMMDD-YYYYMMDD), judged by `rules`.

        One QIDO-RS search over all instances of those dates, asking for the attributes the rules judge (0.24 s
        for 200 studies on Orthanc, against 2.8 s walking study, series and instances); a PACS that refuses a
        search at its root is walked study by study instead. A series whose answers lack an attribute the rules
        need (QIDO need not return it) costs one WADO-RS metadata request. The series of results this project
        stored (its Manufacturer) are passed over: they are answers, not images."""
        dates = _date_range(study_date)
        try:
            with _failures(f"QIDO-RS search of {self.url}"):
                found = self.client.search_for_instances(search_filters={"StudyDate": dates}, fields=INSTANCE_FIELDS,
                                                         get_remaining=True)
        except PacsError as err:
            if err.code != "pacs_refused":
                raise
            found = self._study_by_study(dates)
        series: dict[tuple[str, str], list[dict]] = {}
        for item in found:
            series.setdefault((_value(item, STUDY_UID), _value(item, SERIES_UID)), []).append(item)
        for (study_uid, series_uid), items in series.items():
            if _value(items[0], MANUFACTURER_TAG) == RESULTS_MANUFACTURER:  # results stored by an earlier night
                continue
            if any(tag not in item for item in items for tag in (MODALITY, BODY_PART, VIEW_POSITION)):
                with _failures(f"WADO-RS metadata of series {series_uid}"):
                    items = self.client.retrieve_series_metadata(study_uid, series_uid)
            for item in items:
                modality, body_part, view = (_value(item, tag) for tag in (MODALITY, BODY_PART, VIEW_POSITION))
                yield Candidate(study_uid, series_uid, _value(item, SOP_UID), _value(item, "00080016"), modality,
                                body_part, view, _value(item, STUDY_DATE),
                                rules.skip_reason(modality, body_part, view))

    def _study_by_study(self, dates: str) -> Iterator[dict]:
        """The instances of the studies of `dates`, searched study by study (each with its attributes)."""
        with _failures(f"QIDO-RS search of {self.url}"):
            for study in self.client.search_for_studies(search_filters={"StudyDate": dates}, fields=["StudyDate"],
                                                        get_remaining=True):
                yield from ({**study, **item} for item in self.client.search_for_instances(
                    _value(study, STUDY_UID), fields=INSTANCE_FIELDS, get_remaining=True))

    def search_instances(self, study_uid: str, modality: str) -> list[tuple[str, str]]:
        """(Series, SOP Instance UID) of the study's instances of `modality` (e.g. SR: the results stored there)."""
        with _failures(f"QIDO-RS search of study {study_uid}"):
            found = self.client.search_for_instances(study_uid, search_filters={"Modality": modality},
                                                     get_remaining=True)
        return [(_value(item, "0020000E"), _value(item, "00080018")) for item in found]

    def retrieve(self, study: str, series: str, sop: str, max_bytes: int) -> bytes:
        """The instance's DICOM file as the PACS holds it (WADO-RS, any transfer syntax), refused above
        `max_bytes` ('file_too_large') or past `timeout_s` ('pacs_timeout') while it is read."""
        url = f"{self.url}/studies/{study}/series/{series}/instances/{sop}"
        what = f"WADO-RS retrieval of instance {sop}"
        limit, deadline = max_bytes + FRAMING_BYTES, time.monotonic() + self.timeout_s
        headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
                   "Accept-Encoding": "identity"}
        with _failures(what), self.session.get(url, headers=headers, stream=True, timeout=self.timeout_s) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_content(chunk_size=1 << 20):
                body += chunk
                if len(body) > limit:
                    raise PacsError(f"{what}: larger than {max_bytes} bytes", "file_too_large")
                if time.monotonic() > deadline:
                    raise PacsUnreachable(f"{what}: not read in {self.timeout_s:g} s", "pacs_timeout")
        data = _single_part(response.headers.get("Content-Type", ""), bytes(body), what)
        if len(data) > max_bytes:
            raise PacsError(f"{what}: larger than {max_bytes} bytes", "file_too_large")
        return data

    def store(self, datasets_bytes: list[bytes]) -> list[str]:
        """One STOW-RS request (to /studies: each file goes to the study it names) of DICOM Part-10 files; returns
        the SOP Instance UIDs the PACS stored. PacsError('store_refused') with the PACS's answer when it refuses any;
        ValueError for a file that is not Part-10 (no preamble and "DICM"), never sent. A SOP Instance UID stored
        again is one instance still: Orthanc answers success and keeps the first copy (OverwriteInstances false, its
        default) or replaces it (true)."""
        if not all(looks_like_dicom(data) for data in datasets_bytes):
            raise ValueError("not a DICOM Part-10 file (no preamble and DICM): write it with enforce_file_format=True")
        boundary = uuid.uuid4().hex.encode()
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary, data)
                        for data in datasets_bytes) + b"--%s--\r\n" % boundary
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary.decode()}',
                   "Accept": "application/dicom+json"}
        with _failures("STOW-RS"):
            response = self.session.post(f"{self.url}/studies", data=body, headers=headers, timeout=self.timeout_s)
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            answer = {}
        failed = [f"{_value(item, '00081155')}: reason 0x{int(_value(item, '00081197') or 0):04X}"
                  for item in answer.get("00081198", {}).get("Value", [])]
        if response.status_code >= 300 or failed:
            raise PacsError(f"STOW-RS: HTTP {response.status_code} {response.reason}"
                            + (f", failed {'; '.join(failed)}" if failed else ""), "store_refused")
        return [_value(item, "00081155") for item in answer.get("00081199", {}).get("Value", [])]


def _single_part(content_type: str, body: bytes, what: str) -> bytes:
    """The content of the one application/dicom part of a WADO-RS answer (or the body, when a server sends the
    instance bare as application/dicom); PacsError('pacs_bad_answer') for anything else."""
    parsed = email.parser.Parser().parsestr(f"Content-Type: {content_type}\r\n\r\n", headersonly=True)
    media, boundary = parsed.get_content_type(), parsed.get_param("boundary")
    if media == "application/dicom":
        return body
    if media != "multipart/related" or not boundary:
        raise PacsError(f"{what}: answer of type {content_type!r}, not multipart/related", "pacs_bad_answer")
    delimiter = b"\r\n--" + boundary.encode()
    start = body.find(delimiter[2:] + b"\r\n")
    headers_end = body.find(b"\r\n\r\n", start)
    end = body.rfind(delimiter + b"--")
    if start < 0 or headers_end < 0 or end < headers_end or body.find(delimiter, headers_end) != end:
        raise PacsError(f"{what}: not a multipart answer of one part", "pacs_bad_answer")
    part = email.parser.BytesParser().parsebytes(body[start + len(delimiter):headers_end + 4], headersonly=True)
    data = body[headers_end + 4:end]
    if part.get_content_type() != "application/dicom" or part.get("Content-Length", str(len(data))) != str(len(data)):
        raise PacsError(f"{what}: a part of type {part.get_content_type()} and {len(data)} bytes", "pacs_bad_answer")
    return data
