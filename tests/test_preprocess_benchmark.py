"""The preprocessing benchmark's bars (slow: run with `./run_tests.sh -m slow`)."""

import pytest

pytest.importorskip("psutil")


@pytest.mark.slow
def test_one_million_page_hits_within_the_bars(tmp_path):
    from benchmarks import preprocess_benchmark

    results = preprocess_benchmark.main(["--page_hits", "1000000", "--work_dir", str(tmp_path)])
    by_name = {result["name"]: result for result in results}
    single = by_name["pipeline, DirectRunner in_memory, 1 worker"]
    double = by_name["pipeline, DirectRunner multi_processing, 2 workers"]
    assert single["seconds"] <= 120 and double["seconds"] <= 120
    assert single["peak_rss_mb"] < 4096 and double["peak_rss_mb"] < 4096
