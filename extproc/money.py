"""Money: integer micro-credits, prices and the cost formulas.

1 credit = 1_000_000 micro-credits (µcr). Every amount in the store and in the code is an int of
µcr; credits as decimals appear only at the edges (config, CLI, headers). The two formulas here,
``token_cost`` and ``max_affordable_completion``, are mirrored in Lua by extproc/store_scripts.py
(the reservation clamps ``max_tokens`` with them); tests/test_ledger.py checks they agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MICRO = 1_000_000
DECIMALS = 6
UNBOUNDED = 2**31  # max_affordable_completion: "money does not bound the completion"

_CREDITS_RE = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_credits(value: str | int | float) -> int:
    """Credits ("1234.5", 12, 0.25) -> micro-credits (1_234_500_000, ...), exactly.

    Floats go through ``str(value)`` so 0.1 means 0.1, not its binary approximation.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected an amount of credits, got {value!r}")
    if isinstance(value, int):
        return value * MICRO
    text = str(value).strip() if isinstance(value, float | str) else None
    if not text or not _CREDITS_RE.fullmatch(text):
        raise ValueError(f"expected an amount of credits such as 12 or '0.25', got {value!r}")
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"expected an amount of credits, got {value!r}") from None
    if amount and amount.adjusted() > 15:
        raise ValueError(f"amount of credits too large: {value!r}")
    micro = amount * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"credits take at most {DECIMALS} decimal places, got {value!r}")
    return int(micro)


def format_credits(micro: int) -> str:
    """Micro-credits -> credits with 2 to 6 decimals: 1_234_500_000 -> "1234.50"."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price in µcr: per 1M input/output tokens, per request, image, audio second,
    per 1M characters of speech input."""

    input_per_1m: int = 0
    output_per_1m: int = 0
    per_request: int = 0
    per_image: int = 0
    per_audio_second: int = 0
    per_1m_characters: int = 0


FREE_PRICE = Price()


def token_cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """µcr for a text request: token prices rounded up to a whole µcr, plus the request fee."""
    weighted = prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m
    return -(-weighted // MICRO) + price.per_request


def max_affordable_completion(price: Price, prompt_tokens: int, available: int) -> int:
    """The most completion tokens ``available`` µcr pay for, with ``prompt_tokens`` of input.

    -1 when even an empty completion is too expensive; ``UNBOUNDED`` when output is free.
    Derivation: ceil(w / 1e6) <= B  <=>  w <= B * 1e6 for an integer budget B.
    """
    budget = (available - price.per_request) * MICRO - prompt_tokens * price.input_per_1m
    if budget < 0:
        return -1
    if price.output_per_1m == 0:
        return UNBOUNDED
    return budget // price.output_per_1m
