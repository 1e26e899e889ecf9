"""The ground truth behind a synthetic GA360 export: the content, the visitors and their tastes,
and when each visitor comes (see `pipeline.synthetic` for the whole story).

- `topics` topics and `items` content items; each item has one topic and a Zipf popularity
  (weight 1 / rank**ZIPF_EXPONENT, ranks in random order), so a few items take most of the views.
- `visitors` visitors; each likes 1 to 3 topics with Dirichlet weights (its taste). Visitors get
  1 + Multinomial(sessions - visitors, lognormal activity) visits, numbered in time order.

Everything is drawn from the seed alone: the same arguments give the same world.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_ITEMS = 2000
DEFAULT_TOPICS = 20
VISITS_PER_VISITOR = 4  # the default number of visitors is sessions // VISITS_PER_VISITOR
START_TIME = 1501545600  # 2017-08-01T00:00:00Z, the first day of the export
WINDOW_DAYS = 31
MIN_VISIT_GAP_S = 1800  # GA starts a new session after 30 minutes of inactivity
ZIPF_EXPONENT = 1.1  # item popularity ∝ 1 / rank**ZIPF_EXPONENT

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


def schedule_visits(
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
