"""Read WARC/WET files into documents, robustly; write small WARC files (tests, benchmarks).

A document is a dict `{"id": str, "url": str, "text": str}`: `id` is the WARC-Record-ID, `url`
the WARC-Target-URI. `iter_warc_documents(path, counts)` yields one per usable record:

- `response` records with an HTML (or plain text) HTTP payload: the charset comes from the HTTP
  Content-Type header when it names one, else from resiliparse's byte-level detector; the HTML
  is turned into text by resiliparse's `extract_plain_text` (main content, no boilerplate kept
  out: we want all visible text and let the quality filters judge).
- `conversion` records (WET files): the payload is already UTF-8 text.
- Every other record type (request, metadata, warcinfo...) is skipped silently.

Robustness: one bad record must not lose the rest of a multi-gigabyte file, but fastwarc's
iterator stops at the first malformed header. So the byte stream is cut into records here, and
fastwarc parses one record at a time: a record that fails to parse is counted in
`counts["corrupt_records"]` and skipped. Gzip files are decompressed member by member
(a `.warc.gz` holds one gzip member per record); a member whose compressed bytes are damaged is
counted and the reader resynchronizes on the next gzip header. Memory stays bounded by the
largest record, whatever the file size.

NOTE: records are cut before every `WARC/1.0` or `WARC/1.1` line (and at gzip member ends); a
payload that itself contains such a line is cut wrongly, and the pieces are counted as corrupt.
A gzip file that is one single member (`gzip file.warc`) loses everything after a damage.
"""

from __future__ import annotations

import gzip
import io
import re
import uuid
import zlib
from typing import Iterable, Iterator

from fastwarc.warc import ArchiveIterator, WarcRecord, WarcRecordType
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding

READ_BLOCK_BYTES = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b\x08"
MEMBER_END = object()
CORRUPT = object()
_RECORD_START = re.compile(rb"WARC/1\.[01]\r\n")
_REQUIRED_HEADERS = ("WARC-Type", "WARC-Record-ID", "Content-Length")
_TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


def new_counts() -> dict:
    return {"records": 0, "documents": 0, "corrupt_records": 0, "skipped_records": 0}


def decompressed_blocks(path: str) -> Iterator[bytes | object]:
    """The bytes of a WARC file, gunzipped if it starts with a gzip header, in blocks."""
    with open(path, "rb") as file:
        head = file.read(3)
        file.seek(0)
        if head != _GZIP_MAGIC:
            while block := file.read(READ_BLOCK_BYTES):
                yield block
            return
        yield from _gunzip_members(file)


def _gunzip_members(file) -> Iterator[bytes | object]:
    """Decompress concatenated gzip members, marking each member's end (`MEMBER_END`).

    A damaged or truncated member yields `CORRUPT` instead of its end; reading resumes at the
    next gzip header.
    """
    decompressor = zlib.decompressobj(wbits=31)
    searching = in_member = False
    data = b""
    while True:
        block = file.read(READ_BLOCK_BYTES)
        data += block
        while data:
            if searching:
                found = data.find(_GZIP_MAGIC)
                if found < 0:
                    data = data[-2:] if block else b""  # a header may straddle two blocks
                    break
                data, searching = data[found:], False
            in_member = True
            try:
                out = decompressor.decompress(data)
            except zlib.error:
                yield CORRUPT
                decompressor = zlib.decompressobj(wbits=31)
                data, searching, in_member = data[1:], True, False
                continue
            if out:
                yield out
            data = b""
            if decompressor.eof:
                yield MEMBER_END
                data, in_member = decompressor.unused_data, False
                decompressor = zlib.decompressobj(wbits=31)
        if not block:
            if in_member:
                yield CORRUPT  # the file ends inside a member
            return


def split_records(blocks: Iterable[bytes | object]) -> Iterator[bytes | object]:
    """Cut a stream of WARC bytes into single records, passing `CORRUPT` marks through.

    A cut is made before every `WARC/1.0` or `WARC/1.1` line and at every gzip member end;
    `CORRUPT` drops the partial record read so far.
    """
    buffer = b""
    for block in blocks:
        if block is MEMBER_END or block is CORRUPT:
            if buffer and block is MEMBER_END:
                yield buffer
            buffer = b""
            if block is CORRUPT:
                yield CORRUPT
            continue
        buffer += block
        start = 0
        for match in _RECORD_START.finditer(buffer, 1):
            yield buffer[start:match.start()]
            start = match.start()
        buffer = buffer[start:]
    if buffer:
        yield buffer


