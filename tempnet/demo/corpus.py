"""The demo's text: Python's own bundled documentation by default, or a user's file."""

from __future__ import annotations

from pathlib import Path

DEFAULT_SOURCE = "pydoc_data.topics"


def load_text(path: str | Path | None = None) -> tuple[str, str]:
    """Return ``(text, source)``: the UTF-8 file at ``path``, or, when ``path`` is ``None``, the
    help topics of the running Python (``pydoc_data.topics``, ~0.5 MB of English and code)."""
    if path is not None:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        return text, str(path)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)), DEFAULT_SOURCE


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split ``text`` into ``(train, validation)``: the validation part is the last
    ``val_fraction`` of the characters, cut at a line break so no line is shared."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1 - val_fraction))
    line_break = text.rfind("\n", 0, cut)
    cut = line_break + 1 if line_break > 0 else cut
    return text[:cut], text[cut:]
