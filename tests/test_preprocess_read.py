"""ReadLineBatches, the local read of --input files: the same lines as ReadInput (ReadFromText),
in batches, however many readers share the files."""

import gzip

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import events, preprocess, records
from pipeline import options as preprocess_options

# Line endings \n and \r\n, a lone \r (not an ending), an empty line, a last line without one.
CONTENT = b"first\nsecond\r\nthird\rfourth\n\nsixth \xe2\x80\xa8 same line\n" + b"".join(
    b"line %d\n" % i for i in range(20)
)
TAIL = b"no ending"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("read")
    (root / "plain.txt").write_bytes(CONTENT + TAIL)
    # Two concatenated gzip members, as `cat a.gz b.gz` makes.
    (root / "two-members.json.gz").write_bytes(gzip.compress(CONTENT) + gzip.compress(TAIL))
    return root


@pytest.mark.parametrize("name", ["plain.txt", "two-members.json.gz"])
@pytest.mark.parametrize("readers", [1, 2, 3])
def test_batches_hold_the_lines_read_from_text(inputs, name, readers, monkeypatch):
    monkeypatch.setattr(events, "LINES_PER_BATCH", 4)
    pattern = str(inputs / name)
    expected = CONTENT.replace(b"\r\n", b"\n").split(b"\n")[:-1] + [TAIL]
    with TestPipeline() as p:
        batches = p | preprocess.ReadLineBatches([pattern], readers)
        assert_that(
            batches | "Sizes" >> beam.Map(lambda batch: 1 <= len(batch) <= 4),
            equal_to([True] * -(-len(expected) // 4)),
            label="Sizes",
        )
        assert_that(batches | beam.FlatMap(lambda batch: batch), equal_to(expected))
        # The reference: what ReadFromText makes of the same file.
        opts = PipelineOptions(["--input", pattern]).view_as(preprocess_options.PreprocessOptions)
        reference = p | "Reference" >> preprocess.ReadInput(opts)
        assert_that(reference, equal_to(expected), label="Reference")


def test_several_patterns_read_every_file_once(inputs):
    patterns = [str(inputs / "plain.txt"), str(inputs / "*.gz")]
    expected = 2 * (CONTENT.count(b"\n") + 1)
    with TestPipeline() as p:
        lines = p | preprocess.ReadLineBatches(patterns, 2) | beam.FlatMap(lambda b: b)
        assert_that(lines | beam.combiners.Count.Globally(), equal_to([expected]))


def test_redistributed_parse_gives_the_same_events():
    config = records.SessionConfig()
    line = (
        b'{"fullVisitorId": "v", "visitId": 1, "hits": [{"type": "PAGE", "time": 0, '
        b'"customDimensions": [{"index": 10, "value": "a"}]}, {"type": "PAGE", "time": 5}]}'
    )
    with TestPipeline() as p:
        parsed = (
            p | beam.Create([line, b"{"]) | events.ParseEvents("ga360", config, redistribute=True)
        )
        assert_that(
            parsed[events.EVENTS_TAG] | beam.FlatMap(lambda b: b), equal_to([("v", "a", 5.0)])
        )


def test_redistributed_batches_are_packed_smaller_and_unpacked_unchanged():
    lines = CONTENT.split(b"\n") + [b"", b"\r", b"\xff\xfe not utf-8", TAIL]
    rows = [{"fullVisitorId": "v", "hits": [{"type": "PAGE", "time": 0}]}, {}]
    for batch in (lines, rows, []):
        unpacked = events.unpack_lines(events.pack_lines(batch))
        assert unpacked == batch
        assert [type(element) for element in unpacked] == [type(element) for element in batch]
    # Lines of JSON sessions, as the shuffle moves them: several times smaller.
    session = (
        b'{"fullVisitorId": "%d", "visitId": 1, "hits": [{"type": "PAGE", "time": 0, '
        b'"page": {"pagePath": "/a/b"}, "customDimensions": [{"index": 10, "value": "c%d"}]}]}'
    )
    batch = [session % (i, i % 50) for i in range(events.LINES_PER_BATCH)]
    assert len(events.pack_lines(batch)) * 5 < sum(map(len, batch))