def decode_html(body: bytes, charset: str | None) -> str:
    """Text of an HTML page: declared charset if known, else detected; then html -> text."""
    encoding = charset or detect_encoding(body)
    try:
        html = bytes_to_str(body, encoding)
    except LookupError:  # an unknown charset name in the header
        html = bytes_to_str(body, detect_encoding(body))
    return extract_plain_text(html)


def _record_document(record: WarcRecord) -> dict | None:
    """The document of one parsed record, or None for record types that hold no page text."""
    record_type = record.record_type
    if record_type == WarcRecordType.conversion:
        text = record.reader.read().decode("utf-8", errors="replace")
    elif record_type == WarcRecordType.response and record.is_http:
        content_type = (record.http_content_type or "text/html").lower()
        if content_type not in _TEXT_TYPES:
            return None
        body = record.reader.read()
        text = body.decode("utf-8", errors="replace") if content_type == "text/plain" else decode_html(body, record.http_charset)
    else:
        return None
    return {"id": record.record_id or "", "url": record.headers.get("WARC-Target-URI", ""), "text": text}


def parse_record(raw: bytes) -> dict | None:
    """Parse one raw record; raises ValueError when it is not a well-formed WARC record."""
    records = iter(ArchiveIterator(io.BytesIO(raw), parse_http=True))
    try:
        record = next(records)
    except (OSError, StopIteration) as error:
        raise ValueError(f"not a WARC record: {error}") from error
    missing = [name for name in _REQUIRED_HEADERS if name not in record.headers]
    if missing:
        raise ValueError(f"record lacks the WARC headers {missing}")
    if record.content_length > len(raw):
        raise ValueError("record is shorter than its Content-Length")
    return _record_document(record)


def iter_warc_documents(path: str, counts: dict | None = None) -> Iterator[dict]:
    """Documents of a WARC or WET file (plain or gzip); bad records are counted, not fatal."""
    counts = new_counts() if counts is None else counts
    for name, value in new_counts().items():
        counts.setdefault(name, value)
    for raw in split_records(decompressed_blocks(path)):
        counts["records"] += 1
        if raw is CORRUPT:
            counts["corrupt_records"] += 1
            continue
        try:
            document = parse_record(raw)
        except (ValueError, OSError, UnicodeError):
            counts["corrupt_records"] += 1
            continue
        if document is None:
            counts["skipped_records"] += 1
            continue
        counts["documents"] += 1
        yield document


def make_record(url: str, payload: bytes, *, record_type: str = "response", charset: str | None = "utf-8",
                record_id: str | None = None) -> bytes:
    """The bytes of one WARC record: an HTTP 200 HTML response, or a WET `conversion` of text."""
    record = WarcRecord()
    record_urn = f"uuid:{record_id or uuid.uuid5(uuid.NAMESPACE_URL, url)}".encode()  # fastwarc adds "urn:"
    if record_type == "response":
        content_type = "text/html" + (f"; charset={charset}" if charset else "")
        payload = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\r\n".encode() + payload
        record.init_headers(WarcRecordType.response, record_urn, content_length=len(payload))
        record.headers["Content-Type"] = "application/http; msgtype=response"
    elif record_type == "conversion":
        record.init_headers(WarcRecordType.conversion, record_urn, content_length=len(payload))
        record.headers["Content-Type"] = "text/plain"
    else:
        raise ValueError(f"record_type must be 'response' or 'conversion', not {record_type!r}")
    record.headers["WARC-Target-URI"] = url
    record.set_bytes_content(payload)
    buffer = io.BytesIO()
    record.write(buffer)
    return buffer.getvalue()


def write_warc(path: str, records: Iterable[bytes]) -> int:
    """Write records (from `make_record`); a `.gz` path gets one gzip member per record."""
    count = 0
    with open(path, "wb") as file:
        for record in records:
            file.write(gzip.compress(record, compresslevel=6) if path.endswith(".gz") else record)
            count += 1
    return count
