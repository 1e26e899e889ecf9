"""The preprocessing pipeline's input: --input files, or a BigQuery table or query.

    ReadInput(opts)                  -> PCollection[bytes] lines, or PCollection[dict] rows
    ReadLineBatches(patterns, n)     -> PCollection[list[bytes]] batches of lines, n readers

Lines lose their endings (\\n or \\r\\n) as Beam's ReadFromText strips them; a file is plain,
or gzip when its name ends in .gz (other compressions through Beam's filesystems).
"""

from __future__ import annotations

import gzip

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline import events
from pipeline import options as preprocess_options


def _lines_of(handle):
    """The lines of a binary file without their endings, \\n or \\r\\n, as ReadFromText
    splits them (a lone \\r stays inside its line)."""
    for line in handle:
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        yield line


def _open_lines(path: str):
    """The lines of one file, gzip or plain by its name (other compressions through Beam)."""
    kind = CompressionTypes.detect_compression_type(path)
    if kind == CompressionTypes.GZIP:
        raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
        return raw, _lines_of(gzip.GzipFile(fileobj=raw, mode="rb"))
    handle = FileSystems.open(path, compression_type=kind)
    return handle, _lines_of(iter(handle.readline, b""))


class _ReadStridedFn(beam.DoFn):
    """Reader k of n: every line of every file, kept in batches b with b mod n == k."""

    def __init__(self, patterns: list[str], readers: int):
        self._patterns = patterns
        self._readers = readers

    def process(self, reader: int):
        paths = []
        for match in FileSystems.match(self._patterns):
            paths += sorted(metadata.path for metadata in match.metadata_list)
        if not paths:
            raise OSError(f"no input file matches {self._patterns}")
        index, batch = 0, []
        for path in paths:
            handle, lines = _open_lines(path)
            with handle:
                for line in lines:
                    batch.append(line)
                    if len(batch) == events.LINES_PER_BATCH:
                        if index % self._readers == reader:
                            yield batch
                        index, batch = index + 1, []
        if batch and index % self._readers == reader:
            yield batch


class ReadLineBatches(beam.PTransform):
    """--input files -> batches of their lines, read by `readers` workers side by side.

    Input: the pipeline root. Output: PCollection[list[bytes]], lists of events.LINES_PER_BATCH
    lines (fewer in the last one) without their line endings, each line of the files in exactly
    one batch: the same lines as `ReadInput`.

    A gzip file cannot be split, so reader k of n decompresses every file whole and keeps the
    batches b with b mod n == k: decompressing and splitting lines in C costs little next to
    parsing, and each worker then parses only its share, without a shuffle of the lines.
    """

    def __init__(self, patterns: list[str], readers: int):
        super().__init__()
        self._patterns = patterns
        self._readers = readers

    def expand(self, root):
        readers = root | "Readers" >> beam.Create(range(self._readers))
        if self._readers > 1:
            readers = readers | "SpreadReaders" >> beam.Reshuffle()
        return readers | "ReadStrided" >> beam.ParDo(_ReadStridedFn(self._patterns, self._readers))


class ReadInput(beam.PTransform):
    """The pipeline's input: --input files or a BigQuery table or query.

    Input: the pipeline root. Output: PCollection[bytes], the lines of the --input files (one
    pattern, or several separated by commas) without their line endings (each file plain, or
    gzip when its name ends in .gz), or PCollection[dict], the GA360 rows of --bigquery_table /
    --bigquery_query.
    """

    def __init__(self, opts: preprocess_options.PreprocessOptions):
        super().__init__()
        self._opts = opts

    def expand(self, root):
        opts = self._opts
        patterns = preprocess_options.input_patterns(opts)
        if len(patterns) == 1:
            return root | "ReadLines" >> beam.io.ReadFromText(
                patterns[0], coder=beam.coders.BytesCoder()
            )
        if patterns:
            return (
                root
                | "InputPatterns" >> beam.Create(patterns)
                | "ReadLines" >> beam.io.ReadAllFromText(coder=beam.coders.BytesCoder())
            )
        return root | "ReadSessionsFromBigQuery" >> beam.io.ReadFromBigQuery(
            table=opts.bigquery_table, query=opts.bigquery_query, use_standard_sql=True
        )
