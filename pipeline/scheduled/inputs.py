"""The input of a dated run: the patterns of the days of its window that have files."""

from __future__ import annotations

import datetime
import logging

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from common import cli

logger = logging.getLogger(__name__)


def _dates(date: str, window_days: int) -> list[str]:
    day = datetime.date.fromisoformat(date)
    return [(day - datetime.timedelta(days=n)).isoformat() for n in range(window_days)][::-1]


def resolve_input(
    pattern: str, date: str, window_days: int, flags: list[str] | None = None
) -> list[str]:
    """The input patterns of the run: one per day of the window that has files.

    `flags`, the run's other flags, go to Beam's FileSystems first, which read their own from
    them (--s3_endpoint_url, --hdfs_host, ...: the stages' pipelines get the same); None keeps
    the options FileSystems holds.

    Raises:
        cli.UsageError: the run's own date has no input (nothing is run or published), or a
            window without a date placeholder.
    """
    dated = "{date}" in pattern or "{date_nodash}" in pattern
    if window_days > 1 and not dated:
        raise cli.UsageError("--window_days needs {date} or {date_nodash} in --input")
    if flags is not None:
        FileSystems.set_options(PipelineOptions(flags))
    found = []
    for day in _dates(date, window_days):
        path = pattern.replace("{date}", day).replace("{date_nodash}", day.replace("-", ""))
        try:
            matched = FileSystems.match([path])[0].metadata_list
        except Exception as error:  # a bad pattern, or an unreachable filesystem
            raise cli.UsageError(f"cannot read --input {path}: {error}") from None
        if matched:
            found.append(path)
        elif day == date:
            raise cli.UsageError(
                f"no input for {date}: {path} matches no files; nothing was run or published"
            )
        else:
            logger.warning("no input for %s (%s) in the window; skipping that day", day, path)
    return found
