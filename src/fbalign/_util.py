"""Small helpers shared by the configuration, models and data modules."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any


def check_options(factory: Callable[..., Any], options: dict[str, Any], what: str,
                  supplied: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the valid options when ``factory`` does not accept ``options``.

    ``supplied`` names arguments filled in automatically, which the user may not set.
    """
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call itself complain
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in supplied]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{what} has no option {', '.join(map(repr, unknown))}; its options are: "
                         f"{', '.join(valid) or 'none'}")
