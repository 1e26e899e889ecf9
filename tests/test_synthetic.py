"""Tests of the synthetic GA360 generator (pipeline/synthetic.py) and the test oracle
(tests/reference.py) it is checked against."""

from __future__ import annotations

import collections
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import reference  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)

from pipeline import synthetic, synthetic_sessions, synthetic_world

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INTEGER_FIELDS = ("visitId", "visitNumber", "visitStartTime")
TOTALS_FIELDS = ("visits", "hits", "pageviews", "timeOnSite", "bounces", "newVisits")
HIT_INTEGER_FIELDS = ("hitNumber", "time", "hour", "minute")


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    """400 sessions over 100 visitors and 300 items."""
    return list(synthetic.generate_sessions(400, seed=11, num_items=300, num_topics=8))


@pytest.fixture(scope="module")
def planted() -> tuple[list[dict], synthetic_world.SyntheticWorld]:
    """A larger sample, with the world it was drawn from, for the planted structure."""
    sessions = list(synthetic.generate_sessions(3000, seed=5))
    world = synthetic_world.make_world(3000 // 4, seed=5)
    return sessions, world


def _page_hits(session: dict) -> list[dict]:
    return [h for h in session["hits"] if h["type"] == "PAGE"]


def _content_id(hit: dict, index: int = 10) -> str | None:
    for entry in hit["customDimensions"]:
        if int(entry["index"]) == index:
            return entry["value"]
    return None


# --- the generator ------------------------------------------------------------------------------


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path):
    paths = [tmp_path / name for name in ("a.json", "b.json", "c.json", "a.json.gz", "b.json.gz")]
    synthetic.write_sessions(str(paths[0]), 150, seed=3, num_items=200, bad_lines=7)
    synthetic.write_sessions(str(paths[1]), 150, seed=3, num_items=200, bad_lines=7)
    synthetic.write_sessions(str(paths[2]), 150, seed=4, num_items=200, bad_lines=7)
    synthetic.write_sessions(str(paths[3]), 150, seed=3, num_items=200, bad_lines=7)
    synthetic.write_sessions(str(paths[4]), 150, seed=3, num_items=200, bad_lines=7)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    assert paths[3].read_bytes() == paths[4].read_bytes()


