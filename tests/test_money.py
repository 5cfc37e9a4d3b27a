from __future__ import annotations

import pytest

from extproc.money import (
    FREE_PRICE,
    MICRO,
    UNBOUNDED,
    Price,
    format_credits,
    max_affordable_completion,
    parse_credits,
    token_cost,
)


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("1234.5", 1_234_500_000),
        ("0", 0),
        ("0.000001", 1),
        (".25", 250_000),
        ("-3", -3_000_000),
        ("-0.5", -500_000),
        (" 7 ", 7_000_000),
        (12, 12_000_000),
        (-2, -2_000_000),
        (0.1, 100_000),
        (1.000001, 1_000_001),
        ("1e3", 1_000_000_000),
    ],
)
def test_parse_credits(value: str | int | float, micro: int) -> None:
    assert parse_credits(value) == micro


@pytest.mark.parametrize(
    "value", ["", "abc", "1.2.3", "--1", "+-1", "1,5", "nan", "inf", "0x10", "1 000", "١٢"]
)
def test_parse_credits_rejects_garbage(value: str) -> None:
    with pytest.raises(ValueError, match="expected an amount of credits"):
        parse_credits(value)


@pytest.mark.parametrize("value", ["0.0000001", "1.1234567", 1e-7, "-0.0000005"])
def test_parse_credits_rejects_more_than_six_decimals(value: str | float) -> None:
    with pytest.raises(ValueError, match="at most 6 decimal places"):
        parse_credits(value)


def test_parse_credits_rejects_non_numbers() -> None:
    for value in (True, None, [1]):
        with pytest.raises(ValueError):
            parse_credits(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too large"):
        parse_credits("1e100000000")


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (1_234_500_000, "1234.50"),
        (123, "0.000123"),
        (-3_000_000, "-3.00"),
        (0, "0.00"),
        (1, "0.000001"),
        (-1, "-0.000001"),
        (10_000, "0.01"),
        (1_230_000, "1.23"),
        (1_234_000, "1.234"),
        (MICRO * 10**9 + 5, "1000000000.000005"),
    ],
)
def test_format_credits(micro: int, text: str) -> None:
    assert format_credits(micro) == text


def test_round_trips() -> None:
    for micro in [0, 1, -1, 99, 100_000, 1_234_500_000, -3_000_000, 987_654_321_012, 2**53 - 1]:
        assert parse_credits(format_credits(micro)) == micro
    for text in ["0.01", "1234.50", "0.000123", "-3.00", "12.345678"]:
        assert format_credits(parse_credits(text)) == text


def test_token_cost_rounds_up_to_a_micro_credit() -> None:
    price = Price(input_per_1m=2_000_000, output_per_1m=6_000_000, per_request=100)
    assert token_cost(price, 0, 0) == 100
    assert token_cost(price, 100, 50) == 200 + 300 + 100
    assert token_cost(Price(input_per_1m=1), 1, 0) == 1  # 1e-6 µcr rounds up to 1
    assert token_cost(Price(input_per_1m=1), 1_000_000, 0) == 1
    assert token_cost(Price(input_per_1m=1), 1_000_001, 0) == 2
    # the rounding is on the sum, not per side
    assert token_cost(Price(input_per_1m=500_000, output_per_1m=500_000), 1, 1) == 1
    assert token_cost(FREE_PRICE, 10**6, 10**6) == 0


def test_max_affordable_completion_edges() -> None:
    price = Price(input_per_1m=2_000_000, output_per_1m=6_000_000, per_request=100)
    # (1000 - 100) * 1e6 - 100 * 2e6 = 700e6 -> 116 tokens (116 * 6 = 696 µcr)
    assert max_affordable_completion(price, 100, 1000) == 116
    assert token_cost(price, 100, 116) <= 1000 < token_cost(price, 100, 117)
    assert max_affordable_completion(price, 100, 300) == 0  # exactly the prompt and the fee
    assert max_affordable_completion(price, 100, 299) == -1
    assert max_affordable_completion(price, 0, 99) == -1  # not even the request fee
    assert max_affordable_completion(Price(input_per_1m=5), 10, 1) == UNBOUNDED
    assert max_affordable_completion(Price(input_per_1m=5, per_request=2), 10, 1) == -1
    assert max_affordable_completion(FREE_PRICE, 0, 0) == UNBOUNDED
    assert max_affordable_completion(price, 0, -5) == -1


def test_max_affordable_completion_is_the_largest() -> None:
    prices = [
        Price(input_per_1m=3, output_per_1m=7, per_request=1),
        Price(input_per_1m=150_000, output_per_1m=600_000),
        Price(input_per_1m=999_999, output_per_1m=1_000_001, per_request=5),
    ]
    for price in prices:
        for prompt in (0, 1, 13, 1000):
            for available in (0, 1, 2, 50, 999, 123_457):
                c = max_affordable_completion(price, prompt, available)
                if c < 0:
                    assert token_cost(price, prompt, 0) > available
                else:
                    assert token_cost(price, prompt, c) <= available
                    assert token_cost(price, prompt, c + 1) > available
