"""Passes over a finite training set, each in a fresh seeded order: the order RL's ``epoch`` prompt sampling
and SFT on the dataset task read their rows in, and how ``epochs`` turns into a step count.

Pass e visits every index of range(N) once, in the order ``random.Random(seed · 1,000,003 + e)`` shuffles
it into; the state (the pass and the position in it) is JSON and goes into the checkpoint, so a resumed
run reads the same rows as one never interrupted.
"""

from __future__ import annotations

import math
import random


def pass_order(size: int, seed: int, epoch: int) -> list[int]:
    """Pass ``epoch``'s order of range(``size``): shuffled by ``random.Random(seed · 1,000,003 + epoch)``."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class EpochOrder:
    """Indices of range(``size``) pass after pass, each pass in its own seeded order (module doc)."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("an epoch order needs at least one row")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0  # the pass, and the next index into its order
        self._order: list[int] | None = None

    def order(self) -> list[int]:
        """Pass ``epoch``'s order of the indices."""
        if self._order is None:
            self._order = pass_order(self.size, self.seed, self.epoch)
        return self._order

    def next(self) -> int:
        """The next index (a new pass, reshuffled, after the last index of the current one)."""
        if self.position == self.size:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        i = self.order()[self.position]
        self.position += 1
        return i

    @property
    def progress(self) -> float:
        """Passes done so far, as a fraction (1.5: one pass and half of the next)."""
        return self.epoch + self.position / self.size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; ConfigError if it was made for a set of another size."""
        if state.get("size", self.size) != self.size:
            from posttrain.config_checks import ConfigError

            raise ConfigError(f"the checkpoint passes over {state['size']} training rows, this config's data has "
                              f"{self.size}: resume with the data the run started with, or use another run_dir")
        if state["epoch"] != self.epoch:
            self._order = None  # another pass: its own order (the same pass keeps the one already shuffled)
        self.epoch, self.position = state["epoch"], state["position"]


def epoch_steps(epochs: float, rows: int, per_step: int) -> int:
    """⌈epochs · rows / per_step⌉ (at least 1): the steps that pass ``epochs`` times over ``rows`` rows read
    ``per_step`` at a time (the product rounded to 9 decimals first, so 0.3 · 10 / 1 gives 3)."""
    return max(1, math.ceil(round(epochs * rows / per_step, 9)))
