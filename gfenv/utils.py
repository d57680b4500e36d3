"""Small helpers shared by the command-line scripts."""

from __future__ import annotations

from typing import Any


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'}; refuses an item without '='."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"Expected key=value, got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out
