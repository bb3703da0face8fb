"""Constrained decoding (cake.grammar, llguidance) on the real small model: what
it samples under a grammar always parses, and a constrained request leaves the
others in its batch untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import cake
from cake.grammar import GrammarError, json_grammar, lark_grammar
from cake.request import Request
from cake.sampling import SamplingParams
from tests.smollm import smollm_gguf

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    m = cake.load(smollm_gguf(), backend="jax", max_sequences=4, max_context=256)
    yield m
    m.close()


def ask(model, text: str) -> list[int]:
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": text}])
    return tok.encode(prompt, add_special_tokens=False)


def run(model, reqs: list[Request]) -> list[tuple[str, str]]:
    """(text, finish) of each request, run together in one batch."""
    texts: list[list[str]] = [[] for _ in reqs]
    finish: list[str] = ["" for _ in reqs]
    for i, r in enumerate(reqs):

        def got(ev, i=i):
            texts[i].append(ev.text)
            if ev.error is not None:
                raise AssertionError(f"request {i} failed: {ev.error}")
            finish[i] = ev.finish or finish[i]

        r.on_event = got
        model.engine.submit(r)
    while not all(r.done for r in reqs):
        model.engine.step()
    return [("".join(t), f) for t, f in zip(texts, finish, strict=True)]


def test_sampled_json_always_validates_against_its_schema(model):
    ids = ask(model, "Describe a person as JSON.")
    g = json_grammar(PERSON)
    reqs = [
        Request(ids, SamplingParams(temperature=1.5, seed=s), 80, grammar=g)
        for s in range(4)
    ]
    for text, finish in run(model, reqs):
        assert finish == "eos", text  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_mode_gives_an_object(model):
    ids = ask(model, "List three colours.")
    ((text, finish),) = run(
        model,
        [Request(ids, SamplingParams(temperature=0), 120, grammar=json_grammar(None))],
    )
    assert finish == "eos", text
    assert isinstance(json.loads(text), dict)


def test_a_lark_grammar_shapes_the_whole_output(model):
    g = lark_grammar(r'start: /[A-Z][a-z]{2,8}/ "-" /[0-9]{3}/')
    ids = ask(model, "Invent a product code.")
    reqs = [
        Request(ids, SamplingParams(temperature=1.0, seed=s), 40, grammar=g)
        for s in range(3)
    ]
    for text, finish in run(model, reqs):
        assert finish == "eos"
        assert re.fullmatch(r"[A-Z][a-z]{2,8}-[0-9]{3}", text), text


def test_a_constrained_request_leaves_its_batch_neighbours_alone(model):
    ids = ask(model, "What is the capital of France?")
    ((alone, _),) = run(model, [Request(ids, SamplingParams(temperature=0), 16)])
    g = json_grammar(PERSON)
    together = run(
        model,
        [
            Request(
                ask(model, "A person, please."),
                SamplingParams(temperature=0),
                120,
                grammar=g,
            ),
            Request(ids, SamplingParams(temperature=0), 16),
        ],
    )
    assert together[1][0] == alone
    assert together[0][1] == "eos", together[0][0]
    jsonschema.validate(json.loads(together[0][0]), PERSON)


def test_a_schema_that_cannot_compile_is_one_clear_error(model):
    g = json_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(GrammarError, match="nowhere"):
        model.engine.grammars.check(g)
    with pytest.raises(GrammarError, match="grammar"):
        model.engine.grammars.check(lark_grammar("start: (("))
