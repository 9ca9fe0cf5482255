"""Progress of a long run: a tqdm bar when tqdm is importable, else one plain line per step."""

from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    """Counts units of work up to ``total``; ``advance(label)`` after each one."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.done = 0
        self.enabled = enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def advance(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_description(label, refresh=False)
            self._bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
