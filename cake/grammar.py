"""Constrained decoding: every drawn token must keep the text inside a grammar
(a JSON schema, a Lark grammar), so JSON output always parses. llguidance
computes, for each step, the set of tokens the grammar allows; the engine sets
the others' logits to -inf before it samples.

A grammar is llguidance's serialized form (a str), made by `json_grammar` or
`lark_grammar` from what a request asked for; `Grammars.check` validates it
against the model's vocabulary and `Grammars.constraint` starts one sequence's
matcher.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from cake.errors import CakeError


class GrammarError(CakeError):
    """A schema or grammar that cannot be compiled, or a constraint that no token
    of the vocabulary can follow."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text valid under `schema`; None: any JSON object."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else schema
        )
    except ValueError as e:
        raise GrammarError(f"the JSON schema is not valid: {e}") from None


def lark_grammar(lark: str) -> str:
    """The grammar of a Lark text (llguidance's dialect: `%json {...}` embeds a
    JSON schema)."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(lark)


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, n_vocab: int) -> None:
        self._m = matcher
        self._n = n_vocab

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` (V,) with every token the grammar forbids at -inf (a copy)."""
        bits = np.frombuffer(self._m.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self._n].astype(bool)
        if self._m.is_error() or not allowed.any():
            raise GrammarError(
                f"the output cannot go on within its grammar: {self._m.get_error()}"
            )
        out = np.full(logits.shape, -np.inf, np.float32)
        v = min(logits.shape[-1], self._n)  # ids past the vocabulary: never allowed
        out[:v] = np.where(allowed[:v], logits[:v], np.float32(-np.inf))
        return out

    def accept(self, token: int) -> None:
        """Advance past a drawn token (one `mask` allowed)."""
        if not self._m.consume_token(int(token)):
            raise GrammarError(
                f"the grammar refused token {token}: {self._m.get_error()}"
            )

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows no further text (only EOS)."""
        return self._m.is_stopped()


class Grammars:
    """The grammars of one model's vocabulary. Building llguidance's view of the
    vocabulary takes ~0.2 s (SmolLM2's 49k tokens), so it happens once, at the
    first constrained request."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ll = None
        self._lock = threading.Lock()  # the server's loop and the engine's thread

    def prepare(self) -> None:
        """Build the vocabulary's view now (cake serve does, in a thread at start,
        so that the first constrained request does not wait 0.2 s in the loop).
        A failure is left for that request to report."""
        try:
            self._vocab()
        except GrammarError:
            pass

    def _vocab(self):
        with self._lock:
            if self._ll is None:
                from llguidance import LLTokenizer

                tok = self._tokenizer
                try:
                    self._ll = LLTokenizer(
                        tok.to_json(), eos_token=sorted(tok.eos_token_ids) or None
                    )
                except Exception as e:  # llguidance's own errors: one line
                    raise GrammarError(
                        f"this model's tokenizer cannot constrain decoding: {e}"
                    ) from None
            return self._ll

    def check(self, grammar: str) -> None:
        """GrammarError if `grammar` does not compile for this vocabulary."""
        from llguidance import LLMatcher

        failed, messages = LLMatcher.validate_grammar_with_warnings(
            grammar, self._vocab()
        )
        if failed:
            raise GrammarError(f"the grammar is not valid: {messages[0]}")

    def constraint(self, grammar: str) -> Constraint:
        from llguidance import LLMatcher

        ll = self._vocab()
        m = LLMatcher(ll, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"the grammar is not valid: {m.get_error()}")
        return Constraint(m, ll.vocab_size)
