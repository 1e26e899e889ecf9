"""What a synthetic visit looks like: the GA360 session dicts drawn for a `SyntheticWorld`.

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

The session maker reads these constants at each draw, so a study may change one (e.g.
`DWELL_AFFINITY`) for the sessions it generates.
"""

from __future__ import annotations

import bisect
import calendar
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.synthetic_world import (
    DEFAULT_ITEMS,
    DEFAULT_TOPICS,
    VISITS_PER_VISITOR,
    SyntheticWorld,
    make_world,
    schedule_visits,
)

DEFAULT_CONTENT_DIMENSION = 10
HOSTNAME = "www.example-news.com"
SITE_NAME = "Example News"

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
        visitors, starts, numbers = schedule_visits(num_sessions, num_visitors, rng)
    else:
        day = calendar.timegm(time.strptime(date, "%Y-%m-%d"))
        rng = np.random.default_rng([seed, 1, day // 86400])
        visitors, starts, numbers = schedule_visits(num_sessions, num_visitors, rng, day, 1)
    maker = _SessionMaker(world, content_dimension, _Draws(rng))
    for visitor, start, number in zip(visitors, starts, numbers, strict=True):
        yield maker.session(visitor, start, number)
