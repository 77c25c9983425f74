"""The error budget of an import: how many rejected rows a batch may have and still pass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorBudget:
    count: int | None = None  # at most this many rejected rows
    fraction: float | None = None  # or at most this share of all rows

    @classmethod
    def parse(cls, text: str) -> ErrorBudget:
        """'100' (rows) or '1%' / '0.5%' (of all rows in the file)."""
        raw = str(text).strip()
        try:
            if raw.endswith("%"):
                pct = float(raw[:-1])
                if not 0 <= pct <= 100:
                    raise ValueError
                return cls(fraction=pct / 100)
            count = int(raw)
            if count < 0:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise ValueError(
                f"--max-rejects {text!r}: expected a row count (e.g. 100) or a percentage "
                "of the rows (e.g. 1%)"
            ) from None

    def exceeded(self, rejected: int, total: int) -> bool:
        if self.count is not None:
            return rejected > self.count
        return total > 0 and rejected / total > (self.fraction or 0.0)

    def __str__(self) -> str:
        if self.count is not None:
            return f"{self.count} rows"
        return f"{(self.fraction or 0) * 100:g}% of the rows"
