"""ConfigError, the one error of every configuration check, and how several problems are listed."""
from __future__ import annotations


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the problem and the fix."""


def listing(title: str, problems: list[str]) -> str:
    """One problem: one line; several: one per line."""
    if len(problems) == 1:
        return f"{title}: {problems[0]}"
    return f"{title}:\n  - " + "\n  - ".join(problems)
