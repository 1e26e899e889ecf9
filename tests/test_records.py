"""Line parsers: GA360 sessions, CSV and MovieLens, including every rejection reason."""

import gzip
import json

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import options as preprocess_options
from pipeline import preprocess, records
from pipeline.events import EVENTS_TAG, REJECTED_TAG, ParseEvents
from pipeline.records import Rejected, SessionConfig

CONFIG = SessionConfig()


def page(time, content=None, number=None, index=10, path=None):
    hit = {"type": "PAGE", "time": time}
    if number is not None:
        hit["hitNumber"] = number
    if content is not None:
        hit["customDimensions"] = [{"index": index, "value": content}]
    if path is not None:
        hit["page"] = {"pagePath": path}
    return hit


def session(hits, visitor="v1", visit=1):
    return json.dumps({"fullVisitorId": visitor, "visitId": visit, "hits": hits})


def events(line, config=CONFIG):
    return sorted(records.session_events(line, config)[0])


def reason(line, config=CONFIG):
    with pytest.raises(Rejected) as caught:
        records.session_events(line, config)
    return caught.value.reason


def test_duration_is_gap_to_next_page_hit_and_last_page_is_dropped():
    line = session([page(0, "a"), page(1000, "b"), page(4000, "c")])
    assert events(line) == [("v1", "a", 1000.0), ("v1", "b", 3000.0)]


def test_event_hits_do_not_end_a_page_view():
    line = session([page(0, "a"), {"type": "EVENT", "time": 500}, page(2000, "b")])
    assert events(line) == [("v1", "a", 2000.0)]


def test_page_without_content_ends_previous_view_but_yields_nothing():
    line = session([page(0, "a"), page(1500), page(4000, "a"), page(4500, "b")])
    assert events(line) == [("v1", "a", 2000.0)]


def test_hits_ordered_by_time_then_hit_number():
    line = session([page(3000, "c", 3), page(1000, "b", 2), page(1000, "a", 1)])
    # a (1000, #1) -> b (1000, #2): 0 ms, dropped; b -> c: 2000 ms.
    assert events(line) == [("v1", "b", 2000.0)]


def test_repeated_content_sums_within_session():
    line = session([page(0, "a"), page(100, "a"), page(350, "b")])
    assert events(line) == [("v1", "a", 350.0)]


def test_numbers_as_strings_and_dimension_index_as_string():
    hits = [
        {
            "type": "PAGE",
            "time": "0",
            "hitNumber": "1",
            "customDimensions": [{"index": "10", "value": "a"}],
        },
        {"type": "PAGE", "time": "2500", "hitNumber": "2"},
    ]
    line = json.dumps({"fullVisitorId": 12345, "visitId": "77", "hits": hits})
    assert events(line) == [("12345", "a", 2500.0)]


def test_content_from_page_path_and_other_dimension_index():
    line = session([page(0, "x", index=3, path="/p/1"), page(10, None, path="/p/2")])
    assert events(line, SessionConfig(content_id_source="pagePath")) == [("v1", "/p/1", 10.0)]
    assert events(line, SessionConfig(content_id_source="customDimension:3")) == [("v1", "x", 10.0)]
    assert events(line) == []


def test_unicode_ids_are_kept():
    line = session([page(0, "статья-1"), page(5, "b")], visitor="visiteur-é")
    assert events(line.encode("utf-8")) == [("visiteur-é", "статья-1", 5.0)]


def test_counts_hits_and_page_hits():
    line = session([page(0, "a"), {"type": "EVENT", "time": 1}, page(2, "b")])
    assert records.session_events(line, CONFIG)[1:] == (3, 2)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json", "malformed_json"),
        (b"", "malformed_json"),
        (b"\xff\xfe{}", "bad_encoding"),
        (b"[1, 2]", "not_an_object"),
        (json.dumps({"visitId": 1, "hits": [page(0, "a")]}), "missing_field:fullVisitorId"),
        (json.dumps({"fullVisitorId": "v", "hits": [page(0, "a")]}), "missing_field:visitId"),
        (json.dumps({"fullVisitorId": "v", "visitId": 1}), "missing_field:hits"),
        (json.dumps({"fullVisitorId": ["v"], "visitId": 1, "hits": []}), "bad_type:fullVisitorId"),
        (json.dumps({"fullVisitorId": "v", "visitId": "x1", "hits": []}), "bad_type:visitId"),
        (json.dumps({"fullVisitorId": "v", "visitId": 1, "hits": {}}), "bad_type:hits"),
        (session([]), "empty_hits"),
        (session(["PAGE"]), "bad_type:hit"),
        (session([page("abc", "a")]), "bad_type:hit.time"),
        (session([{"type": "PAGE"}]), "bad_type:hit.time"),
        (session([page(-5, "a")]), "negative_hit_time"),
        (session([page(0, "a"), page(5 * 3600 * 1000, "b")]), "time_gap_too_large"),
        (session([page(0, "a")], visitor="v" * 300), "id_too_long"),
        (session([page(0, "a" * 300), page(1, "b")]), "id_too_long"),
        (session([page(0, "a\nb"), page(1, "b")]), "bad_id:line_break"),
        (session([page(0, {"x": 1}), page(1, "b")]), "bad_type:contentId"),
    ],
)
def test_bad_sessions_are_rejected_with_reason(line, expected):
    assert reason(line) == expected


