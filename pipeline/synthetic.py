"""Synthetic Google Analytics 360 session exports with a planted taste structure.

Writes NDJSON in the BigQuery export's own nested schema, one session per line, so the
preprocessing pipeline can be demonstrated and tested without real analytics data:

    python -m pipeline.synthetic --output data/ga_sessions.json.gz --sessions 100000 --seed 7

The world behind the data:

- `topics` topics and `items` content items; each item has one topic and a Zipf popularity
  (weight 1 / rank**1.1, ranks in random order), so a few items take most of the views.
- `visitors` visitors; each likes 1 to 3 topics with Dirichlet weights (its taste). Visitors get
  1 + Multinomial(sessions - visitors, lognormal activity) visits, numbered in time order.
- Each visit reads 1..15 articles. An article is picked from the visitor's taste (topic with
  probability taste[topic], then an item of that topic with probability ∝ popularity) or, with
  probability `NOISE_PROBABILITY`, from global popularity alone. A visitor rarely re-reads.
- Dwell time on an article (ms until the next PAGE hit) is lognormal with median
  `DWELL_MEDIAN_MS * exp(DWELL_AFFINITY * affinity)`, where affinity = taste[topic] / max(taste)
  is in [0, 1]; articles outside the taste have affinity 0.
- Noise a real export has: home and section pages without the content custom dimension, EVENT
  hits between page hits (carrying the page's custom dimensions, so only `type == "PAGE"`
  distinguishes them), single-page sessions, and integer fields written as JSON strings (the
  BigQuery JSON export does that) in about half of the sessions.

`--bad_lines K` interleaves K malformed lines, one kind of damage each (`BAD_LINE_KINDS`).
The output is a pure function of the arguments: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import bisect
import calendar
import contextlib
import dataclasses
import gzip
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_ITEMS = 2000
DEFAULT_TOPICS = 20
DEFAULT_CONTENT_DIMENSION = 10
DEFAULT_SEED = 0
DEFAULT_SESSIONS = 10_000
VISITS_PER_VISITOR = 4  # the default number of visitors is sessions // VISITS_PER_VISITOR

HOSTNAME = "www.example-news.com"
SITE_NAME = "Example News"
START_TIME = 1501545600  # 2017-08-01T00:00:00Z, the first day of the export
WINDOW_DAYS = 31
MIN_VISIT_GAP_S = 1800  # GA starts a new session after 30 minutes of inactivity

ZIPF_EXPONENT = 1.1  # item popularity ∝ 1 / rank**ZIPF_EXPONENT
NOISE_PROBABILITY = 0.15  # an article picked by global popularity, ignoring taste
CANDIDATES_PER_PAGE = 16  # draws tried per page before a visitor re-reads an article
MAX_CONTENT_PAGES = 15
SINGLE_PAGE_PROBABILITY = 0.05
HOME_LANDING_PROBABILITY = 0.3
SECTION_LANDING_PROBABILITY = 0.1
SECTION_DETOUR_PROBABILITY = 0.08  # a section page before an article, after the first one
STRINGY_PROBABILITY = 0.5  # a session whose integer fields are written as strings

DWELL_MEDIAN_MS = 20_000.0  # median article dwell at affinity 0
DWELL_AFFINITY = 1.1  # log-dwell gained at affinity 1 (median 60 s)
DWELL_SIGMA = 0.9
NAV_DWELL_MEDIAN_MS = 6_000.0  # home and section pages
NAV_DWELL_SIGMA = 0.6
MIN_DWELL_MS = 1_000
MAX_DWELL_MS = 1_800_000

TOPIC_NAMES = (
    "politics", "business", "technology", "science", "health", "sport", "culture", "travel",
    "food", "style", "education", "climate", "world", "local", "opinion", "books", "film",
    "music", "gaming", "motoring",
)  # fmt: skip
SLUG_WORDS = (
    "why", "how", "new", "plan", "city", "report", "study", "guide", "future", "secret",
    "rise", "fall", "hidden", "cost", "record", "debate", "review", "inside", "crisis",
    "change", "best", "power", "deal", "green", "data", "life", "market", "young", "old",
    "season", "week", "year", "map", "road", "water", "light", "night", "voice", "game", "art",
)  # fmt: skip
DEVICES = (  # (deviceCategory, isMobile, weight, browsers, operating systems)
    ("desktop", False, 0.55, ("Chrome", "Safari", "Firefox", "Edge"), ("Windows", "Macintosh")),
    ("mobile", True, 0.38, ("Chrome", "Safari", "Samsung Internet"), ("Android", "iOS")),
    ("tablet", True, 0.07, ("Safari", "Chrome"), ("iOS", "Android")),
)
PLACES = (
    ("United States", "New York"), ("United States", "Chicago"), ("United States", "Austin"),
    ("United Kingdom", "London"), ("Germany", "Berlin"), ("France", "Paris"), ("India", "Mumbai"),
    ("Brazil", "Sao Paulo"), ("Japan", "Tokyo"), ("Canada", "Toronto"), ("Australia", "Sydney"),
    ("Netherlands", "Amsterdam"), ("Spain", "not available in demo dataset"),
)  # fmt: skip
TRAFFIC_SOURCES = (  # (source, medium, campaign, weight)
    ("google", "organic", "(not set)", 0.40),
    ("(direct)", "(none)", "(not set)", 0.30),
    ("facebook.com", "referral", "(not set)", 0.12),
    ("t.co", "referral", "(not set)", 0.06),
    ("newsletter", "email", "weekly-digest", 0.08),
    ("google", "cpc", "brand-search", 0.04),
)
MEMBERSHIPS = (("anonymous", 0.7), ("registered", 0.2), ("subscriber", 0.1))
EVENTS = (  # (eventCategory, eventAction, weight); the label is the page path
    ("engagement", "scroll 75%", 0.55),
    ("engagement", "share", 0.15),
    ("video", "play", 0.15),
    ("newsletter", "signup view", 0.15),
)
EVENTS_AFTER_PAGE = ((0, 0.72), (1, 0.2), (2, 0.08))  # (EVENT hits after a page, probability)
# Content articles per visit: 1 + NegativeBinomial(3, 0.18), truncated to MAX_CONTENT_PAGES.
_NB_R, _NB_P = 3, 0.18

BAD_LINE_KINDS = (  # the damage done to each malformed line, in the order they are interleaved
    "malformed_json",  # the line is not JSON (truncated)
    "not_an_object",  # a JSON array holding a session
    "missing_field:fullVisitorId",
    "bad_type:hits",  # hits is an object, not a list
    "bad_type:hit.time",  # a PAGE hit whose time is "abc"
    "negative_hit_time",  # a PAGE hit whose time is negative
    "empty_hits",  # hits is []
)


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
    """The ground truth behind a synthetic export.

    Attributes:
        topic_names: str[topics], the section name of each topic.
        content_ids: str[items], e.g. "299913880" or "article-0042".
        item_topics: int64[items], the topic of each item.
        popularity: float64[items], Zipf weights 1 / rank**ZIPF_EXPONENT, summing to 1.
        slugs: str[items], the last part of each article's pagePath.
        visitor_ids: str[visitors], digit strings (GA360 fullVisitorId).
        favourite_topics: per visitor, the 1 to 3 topics it likes.
        favourite_weights: per visitor, the taste weight of each favourite topic (sums to 1).
    """

    topic_names: tuple[str, ...]
    content_ids: tuple[str, ...]
    item_topics: np.ndarray
    popularity: np.ndarray
    slugs: tuple[str, ...]
    visitor_ids: tuple[str, ...]
    favourite_topics: tuple[tuple[int, ...], ...]
    favourite_weights: tuple[tuple[float, ...], ...]

    @property
    def num_items(self) -> int:
        return len(self.content_ids)

    @property
    def num_visitors(self) -> int:
        return len(self.visitor_ids)

    def affinity(self, visitor: int, topic: int) -> float:
        """Returns taste[topic] / max(taste) for a visitor: 1 for its top topic, 0 if unliked."""
        weights = self.favourite_weights[visitor]
        for t, w in zip(self.favourite_topics[visitor], weights, strict=True):
            if t == topic:
                return w / max(weights)
        return 0.0


def make_world(
    num_visitors: int, seed: int, num_items: int = DEFAULT_ITEMS, num_topics: int = DEFAULT_TOPICS
) -> SyntheticWorld:
    """Draws the items, their topics and popularity, and the visitors' tastes.

    Args:
        num_visitors: number of visitors (>= 1).
        seed: the seed; the world uses the stream `default_rng([seed, 0])`.
        num_items: number of content items (>= 1).
        num_topics: number of topics (>= 1).

    Returns:
        The world; `generate_sessions` with the same arguments draws its sessions from it.
    """
    if num_visitors < 1 or num_items < 1 or num_topics < 1:
        raise ValueError("num_visitors, num_items and num_topics must be >= 1")
    rng = np.random.default_rng([seed, 0])
    topic_names = tuple(
        TOPIC_NAMES[t] if t < len(TOPIC_NAMES) else f"topic-{t}" for t in range(num_topics)
    )

    item_topics = rng.integers(0, num_topics, size=num_items)
    ranks = rng.permutation(num_items)
    popularity = 1.0 / (ranks + 1.0) ** ZIPF_EXPONENT
    popularity /= popularity.sum()
    # About a quarter of the articles use a CMS slug ID, the rest a 9-digit numeric ID.
    numeric_ids = 100_000_000 + rng.choice(900_000_000, size=num_items, replace=False)
    is_slug_id = rng.random(num_items) < 0.25
    content_ids = tuple(
        f"article-{i:04d}" if is_slug_id[i] else str(numeric_ids[i]) for i in range(num_items)
    )
    words = rng.integers(0, len(SLUG_WORDS), size=(num_items, 3)).tolist()
    slugs = tuple(
        "-".join([topic_names[t], *(SLUG_WORDS[w] for w in ws)])
        for t, ws in zip(item_topics.tolist(), words, strict=True)
    )

    visitor_numbers: list[int] = []
    seen: set[int] = set()
    while len(visitor_numbers) < num_visitors:
        draws = rng.integers(10**17, 9 * 10**18, size=num_visitors - len(visitor_numbers))
        for n in draws.tolist():
            if n not in seen:
                seen.add(n)
                visitor_numbers.append(n)
    visitor_ids = tuple(str(n) for n in visitor_numbers)

    num_favourites = np.minimum(
        rng.choice([1, 2, 3], size=num_visitors, p=[0.3, 0.45, 0.25]), num_topics
    )
    topic_order = np.argsort(rng.random((num_visitors, num_topics)), axis=1)
    weights = rng.dirichlet(np.ones(3), size=num_visitors)
    favourite_topics = []
    favourite_weights = []
    for v, k in enumerate(num_favourites.tolist()):
        w = weights[v, :k] / weights[v, :k].sum()
        favourite_topics.append(tuple(topic_order[v, :k].tolist()))
        favourite_weights.append(tuple(w.tolist()))
    return SyntheticWorld(
        topic_names=topic_names,
        content_ids=content_ids,
        item_topics=item_topics,
        popularity=popularity,
        slugs=slugs,
        visitor_ids=visitor_ids,
        favourite_topics=tuple(favourite_topics),
        favourite_weights=tuple(favourite_weights),
    )


class _Draws:
    """Uniform and standard-normal draws from one Generator, drawn in vectorised chunks.

    The scalar loop below consumes them one at a time; the sequence only depends on the seed
    and the order of the calls, so the output stays deterministic.
    """

    def __init__(self, rng: np.random.Generator, chunk: int = 1 << 16) -> None:
        self._rng = rng
        self._chunk = chunk
        self._uniforms: list[float] = []
        self._u = 0
        self._normals: list[float] = []
        self._n = 0

    def uniform(self) -> float:
        if self._u == len(self._uniforms):
            self._uniforms = self._rng.random(self._chunk).tolist()
            self._u = 0
        self._u += 1
        return self._uniforms[self._u - 1]

    def normal(self) -> float:
        if self._n == len(self._normals):
            self._normals = self._rng.standard_normal(self._chunk).tolist()
            self._n = 0
        self._n += 1
        return self._normals[self._n - 1]

    def pick(self, cdf: list[float]) -> int:
        """Returns index i with probability cdf[i] - cdf[i - 1] (cdf ends at 1)."""
        return min(bisect.bisect_right(cdf, self.uniform()), len(cdf) - 1)


def _cdf(weights: Any) -> list[float]:
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
    return (cumulative / cumulative[-1]).tolist()


def _content_pages_cdf() -> list[float]:
    # P(1 + k) ∝ C(k + r - 1, k) p^r (1 - p)^k, k = 0 .. MAX_CONTENT_PAGES - 1
    pmf = [math.comb(k + _NB_R - 1, k) * (1 - _NB_P) ** k for k in range(MAX_CONTENT_PAGES)]
    return _cdf(pmf)


def _schedule(
    num_sessions: int,
    num_visitors: int,
    rng: np.random.Generator,
    start_time: int = START_TIME,
    window_days: int = WINDOW_DAYS,
) -> tuple[list[int], list[int], list[int]]:
    """Assigns sessions to visitors and start times in [start_time, start_time + window_days).

    Returns:
        (visitor, visitStartTime, visitNumber) per session, three lists of length num_sessions,
        in order of start time. A visitor's visits are MIN_VISIT_GAP_S apart at least.
    """
    if num_sessions >= num_visitors:
        activity = rng.lognormal(0.0, 1.2, size=num_visitors)
        extra = rng.multinomial(num_sessions - num_visitors, activity / activity.sum())
        visitors = np.repeat(np.arange(num_visitors), 1 + extra)
    else:
        visitors = np.sort(rng.choice(num_visitors, size=num_sessions, replace=False))
    starts = start_time + rng.integers(0, window_days * 86400, size=num_sessions)
    order = np.lexsort((starts, visitors))  # by visitor, then start time
    visitors_list = visitors[order].tolist()
    starts_list = starts[order].tolist()
    numbers = [1] * num_sessions
    for i in range(1, num_sessions):
        if visitors_list[i] == visitors_list[i - 1]:
            numbers[i] = numbers[i - 1] + 1
            starts_list[i] = max(starts_list[i], starts_list[i - 1] + MIN_VISIT_GAP_S)
    by_time = np.argsort(np.asarray(starts_list, dtype=np.int64), kind="stable").tolist()
    return (
        [visitors_list[i] for i in by_time],
        [starts_list[i] for i in by_time],
        [numbers[i] for i in by_time],
    )


class _SessionMaker:
    """Builds session dicts for one world; holds the draws and what each visitor has read."""

    def __init__(self, world: SyntheticWorld, content_dimension: int, draws: _Draws) -> None:
        self.world = world
        self.draws = draws
        self.content_dimension = content_dimension
        self.section_dimension = content_dimension + 1
        self.read: dict[int, set[int]] = {}

        num_topics = len(world.topic_names)
        self.global_cdf = _cdf(world.popularity)
        self.topic_items: list[list[int]] = []
        self.topic_cdfs: list[list[float]] = []
        for t in range(num_topics):
            items = np.flatnonzero(world.item_topics == t)
            self.topic_items.append(items.tolist())
            self.topic_cdfs.append(_cdf(world.popularity[items]) if len(items) else [])
        self.item_topics: list[int] = world.item_topics.tolist()
        self.favourite_cdfs = [_cdf(w) for w in world.favourite_weights]
        self.pages_cdf = _content_pages_cdf()
        self.traffic_cdf = _cdf([s[3] for s in TRAFFIC_SOURCES])
        self.device_cdf = _cdf([x[2] for x in DEVICES])
        self.membership_cdf = _cdf([m[1] for m in MEMBERSHIPS])
        self.event_cdf = _cdf([e[2] for e in EVENTS])
        self.events_after_cdf = _cdf([e[1] for e in EVENTS_AFTER_PAGE])
        self.home_page = {
            "pagePath": "/",
            "pageTitle": SITE_NAME,
            "hostname": HOSTNAME,
            "pagePathLevel1": "/",
        }
        self.section_pages = [
            {
                "pagePath": f"/section/{name}",
                "pageTitle": f"{name.capitalize()} | {SITE_NAME}",
                "hostname": HOSTNAME,
                "pagePathLevel1": "/section/",
            }
            for name in world.topic_names
        ]
        self._visitor_profiles: dict[int, tuple[dict, dict, str]] = {}

    def _profile(self, visitor: int) -> tuple[dict, dict, str]:
        """The visitor's device, place and membership, drawn on its first visit."""
        profile = self._visitor_profiles.get(visitor)
        if profile is None:
            d = self.draws
            category, mobile, _, browsers, systems = DEVICES[d.pick(self.device_cdf)]
            device = {
                "browser": browsers[min(int(d.uniform() * len(browsers)), len(browsers) - 1)],
                "operatingSystem": systems[min(int(d.uniform() * len(systems)), len(systems) - 1)],
                "isMobile": mobile,
                "deviceCategory": category,
            }
            country, city = PLACES[min(int(d.uniform() * len(PLACES)), len(PLACES) - 1)]
            membership = MEMBERSHIPS[d.pick(self.membership_cdf)][0]
            profile = (device, {"country": country, "city": city}, membership)
            self._visitor_profiles[visitor] = profile
        return profile

    def _draw_item(self, visitor: int) -> int:
        d = self.draws
        if d.uniform() < NOISE_PROBABILITY:
            return d.pick(self.global_cdf)
        topic = self.world.favourite_topics[visitor][d.pick(self.favourite_cdfs[visitor])]
        if not self.topic_items[topic]:
            return d.pick(self.global_cdf)
        return self.topic_items[topic][d.pick(self.topic_cdfs[topic])]

    def _choose_item(self, visitor: int, read: set[int]) -> int:
        item = self._draw_item(visitor)
        for _ in range(CANDIDATES_PER_PAGE - 1):
            if item not in read:
                break
            item = self._draw_item(visitor)
        read.add(item)
        return item

    def _article_dwell(self, visitor: int, item: int) -> int:
        affinity = self.world.affinity(visitor, self.item_topics[item])
        log_ms = math.log(DWELL_MEDIAN_MS) + DWELL_AFFINITY * affinity
        ms = math.exp(log_ms + DWELL_SIGMA * self.draws.normal())
        return int(min(max(ms, MIN_DWELL_MS), MAX_DWELL_MS))

    def _nav_dwell(self) -> int:
        ms = math.exp(math.log(NAV_DWELL_MEDIAN_MS) + NAV_DWELL_SIGMA * self.draws.normal())
        return int(min(max(ms, MIN_DWELL_MS), MAX_DWELL_MS))

    def _article_page(self, item: int) -> tuple[dict, list[dict]]:
        world = self.world
        content_id = world.content_ids[item]
        slug = world.slugs[item]
        topic = world.topic_names[self.item_topics[item]]
        page = {
            "pagePath": f"/article/{content_id}/{slug}",
            "pageTitle": f"{slug.replace('-', ' ').capitalize()} | {SITE_NAME}",
            "hostname": HOSTNAME,
            "pagePathLevel1": "/article/",
        }
        dimensions = [
            {"index": self.content_dimension, "value": content_id},
            {"index": self.section_dimension, "value": topic},
        ]
        return page, dimensions

    def _pages(self, visitor: int, single: bool) -> list[tuple[dict, list[dict], int]]:
        """The visit's PAGE views in order: (page, hit customDimensions, dwell ms)."""
        d = self.draws
        read = self.read.setdefault(visitor, set())
        if single:
            if d.uniform() < HOME_LANDING_PROBABILITY:
                return [(self.home_page, [], self._nav_dwell())]
            item = self._choose_item(visitor, read)
            return [(*self._article_page(item), self._article_dwell(visitor, item))]
        pages: list[tuple[dict, list[dict], int]] = []
        landing = d.uniform()
        num_articles = 1 + d.pick(self.pages_cdf)
        for k in range(num_articles):
            item = self._choose_item(visitor, read)
            topic = self.item_topics[item]
            section = [{"index": self.section_dimension, "value": self.world.topic_names[topic]}]
            if k == 0 and landing < HOME_LANDING_PROBABILITY:
                pages.append((self.home_page, [], self._nav_dwell()))
            elif k == 0 and landing < HOME_LANDING_PROBABILITY + SECTION_LANDING_PROBABILITY:
                pages.append((self.section_pages[topic], section, self._nav_dwell()))
            elif k > 0 and d.uniform() < SECTION_DETOUR_PROBABILITY:
                pages.append((self.section_pages[topic], section, self._nav_dwell()))
            pages.append((*self._article_page(item), self._article_dwell(visitor, item)))
        return pages

    def session(self, visitor: int, start: int, visit_number: int) -> dict[str, Any]:
        """One session in the GA360 export schema."""
        d = self.draws
        stringy = d.uniform() < STRINGY_PROBABILITY
        as_int: Any = str if stringy else int
        single = d.uniform() < SINGLE_PAGE_PROBABILITY
        pages = self._pages(visitor, single)

        hits: list[dict[str, Any]] = []
        t = 0
        for p, (page, dimensions, dwell) in enumerate(pages):
            timed = [(t, "PAGE", None)]
            num_events = 0 if single else EVENTS_AFTER_PAGE[d.pick(self.events_after_cdf)][0]
            fractions = sorted(0.05 + 0.9 * d.uniform() for _ in range(num_events))
            for f in fractions:
                category, action, _ = EVENTS[d.pick(self.event_cdf)]
                event = {
                    "eventCategory": category,
                    "eventAction": action,
                    "eventLabel": page["pagePath"],
                }
                timed.append((t + int(f * dwell), "EVENT", event))
            for hit_time, hit_type, event in timed:
                seconds = (start + hit_time // 1000) % 86400
                hit: dict[str, Any] = {
                    "hitNumber": as_int(len(hits) + 1),
                    "time": as_int(hit_time),
                    "hour": as_int(seconds // 3600),
                    "minute": as_int(seconds % 3600 // 60),
                    "isEntrance": True if not hits else None,
                    "isExit": True if p == len(pages) - 1 and hit_type == "PAGE" else None,
                    "type": hit_type,
                    "page": page,
                    "customDimensions": [
                        {"index": as_int(c["index"]), "value": c["value"]} for c in dimensions
                    ],
                    "product": [],
                }
                if event is not None:
                    hit["eventInfo"] = event
                hits.append(hit)
            t += dwell

        device, geo, membership = self._profile(visitor)
        source, medium, campaign, _ = TRAFFIC_SOURCES[d.pick(self.traffic_cdf)]
        last_time = int(hits[-1]["time"])
        bounce = len(hits) == 1
        day = time.gmtime(start)
        return {
            "fullVisitorId": self.world.visitor_ids[visitor],
            "visitId": as_int(start),
            "visitNumber": as_int(visit_number),
            "visitStartTime": as_int(start),
            "date": f"{day.tm_year:04d}{day.tm_mon:02d}{day.tm_mday:02d}",
            "totals": {
                "visits": as_int(1),
                "hits": as_int(len(hits)),
                "pageviews": as_int(len(pages)),
                "timeOnSite": None if bounce else as_int(max(1, last_time // 1000)),
                "bounces": as_int(1) if bounce else None,
                "newVisits": as_int(1) if visit_number == 1 else None,
            },
            "device": device,
            "geoNetwork": geo,
            "trafficSource": {"source": source, "medium": medium, "campaign": campaign},
            "customDimensions": [{"index": as_int(1), "value": membership}],
            "hits": hits,
        }


def generate_sessions(
    num_sessions: int,
    seed: int,
    num_visitors: int | None = None,
    num_items: int = DEFAULT_ITEMS,
    num_topics: int = DEFAULT_TOPICS,
    content_dimension: int = DEFAULT_CONTENT_DIMENSION,
    date: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields synthetic GA360 sessions in order of visitStartTime.

    Args:
        num_sessions: number of sessions to yield.
        seed: the seed; the same arguments yield the same sessions.
        num_visitors: number of visitors; default max(1, num_sessions // 4).
        num_items: number of content items.
        num_topics: number of topics.
        content_dimension: the hit-level custom dimension index that holds the contentId.
        date: "YYYY-MM-DD": one day's export, every session starting that day (UTC). The
            world (visitors, tastes, content) depends on the seed only, so the exports of
            several dates share their visitors, as a site's daily exports do; the sessions
            are drawn from (seed, date). None: WINDOW_DAYS days from 2017-08-01.

    Yields:
        One dict per session in the BigQuery export schema (see the module docstring).
    """
    if num_visitors is None:
        num_visitors = max(1, num_sessions // VISITS_PER_VISITOR)
    world = make_world(num_visitors, seed, num_items=num_items, num_topics=num_topics)
    if date is None:
        rng = np.random.default_rng([seed, 1])
        visitors, starts, numbers = _schedule(num_sessions, num_visitors, rng)
    else:
        day = calendar.timegm(time.strptime(date, "%Y-%m-%d"))
        rng = np.random.default_rng([seed, 1, day // 86400])
        visitors, starts, numbers = _schedule(num_sessions, num_visitors, rng, day, 1)
    maker = _SessionMaker(world, content_dimension, _Draws(rng))
    for visitor, start, number in zip(visitors, starts, numbers, strict=True):
        yield maker.session(visitor, start, number)


def bad_line(kind: str, number: int, content_dimension: int = DEFAULT_CONTENT_DIMENSION) -> str:
    """Returns one malformed line whose only defect is `kind` (one of `BAD_LINE_KINDS`).

    Args:
        kind: the damage to do.
        number: makes the line's IDs distinct from other bad lines'.
        content_dimension: the content custom dimension index used in the line's hits.
    """
    start = START_TIME + 3600 * number

    def hit(hit_number: int, hit_time: Any) -> dict[str, Any]:
        return {
            "hitNumber": hit_number,
            "time": hit_time,
            "type": "PAGE",
            "page": {"pagePath": f"/article/bad-{number}/broken", "hostname": HOSTNAME},
            "customDimensions": [{"index": content_dimension, "value": f"bad-{number}"}],
        }

    session: dict[str, Any] = {
        "fullVisitorId": str(999_000_000_000_000_000 + number),
        "visitId": start,
        "visitNumber": 1,
        "visitStartTime": start,
        "date": time.strftime("%Y%m%d", time.gmtime(start)),
        "hits": [hit(1, 0), hit(2, 30_000), hit(3, 70_000)],
    }
    if kind == "malformed_json":
        return json.dumps(session, separators=(",", ":"))[:60]
    if kind == "not_an_object":
        return json.dumps([session], separators=(",", ":"))
    if kind == "missing_field:fullVisitorId":
        del session["fullVisitorId"]
    elif kind == "bad_type:hits":
        session["hits"] = session["hits"][0]
    elif kind == "bad_type:hit.time":
        session["hits"][1]["time"] = "abc"
    elif kind == "negative_hit_time":
        session["hits"][0]["time"] = -1500
    elif kind == "empty_hits":
        session["hits"] = []
    else:
        raise ValueError(f"unknown bad line kind {kind!r}; expected one of {BAD_LINE_KINDS}")
    return json.dumps(session, separators=(",", ":"))


@contextlib.contextmanager
def _replace_when_complete(path: str) -> Iterator[BinaryIO]:
    """Opens a hidden temporary file next to `path` and renames it to `path` on success only.

    An interrupted or failed write removes the temporary file and leaves `path` as it was, so
    a later run never takes a half-written sample for a complete one.
    """
    directory, name = os.path.split(path)
    partial = os.path.join(directory, f".{name}.incomplete-{uuid.uuid4().hex[:8]}")
    try:
        with open(partial, "xb") as raw:
            yield raw
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise


def write_sessions(
    path: str,
    num_sessions: int,
    seed: int,
    num_visitors: int | None = None,
    num_items: int = DEFAULT_ITEMS,
    num_topics: int = DEFAULT_TOPICS,
    content_dimension: int = DEFAULT_CONTENT_DIMENSION,
    bad_lines: int = 0,
    date: str | None = None,
) -> dict[str, int]:
    """Writes synthetic sessions as NDJSON (gzip-compressed if `path` ends in ".gz").

    Args:
        path: the output file.
        num_sessions, seed, num_visitors, num_items, num_topics, content_dimension, date: as
            for `generate_sessions`.
        bad_lines: number of malformed lines to interleave, cycling through `BAD_LINE_KINDS`
            at positions drawn from the seed.

    Returns:
        Counts {"sessions", "hits", "page_hits", "bad_lines"}; hits count the good sessions only.
    """
    if num_sessions < 0 or bad_lines < 0:
        raise ValueError("num_sessions and bad_lines must be >= 0")
    positions_rng = np.random.default_rng([seed, 2])
    total_lines = num_sessions + bad_lines
    bad_positions = set(positions_rng.choice(total_lines, size=bad_lines, replace=False).tolist())
    sessions = generate_sessions(
        num_sessions,
        seed,
        num_visitors=num_visitors,
        num_items=num_items,
        num_topics=num_topics,
        content_dimension=content_dimension,
        date=date,
    )
    counts = {"sessions": 0, "hits": 0, "page_hits": 0, "bad_lines": 0}
    progress_every = max(10_000, total_lines // 10)
    started = time.monotonic()
    with _replace_when_complete(path) as raw:
        out: Any = raw
        if path.endswith(".gz"):
            # mtime=0 and no file name in the header keep the bytes a function of the arguments.
            out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0)
        try:
            buffer: list[str] = []
            for line_number in range(total_lines):
                if line_number in bad_positions:
                    kind = BAD_LINE_KINDS[counts["bad_lines"] % len(BAD_LINE_KINDS)]
                    buffer.append(bad_line(kind, counts["bad_lines"], content_dimension))
                    counts["bad_lines"] += 1
                else:
                    session = next(sessions)
                    hits = session["hits"]
                    counts["sessions"] += 1
                    counts["hits"] += len(hits)
                    counts["page_hits"] += sum(1 for h in hits if h["type"] == "PAGE")
                    buffer.append(json.dumps(session, separators=(",", ":")))
                if len(buffer) >= 1000:
                    out.write(("\n".join(buffer) + "\n").encode("utf-8"))
                    buffer = []
                if (line_number + 1) % progress_every == 0:
                    logger.info(
                        "%d / %d lines written (%.1f s)",
                        line_number + 1,
                        total_lines,
                        time.monotonic() - started,
                    )
            if buffer:
                out.write(("\n".join(buffer) + "\n").encode("utf-8"))
        finally:
            if out is not raw:
                out.close()
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Command-line entry point; returns the counts `write_sessions` returned."""
    parser = argparse.ArgumentParser(
        description="Write synthetic GA360 BigQuery-export sessions (NDJSON, one per line)."
    )
    parser.add_argument("--output", required=True, help="output file; gzip if it ends in .gz")
    parser.add_argument(
        "--sessions", type=int, default=DEFAULT_SESSIONS, help="number of sessions (lines)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    parser.add_argument(
        "--visitors", type=int, default=None, help="number of visitors (default: sessions // 4)"
    )
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="content items")
    parser.add_argument("--topics", type=int, default=DEFAULT_TOPICS, help="content topics")
    parser.add_argument(
        "--content_dimension",
        type=int,
        default=DEFAULT_CONTENT_DIMENSION,
        help="hit custom dimension index that holds the contentId",
    )
    parser.add_argument(
        "--bad_lines", type=int, default=0, help="malformed lines to interleave (for demos)"
    )
    parser.add_argument(
        "--date",
        default=None,
        help="YYYY-MM-DD: one day's export (sessions of that day, drawn from the seed and the "
        "date; the visitors and content depend on the seed only, so several dates share them); "
        "default: 31 days from 2017-08-01",
    )
    args = parser.parse_args(argv)
    if args.date is not None:
        try:
            time.strptime(args.date, "%Y-%m-%d")
        except ValueError:
            parser.error(f"--date must be YYYY-MM-DD, got {args.date!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.monotonic()
    counts = write_sessions(
        args.output,
        args.sessions,
        args.seed,
        num_visitors=args.visitors,
        num_items=args.items,
        num_topics=args.topics,
        content_dimension=args.content_dimension,
        bad_lines=args.bad_lines,
        date=args.date,
    )
    print(
        f"Wrote {counts['sessions']} sessions ({counts['hits']} hits, {counts['page_hits']} "
        f"PAGE hits) and {counts['bad_lines']} bad lines to {args.output} "
        f"in {time.monotonic() - started:.1f} s"
    )
    return counts


if __name__ == "__main__":
    main()
