"""The two sides of the rating matrix R [n_users, n_items]: rows are users, columns items.

A half-sweep solves every row of one side against the other side's fixed factors; `Side.other`
names that fixed side. The values are part of the initialisation's key (`trainer.core.seeding`),
so they never change.
"""

from __future__ import annotations

import enum


class Side(enum.IntEnum):
    """USERS (0) or ITEMS (1)."""

    USERS = 0
    ITEMS = 1

    @property
    def other(self) -> Side:
        """The side whose factors are fixed while this side is solved."""
        return Side.ITEMS if self is Side.USERS else Side.USERS

    @property
    def label(self) -> str:
        """ "users" or "items": the name used in files, logs and metrics."""
        return self.name.lower()


USERS = Side.USERS
ITEMS = Side.ITEMS
SIDES = (USERS, ITEMS)