def test_max_gap_and_id_length_are_configurable():
    line = session([page(0, "abcdef"), page(10_000, "b")])
    assert reason(line, SessionConfig(max_time_gap_ms=5_000)) == "time_gap_too_large"
    assert reason(line, SessionConfig(max_id_length=5)) == "id_too_long"


def test_bad_content_id_source_is_refused():
    for source in ("customDimension", "customDimension:0", "customDimension:x", "path"):
        with pytest.raises(ValueError, match="content_id_source"):
            SessionConfig(content_id_source=source)


def test_csv_lines():
    assert records.csv_event("visitorId,contentId,session_duration") == []
    assert records.csv_event(b"v1,c1,1234") == [("v1", "c1", 1234.0)]
    assert records.csv_event('"v,1",c1,5') == [("v,1", "c1", 5.0)]
    for bad, expected in (
        ("v1,c1", "wrong_field_count"),
        ("v1,c1,abc", "bad_type:session_duration"),
        (",c1,5", "missing_field:id"),
    ):
        with pytest.raises(Rejected, match=expected):
            records.csv_event(bad)


def test_movielens_separators_and_header():
    expected = [("1", "31", (1260759144.0, 2.5))]
    assert records.movielens_event("1::31::2.5::1260759144") == expected
    assert records.movielens_event("1\t31\t2.5\t1260759144") == expected
    assert records.movielens_event("1,31,2.5,1260759144") == expected
    assert records.movielens_event("1 31 2.5") == [("1", "31", (0.0, 2.5))]
    assert records.movielens_event("userId,movieId,rating,timestamp") == []
    with pytest.raises(Rejected, match="wrong_field_count"):
        records.movielens_event("1::2")


def test_gzip_input_reads_like_the_plain_file(tmp_path):
    # The pipeline's own read (ReadInput) on a .gz and on the same lines uncompressed: both must
    # parse to the same events and rejections. The .gz is two concatenated gzip members (what
    # `cat a.gz b.gz` or an object-store compose makes); lines end in \n, \r\n or nothing.
    lines = [
        session([page(0, "a"), page(7, "b")]),
        # Raw UTF-8, not \\u escapes: a line separator inside an ID must not split the line.
        json.dumps(
            {"fullVisitorId": "v2", "visitId": 1, "hits": [page(0, "x\u2028y"), page(5, "é")]},
            ensure_ascii=False,
        ),
        "not json",
        session([page(0, "c"), page(30, "d")], visitor="v3"),
    ]
    first = (lines[0] + "\r\n" + lines[1] + "\n").encode()
    second = (lines[2] + "\n" + lines[3]).encode()
    (tmp_path / "sessions.json").write_bytes(first + second)
    (tmp_path / "sessions.json.gz").write_bytes(gzip.compress(first) + gzip.compress(second))
    expected = [("v1", "a", 7.0), ("v2", "x\u2028y", 5.0), ("v3", "c", 30.0)]

    with TestPipeline() as p:
        for name in ("sessions.json", "sessions.json.gz"):
            opts = PipelineOptions(["--input", str(tmp_path / name)]).view_as(
                preprocess_options.PreprocessOptions
            )
            parsed = (
                p
                | f"Read {name}" >> preprocess.ReadInput(opts)
                | f"Parse {name}" >> ParseEvents("ga360", CONFIG)
            )
            events = parsed[EVENTS_TAG] | f"Unbatch {name}" >> beam.FlatMap(lambda batch: batch)
            assert_that(events, equal_to(expected), label=f"Events {name}")
            reasons = parsed[REJECTED_TAG] | f"Reasons {name}" >> beam.Map(
                lambda record: json.loads(record)["reason"]
            )
            assert_that(reasons, equal_to(["malformed_json"]), label=f"Rejected {name}")
