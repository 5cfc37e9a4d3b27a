"""What a request is estimated to need before it runs: its prompt's tokens, how many sequences
it makes the backend generate (each up to max_tokens), the prompt that has to fit the context,
and the bounds on ``n`` and ``best_of``."""

from __future__ import annotations

from typing import Any

import pytest

from extproc import validation
from extproc.errors import GatewayError
from extproc.tokens import estimate_prompt_tokens, longest_prompt_tokens, sequences

HELLO = [{"role": "user", "content": "hi"}]


def test_the_prompt_estimate_counts_at_least_a_token_a_word() -> None:
    """Bytes / 3 over-counts English (~4 bytes a token) but not text of short words, which a
    BPE tokenizer reads at one token a word (" a", " 1"): the estimate is a ceiling for both."""
    english = "The toll booth counts every car that passes through the gate."
    assert estimate_prompt_tokens("completions", {"prompt": english}) == -(-len(english) // 3)
    assert estimate_prompt_tokens("completions", {"prompt": "a " * 2000}) == 2001
    assert estimate_prompt_tokens("completions", {"prompt": "1 2 3"}) == 3
    assert estimate_prompt_tokens("completions", {"prompt": ""}) == 0
    chat = {"messages": [{"role": "user", "content": "a " * 300}]}
    assert estimate_prompt_tokens("chat", chat) == 3 + 4 + 301


@pytest.mark.parametrize(
    ("op", "body", "expected"),
    [
        ("chat", {"messages": HELLO}, 1),
        ("chat", {"messages": HELLO, "n": 1}, 1),
        ("chat", {"messages": HELLO, "n": 5}, 5),
        ("chat", {"messages": HELLO, "n": None}, 1),
        ("completions", {"prompt": "once"}, 1),
        ("completions", {"prompt": "once", "n": 3}, 3),
        ("completions", {"prompt": [1, 2, 3]}, 1),  # one prompt of token ids
        ("completions", {"prompt": ["a", "b", "c"]}, 3),  # a batch: one choice each
        ("completions", {"prompt": [[1, 2], [3]], "n": 2}, 4),
        ("completions", {"prompt": "once", "n": 2, "best_of": 5}, 5),  # all 5 are generated
        ("completions", {"prompt": ["a", "b"], "n": 3, "best_of": 2}, 6),
        ("embeddings", {"input": ["a", "b"]}, 1),
    ],
)
def test_sequences(op: str, body: dict[str, Any], expected: int) -> None:
    assert sequences(op, body) == expected


def test_a_batch_fits_the_context_by_its_longest_prompt() -> None:
    body = {"prompt": ["x" * 300, "x" * 30, [1] * 120]}
    total = estimate_prompt_tokens("completions", body)
    assert total == 100 + 10 + 120
    assert longest_prompt_tokens("completions", body, total) == 120
    one = {"prompt": "x" * 300}
    assert longest_prompt_tokens("completions", one, 100) == 100
    chat = {"messages": HELLO}
    assert longest_prompt_tokens("chat", chat, 9) == 9


@pytest.mark.parametrize(
    ("check", "body", "param"),
    [
        (validation.chat, {"messages": HELLO, "n": 0}, "n"),
        (validation.chat, {"messages": HELLO, "n": 129}, "n"),
        (validation.chat, {"messages": HELLO, "n": 1.5}, "n"),
        (validation.chat, {"messages": HELLO, "n": "2"}, "n"),
        (validation.chat, {"messages": HELLO, "n": True}, "n"),
        (validation.completions, {"prompt": "p", "n": 200}, "n"),
        (validation.completions, {"prompt": "p", "best_of": 21}, "best_of"),
        (validation.completions, {"prompt": "p", "best_of": 0}, "best_of"),
    ],
)
def test_n_and_best_of_out_of_bounds(check: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as err:
        check(body)
    assert err.value.code == "invalid_request_error" and err.value.param == param


def test_n_and_best_of_within_bounds() -> None:
    validation.chat({"messages": HELLO, "n": 128})
    validation.completions({"prompt": "p", "n": 128, "best_of": 20})


def test_a_worst_case_beyond_exact_pricing_is_a_400_before_the_store() -> None:
    """n x max_tokens (x the prompts of a batch) priced past 2^53 micro-credits cannot be
    reserved exactly: the client is told which field to lower, and the store is not called."""
    import asyncio
    from types import SimpleNamespace

    from extproc.config import Limits, parse_config
    from extproc.ledger import Ledger
    from extproc.metering import Meter
    from tests.harness import base_config

    cfg = parse_config(base_config())
    meter = Meter(cfg, Ledger.__new__(Ledger))  # no store: reaching it would fail differently
    model = cfg.models_by_id["sim-chat"]
    principal = SimpleNamespace(
        account="a", key_hash="h", key_prefix="tg_h", limits=Limits(), models=None
    )
    # PRICE: 2 credits per 1M output tokens, 2e6 micro-credits: 2^53 is ~4.5e9 tokens
    body = {"prompt": ["p"] * 80_000, "n": 128, "max_tokens": 512}
    with pytest.raises(GatewayError) as err:
        asyncio.run(meter.reserve("r1", principal, model, "completions", body, "vllm-chat"))
    assert err.value.code == "invalid_request_error" and err.value.param == "n"


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ([None], "input[0]"),
        (["a", None], "input[1]"),
        (["a", 3], "input[1]"),
        ([1, 2, "3"], "input[2]"),
        ([1, True], "input[1]"),
        ([[1, 2], [3, "x"]], "input[1]"),
        ([[1], []], "input[1]"),
        ([{"text": "a"}], "input[0]"),
    ],
)
def test_embeddings_input_items_are_checked(value: list[Any], param: str) -> None:
    """Each item of an embeddings array is what OpenAI takes (strings, token ids, or lists of
    ids, one kind per array): before, any other item reached the backend, whose 400 had no
    ``param``."""
    with pytest.raises(GatewayError) as err:
        validation.embeddings({"input": value})
    assert err.value.param == param


def test_embeddings_input_forms_accepted() -> None:
    for value in (["a", "b"], [1, 2, 3], [[1, 2], [3]], "text"):
        validation.embeddings({"input": value})
