"""The statement's structured content (sections of paragraphs, bullet lists and tables) and its number formats.

Guarantees
----------
* A :class:`Section` holds only text blocks: a ``str`` (paragraph, inline markdown), a
  ``list[str]`` (bullets) or a :class:`Table`; the markdown and HTML renderers
  (:mod:`carbonfed.federation.report.markup`) turn the very same blocks into both outputs.
* The formats never add digits a value does not have (:func:`fmt_g`) and show a missing value
  as "—".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    html_id: str | None = None


@dataclass
class Section:
    key: str
    title: str
    blocks: list = field(default_factory=list)   # str (paragraph) | list[str] (bullets) | Table


def fmt_g(x, digits: int = 12) -> str:
    """A float as stored, without spurious digits (1.9501953125, 1e-05)."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return format(float(x), f".{digits}g")


def fmt_f4(x) -> str:
    """Four decimals, or "—"."""
    return "—" if x is None else f"{float(x):.4f}"


def fmt_range(values) -> str:
    """The one distinct value, or "min … max (n values)", or "—" (None values ignored)."""
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return "—"
    return fmt_g(vals[0]) if len(vals) == 1 else f"{fmt_g(vals[0])} … {fmt_g(vals[-1])} ({len(vals)} values)"
