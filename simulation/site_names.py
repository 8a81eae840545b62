"""Site names in narrow tables: kept whole when they fit, else short codes with a legend.

Rich shrinks a column that does not fit to "hospi…", which makes sites indistinguishable
when output is piped or the terminal is 80 columns wide. A `SiteLegend` decides once, from the
console width, whether names are shown whole or as S1, S2, ... with a legend line printed
beside the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text


@dataclass(frozen=True)
class SiteLegend:
    """Name -> what a table shows for it."""

    codes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_width(cls, names: list[str], width: int, share: float = 1 / 3) -> SiteLegend:
        """Abbreviate when all names joined by ", " would take more than ``share`` of the
        width (a table cell listing the sites must still fit beside the other columns)."""
        unique = list(dict.fromkeys(names))
        if len(", ".join(unique)) <= int(width * share):
            return cls()
        return cls({name: f"S{index + 1}" for index, name in enumerate(unique)})

    @classmethod
    def for_column(cls, names: list[str], room: int) -> SiteLegend:
        """Abbreviate when the longest name is wider than ``room`` (a column of its own)."""
        unique = list(dict.fromkeys(names))
        if max(map(len, unique), default=0) <= room:
            return cls()
        return cls({name: f"S{index + 1}" for index, name in enumerate(unique)})

    @property
    def abbreviated(self) -> bool:
        return bool(self.codes)

    def short(self, name: str) -> str:
        return self.codes.get(name, name)

    def text(self) -> Text:
        """``sites: S1 = hospital_a, S2 = hospital_b`` (wraps at spaces, never cut)."""
        pairs = ", ".join(f"{code} = {name}" for name, code in self.codes.items())
        return Text(f"sites: {pairs}", overflow="fold")
