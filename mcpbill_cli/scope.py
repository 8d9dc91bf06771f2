"""Tool patterns, shared by token scopes and pricing free tiers.

``*`` matches every tool, ``db.*`` every tool under ``db.`` (``db.x.y`` too), anything else
exactly itself. Two patterns either nest or are disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NAME_LENGTH = 128  # MCP's own limit for tool names


def matches(pattern: str, tool: str) -> bool:
    """True when ``pattern`` matches the tool named ``tool``."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return tool.startswith(pattern[:-1])
    return pattern == tool


def in_scope(scope: Sequence[str], tool: str) -> bool:
    """True when any pattern of ``scope`` matches ``tool``."""
    return any(matches(pattern, tool) for pattern in scope)


def covers(wide: str, narrow: str) -> bool:
    """True when every tool ``narrow`` matches is also matched by ``wide``."""
    if wide == "*":
        return True
    if narrow == "*":
        return False
    return matches(wide, narrow[:-1] if narrow.endswith(".*") else narrow)


def within(narrow: Sequence[str], wide: Sequence[str]) -> bool:
    """True when every pattern of ``narrow`` is covered by one of ``wide`` (never wider)."""
    return all(any(covers(w, n) for w in wide) for n in narrow)


def overlap(first: str, second: str) -> str | None:
    """The tools both patterns match, as a pattern (the narrower one), or None."""
    if covers(first, second):
        return second
    if covers(second, first):
        return first
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid tool pattern, or None when it is."""
    if pattern == "*":
        return None
    stem = pattern[:-2] if pattern.endswith(".*") else pattern
    if not stem or "*" in stem:
        return f"pattern {pattern!r} is not valid: use '*', a prefix like 'read.*', or a tool name"
    if stem != stem.strip() or not stem.isprintable() or any(c.isspace() for c in stem):
        return f"pattern {pattern!r} must be printable text without spaces"
    if len(stem) > MAX_NAME_LENGTH:
        return f"pattern {pattern[:20]!r}... is longer than {MAX_NAME_LENGTH} characters"
    return None