def test_sessions_have_the_export_schema(sample):
    for session in sample:
        assert isinstance(session["fullVisitorId"], str) and session["fullVisitorId"].isdigit()
        for field in INTEGER_FIELDS:
            int(session[field])
        start = int(session["visitStartTime"])
        assert session["date"] == time.strftime("%Y%m%d", time.gmtime(start))
        assert set(session["totals"]) == set(TOTALS_FIELDS)
        assert int(session["totals"]["hits"]) == len(session["hits"])
        assert int(session["totals"]["pageviews"]) == len(_page_hits(session))
        assert set(session["device"]) == {
            "browser",
            "operatingSystem",
            "isMobile",
            "deviceCategory",
        }
        assert set(session["geoNetwork"]) == {"country", "city"}
        assert set(session["trafficSource"]) == {"source", "medium", "campaign"}
        assert all(set(c) == {"index", "value"} for c in session["customDimensions"])

        hits = session["hits"]
        assert [int(h["hitNumber"]) for h in hits] == list(range(1, len(hits) + 1))
        times = [int(h["time"]) for h in hits]
        assert times == sorted(times) and times[0] == 0
        assert hits[0]["isEntrance"] is True
        for hit in hits:
            assert hit["type"] in ("PAGE", "EVENT")
            assert set(hit["page"]) == {"pagePath", "pageTitle", "hostname", "pagePathLevel1"}
            assert hit["product"] == []
            seconds = (start + int(hit["time"]) // 1000) % 86400
            assert (int(hit["hour"]), int(hit["minute"])) == (seconds // 3600, seconds % 3600 // 60)
            assert ("eventInfo" in hit) == (hit["type"] == "EVENT")
            content_id = _content_id(hit)
            if content_id is not None:
                assert hit["page"]["pagePath"].startswith(f"/article/{content_id}/")


def test_sessions_mix_in_realistic_noise(sample):
    paths = collections.Counter()
    single_page = 0
    for session in sample:
        pages = _page_hits(session)
        single_page += len(session["hits"]) == 1
        for hit in pages:
            if _content_id(hit) is None:
                assert hit["page"]["pagePath"] == "/" or hit["page"]["pagePath"].startswith(
                    "/section/"
                )
                paths["navigation"] += 1
            else:
                paths["article"] += 1
        paths["event"] += len(session["hits"]) - len(pages)
    assert paths["navigation"] > 0.02 * paths["article"]
    assert paths["event"] > 0.1 * paths["article"]
    assert 0 < single_page < 0.15 * len(sample)
    assert 6 < (paths["article"] + paths["navigation"]) / len(sample) < 14
    ids = {_content_id(h) for s in sample for h in _page_hits(s)} - {None}
    assert any(i.isdigit() for i in ids) and any(i.startswith("article-") for i in ids)


def test_visit_numbers_count_each_visitors_visits_in_time_order(sample):
    visits = collections.defaultdict(list)
    for session in sample:
        visits[session["fullVisitorId"]].append(
            (int(session["visitStartTime"]), int(session["visitNumber"]))
        )
    assert max(len(v) for v in visits.values()) >= 5  # the visit counts are skewed
    for visitor_visits in visits.values():
        numbers = [number for _, number in sorted(visitor_visits)]
        assert numbers == list(range(1, len(numbers) + 1))
    assert [int(s["visitStartTime"]) for s in sample] == sorted(
        int(s["visitStartTime"]) for s in sample
    )


def test_integer_fields_are_strings_in_about_half_of_the_sessions(sample):
    kinds = collections.Counter()
    for session in sample:
        stringy = isinstance(session["visitId"], str)
        kinds[stringy] += 1
        expected = str if stringy else int
        values = [session[f] for f in INTEGER_FIELDS]
        values += [v for v in session["totals"].values() if v is not None]
        values += [c["index"] for c in session["customDimensions"]]
        for hit in session["hits"]:
            values += [hit[f] for f in HIT_INTEGER_FIELDS]
            values += [c["index"] for c in hit["customDimensions"]]
        assert all(type(v) is expected for v in values)
    assert 0.35 < kinds[True] / len(sample) < 0.65


def test_bad_lines_are_rejected_with_their_reasons_and_good_lines_are_not(tmp_path):
    path = tmp_path / "sessions.json"
    counts = synthetic.write_sessions(str(path), 120, seed=2, num_items=200, bad_lines=14)
    assert counts["sessions"] == 120 and counts["bad_lines"] == 14
    lines = path.read_text().splitlines()
    assert len(lines) == 134

    reasons = collections.Counter()
    rejected_at = []
    hits = page_hits = 0
    for number, line in enumerate(lines):
        _, rejected = reference.reference_events([line])
        if rejected:
            assert sum(rejected.values()) == 1
            reasons.update(rejected)
            rejected_at.append(number)
        else:
            session = json.loads(line)
            hits += len(session["hits"])
            page_hits += len(_page_hits(session))
    assert reasons == {kind: 2 for kind in synthetic.BAD_LINE_KINDS}
    assert rejected_at != list(range(120, 134))  # interleaved, not appended
    assert (hits, page_hits) == (counts["hits"], counts["page_hits"])

    for kind in synthetic.BAD_LINE_KINDS:
        assert reference.reference_events([synthetic.bad_line(kind, 0)])[1] == {kind: 1}


def test_dwell_is_longer_on_topics_the_visitor_likes(planted):
    sessions, world = planted
    visitor_index = {v: i for i, v in enumerate(world.visitor_ids)}
    item_index = {c: i for i, c in enumerate(world.content_ids)}
    liked, unliked, everything = [], [], []
    for session in sessions:
        visitor = visitor_index[session["fullVisitorId"]]
        pages = _page_hits(session)
        for hit, following in zip(pages, pages[1:], strict=False):
            content_id = _content_id(hit)
            if content_id is None:
                continue
            dwell = int(following["time"]) - int(hit["time"])
            topic = int(world.item_topics[item_index[content_id]])
            (liked if world.affinity(visitor, topic) > 0 else unliked).append(dwell)
            everything.append(dwell)
    assert len(unliked) > 500
    assert statistics.median(liked) > 1.5 * statistics.median(unliked)
    assert 30_000 <= statistics.median(everything) <= 60_000
    assert len(liked) > 2 * len(unliked)  # the visitors read mostly what they like


def test_popularity_is_skewed_and_rereads_are_rare(planted):
    sessions, world = planted
    views = collections.Counter()
    pairs = collections.Counter()
    for session in sessions:
        for hit in _page_hits(session):
            content_id = _content_id(hit)
            if content_id is not None:
                views[content_id] += 1
                pairs[(session["fullVisitorId"], content_id)] += 1
    top = sum(count for _, count in views.most_common(world.num_items // 10))
    assert top > 0.4 * sum(views.values())
    rereads = sum(count - 1 for count in pairs.values())
    assert 0 < rereads < 0.05 * sum(views.values())


def test_gzip_output_holds_the_same_lines(tmp_path):
    plain, packed = tmp_path / "s.json", tmp_path / "s.json.gz"
    counts = synthetic.write_sessions(str(plain), 60, seed=8, num_items=100, bad_lines=3)
    assert synthetic.write_sessions(str(packed), 60, seed=8, num_items=100, bad_lines=3) == counts
    with gzip.open(packed, "rt", encoding="utf-8") as f:
        assert f.read() == plain.read_text()


def _fail_after(monkeypatch, sessions: int, error: BaseException) -> None:
    """Makes session number `sessions` + 1 raise `error`, once earlier lines are flushed."""
    real = synthetic_sessions._SessionMaker.session
    made = collections.Counter()

    def session(self, *args):
        made["sessions"] += 1
        if made["sessions"] > sessions:
            raise error
        return real(self, *args)

    monkeypatch.setattr(synthetic_sessions._SessionMaker, "session", session)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("name", ["fresh.json", "fresh.json.gz"])
def test_interrupted_generation_leaves_no_file(tmp_path, monkeypatch, name, error):
    path = tmp_path / name
    _fail_after(monkeypatch, 1500, error)  # after the first 1000 lines were written out
    with pytest.raises(type(error)):
        synthetic.write_sessions(str(path), 2000, seed=3, num_items=100, num_topics=4)
    assert os.listdir(tmp_path) == []


def test_interrupted_generation_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "sample.json.gz"
    synthetic.write_sessions(str(path), 50, seed=1, num_items=100, num_topics=4)
    before = path.read_bytes()
    _fail_after(monkeypatch, 1500, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_sessions(str(path), 2000, seed=2, num_items=100, num_topics=4)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["sample.json.gz"]
    monkeypatch.undo()
    counts = synthetic.write_sessions(str(path), 60, seed=2, num_items=100, num_topics=4)
    assert counts["sessions"] == 60
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 60
    assert os.listdir(tmp_path) == ["sample.json.gz"]


def test_cli_writes_the_file_and_prints_a_summary(tmp_path):
    path = tmp_path / "cli.json.gz"
    args = ["--output", str(path), "--sessions", "40", "--seed", "3", "--items", "50"]
    args += ["--topics", "4", "--visitors", "10", "--content_dimension", "7", "--bad_lines", "7"]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.synthetic", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "40 sessions" in result.stdout and "7 bad lines" in result.stdout
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 47
    events, rejected = reference.reference_events(lines, content_id_source="customDimension:7")
    assert sum(rejected.values()) == 7
    assert len({visitor for visitor, _ in events}) <= 10
    assert len({content for _, content in events}) <= 50


# --- the oracle, on hand-written sessions -----------------------------------------------------


def _hit(number, t, content=None, hit_type="PAGE", path=None):
    hit = {"hitNumber": number, "time": t, "type": hit_type, "customDimensions": []}
    if content is not None:
        hit["customDimensions"] = [{"index": 10, "value": content}]
    hit["page"] = {"pagePath": path or (f"/article/{content}/x" if content else "/")}
    return hit


def _line(visitor, visit_id, hits):
    return json.dumps({"fullVisitorId": visitor, "visitId": visit_id, "hits": hits})


def test_reference_sums_durations_over_two_visits():
    lines = [
        _line("v", 1, [_hit(1, 0, "A"), _hit(2, 10_000, "B"), _hit(3, 25_000, "A")]),
        _line("v", 2, [_hit(1, 0, "A"), _hit(2, 5_000, "C")]),
    ]
    events, rejected = reference.reference_events(lines)
    # A: 10 000 (visit 1) + 5 000 (visit 2); B: 25 000 - 10 000; the last A and C end visits.
    assert events == {("v", "A"): 15_000.0, ("v", "B"): 15_000.0}
    assert not rejected


def test_reference_page_without_content_ends_the_previous_duration():
    hits = [_hit(1, 0, "A"), _hit(2, 4_000), _hit(3, 9_000, "B"), _hit(4, 20_000, "C")]
    hits.insert(1, _hit(5, 2_000, "A", hit_type="EVENT"))  # events never count
    events, _ = reference.reference_events([_line("v", 1, hits)])
    assert events == {("v", "A"): 4_000.0, ("v", "B"): 11_000.0}
    events, _ = reference.reference_events([_line("v", 1, hits)], content_id_source="pagePath")
    assert events == {
        ("v", "/article/A/x"): 4_000.0,
        ("v", "/"): 5_000.0,
        ("v", "/article/B/x"): 11_000.0,
    }


def test_reference_breaks_time_ties_by_hit_number():
    hits = [_hit(3, 5_000, "C"), _hit(1, 0, "A"), _hit(2, 5_000, "B")]
    events, _ = reference.reference_events([_line("v", 1, hits)])
    # Order A(0, #1), B(5000, #2), C(5000, #3): A lasts 5 000, B lasts 0 and is dropped.
    assert events == {("v", "A"): 5_000.0}


def test_reference_reads_numbers_written_as_strings():
    hits = [
        {"hitNumber": "1", "time": "0", "type": "PAGE",
         "customDimensions": [{"index": "10", "value": "299913880"}]},
        {"time": "1500.5", "type": "PAGE",
         "customDimensions": [{"index": 3, "value": "x"}, {"index": 10, "value": "article-1"}]},
        {"hitNumber": 3, "time": 4000, "type": "PAGE", "customDimensions": []},
    ]  # fmt: skip
    events, rejected = reference.reference_events([_line(42, "123", hits)])
    assert events == {("42", "299913880"): 1_500.5, ("42", "article-1"): 2_499.5}
    assert not rejected


@pytest.mark.parametrize(
    "line, reason",
    [
        ("", "malformed_json"),
        ('{"fullVisitorId": "1"', "malformed_json"),
        ("[]", "not_an_object"),
        ('{"visitId": 1, "hits": []}', "missing_field:fullVisitorId"),
        ('{"fullVisitorId": "1", "hits": []}', "missing_field:visitId"),
        ('{"fullVisitorId": "1", "visitId": 1}', "missing_field:hits"),
        ('{"fullVisitorId": 1.5, "visitId": 1, "hits": [{}]}', "bad_type:fullVisitorId"),
        ('{"fullVisitorId": "1", "visitId": "x1", "hits": [{}]}', "bad_type:visitId"),
        ('{"fullVisitorId": "1", "visitId": 1, "hits": "no"}', "bad_type:hits"),
        ('{"fullVisitorId": "1", "visitId": 1, "hits": []}', "empty_hits"),
        ('{"fullVisitorId": "1", "visitId": 1, "hits": [3]}', "bad_type:hit"),
        ('{"fullVisitorId": "1", "visitId": 1, "hits": [{"type": "PAGE"}]}', "bad_type:hit.time"),
        ('{"fullVisitorId": "1", "visitId": 1, "hits": [{"type": "PAGE", "time": NaN}]}',
         "bad_type:hit.time"),
        ('{"fullVisitorId": "1", "visitId": 1, "hits": [{"type": "PAGE", "time": "-5"}]}',
         "negative_hit_time"),
        (_line("1", 1, [_hit(1, 0, "A"), _hit(2, 14_400_001, "B")]), "time_gap_too_large"),
        (_line("1", 1, [_hit(1, 0, "A" * 257), _hit(2, 10, "B")]), "id_too_long"),
        (_line("1" * 257, 1, [_hit(1, 0, "A"), _hit(2, 10, "B")]), "id_too_long"),
    ],
)  # fmt: skip
def test_reference_rejects_a_line_with_one_reason(line, reason):
    events, rejected = reference.reference_events(
        [line, _line("ok", 1, [_hit(1, 0, "A"), _hit(2, 7, "B")])]
    )
    assert rejected == {reason: 1}
    assert events == {("ok", "A"): 7.0}


def test_reference_accepts_the_largest_gap_and_ignores_event_times():
    hits = [_hit(1, 0, "A"), _hit(2, 14_400_000, "B"), _hit(3, 5, hit_type="EVENT")]
    hits[2]["time"] = "abc"
    events, rejected = reference.reference_events([_line("v", 1, hits)])
    assert events == {("v", "A"): 14_400_000.0} and not rejected


def test_reference_csv_events_sum_duplicates_and_drop_non_positive_sums():
    lines = [
        "visitorId,contentId,session_duration",
        "u,a,10",
        "u,a,5.5",
        "u,b,3",
        "u,b,-3",
        "w,a,0",
    ]
    events, rejected = reference.reference_csv_events(lines + ["u,a"])
    assert events == {("u", "a"): 15.5}
    assert rejected == {"malformed_csv": 1}


def test_reference_split_uses_the_first_eight_bytes_of_sha256():
    # sha256("u1\x1fb")[:8] / 2**64 = 0.0146..., sha256("u2\x1fa")[:8] / 2**64 = 0.647...
    assert reference.split_is_eval("u1", "b", 0.02) and not reference.split_is_eval("u1", "b", 0.01)
    assert reference.split_is_eval("u2", "a", 0.65) and not reference.split_is_eval("u2", "a", 0.64)
    assert not reference.split_is_eval("u1", "b", 0.0) and reference.split_is_eval("u1", "b", 1.0)


def test_reference_matrix_scales_by_the_train_median_and_drops_cold_eval_pairs():
    # Hash fractions: (u1,a) .934, (u2,b) .99996, (u2,c) .574, (u2,a) .647 go to train at
    # eval_fraction 0.2; (u1,b) .015, (u1,d) .093, (u3,b) .115 go to eval.
    events = {
        ("u1", "a"): 1_000.0,
        ("u2", "b"): 4_000.0,
        ("u2", "c"): 8_000.0,
        ("u2", "a"): 40_000.0,
        ("u1", "b"): 3_000.0,  # eval: u1 and b are both in train
        ("u1", "d"): 500.0,  # eval, dropped: no train pair has d
        ("u3", "b"): 2_000.0,  # eval, dropped: no train pair has u3
    }
    train, evaluation, median = reference.reference_matrix(events, 0.2)
    assert median == 6_000.0  # (4 000 + 8 000) / 2
    assert train == pytest.approx(
        {("u1", "a"): 0.05, ("u2", "b"): 0.2, ("u2", "c"): 0.4, ("u2", "a"): 1.0}
    )
    assert evaluation == pytest.approx({("u1", "b"): 0.15})

    train, evaluation, median = reference.reference_matrix(events, 0.2, median=5_000.0)
    assert median == 6_000.0
    assert train[("u1", "a")] == pytest.approx(0.06) and evaluation == pytest.approx(
        {("u1", "b"): 0.18}
    )

    train, _, _ = reference.reference_matrix(events, 0.2, scaling="log1p")
    assert train[("u2", "a")] == pytest.approx(math.log1p(40_000 / 6_000))
