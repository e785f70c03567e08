"""Errors a caller can act on. Each names the input it concerns (its `loc`)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: `loc` names the argument or field (e.g. ("q",) or ("window", "left"))."""

    def __init__(self, loc: str | tuple[str | int, ...], msg: str) -> None:
        self.loc: tuple[str | int, ...] = (loc,) if isinstance(loc, str) else tuple(loc)
        self.msg = msg
        super().__init__(f"{'.'.join(map(str, self.loc))}: {msg}")


class LimitError(InputError):
    """Input larger than a configured limit (HTTP answers 413)."""
