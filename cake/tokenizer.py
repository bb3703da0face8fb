"""Tokenizers: tokenizer.json, sentencepiece tokenizer.model, or a GGUF's vocabulary.

Every source becomes one `tokenizers.Tokenizer` (the Rust library Hugging Face uses):

* tokenizer.json is used as it is, its post-processor deciding BOS/EOS (transformers
  5 ignores the config's add_bos_token/add_eos_token when this file exists), so ids
  and decoded text match `AutoTokenizer.from_pretrained(...)`.
* tokenizer.model is read with sentencepiece and rebuilt as byte-fallback BPE (or
  Unigram) with the model's normalizer, so ids match `SentencePieceProcessor.encode`
  (special tokens in the text are parsed, as transformers does).
* A GGUF stores the vocabulary as metadata: "gpt2" files become byte-level BPE
  with their merges and split regex, as transformers builds them; "llama" files
  are sentencepiece vocabularies, built as a tokenizer.model is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, models, processors
from tokenizers import Tokenizer as _Backend

from cake.chat_template import render_chat_template, select_chat_template
from cake.errors import TokenizerError

_NAMED_SPECIAL = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4


class StreamDecoder:
    """Turns token ids into text as they arrive, one push per generated token.

    Text is held back while it ends in U+FFFD, that is while a multi-byte character
    is still incomplete (byte-level pieces or byte-fallback tokens like `<0xE2>`).
    Every push decodes a short window of ids, so a token's text may depend on its
    neighbours (leading-space stripping, byte grouping) exactly as in `decode`:
    the pushes plus `flush()` concatenate to `tokenizer.decode(all_ids)`. (One
    exception: where byte-fallback tokens form invalid UTF-8, `decode` turns their
    whole run into U+FFFD, including characters this decoder already emitted.)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # ids[prefix:read] are emitted and decode (as a window) to `_window_text`;
        # ids[read:] are pending. Windows stay a few tokens long.
        self._prefix = 0
        self._read = 0
        self._window_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _advance(self, final: bool) -> str:
        emitted = self._window_text
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        # The next window starts at the ids emitted now, unless they decode to
        # nothing alone (a skipped special token): a decoder that strips the
        # window's leading space would then eat a space of the tokens after them.
        fresh = self._decode(self._ids[self._read :])
        if fresh:
            self._prefix, self._window_text = self._read, fresh
        else:
            self._window_text = text
        self._read = len(self._ids)
        return text[len(emitted) :]

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is open)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back (incomplete bytes become U+FFFD)."""
        return self._advance(final=True)


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str | None],
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self._backend = backend
        # "bos_token" -> "<s>", ...: the variables a chat template sees.
        self.special_tokens = {k: v for k, v in special_tokens.items() if v}
        self.chat_template = chat_template
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos else None
        eos = self.special_tokens.get("eos_token")
        eos_ids = {int(i) for i in eos_token_ids}
        if eos and backend.token_to_id(eos) is not None:
            eos_ids.add(backend.token_to_id(eos))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # transformers ignores clean-up for BPE: it would delete real spaces.
        self._clean_up = clean_up_tokenization_spaces and not isinstance(
            backend.model, models.BPE
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS are added as the model's config says."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as transformers' `decode` gives it."""
        text = self._backend.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )
        if self._clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def to_json(self) -> str:
        """The vocabulary and pipeline as a Hugging Face tokenizer.json text."""
        return self._backend.to_str()

    def token_to_id(self, token: str) -> int | None:
        """The id of one token written as in the vocabulary, or None."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for `messages`; encode it with add_special_tokens=False,
        since templates write BOS themselves. `extra`: further template variables
        (tools=[...], as transformers passes them)."""
        if self.chat_template is None:
            raise TokenizerError(
                "the model has no chat template; use --raw to send the prompt as it is"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **extra,
        )

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for generated ids that never splits a UTF-8 character."""
        return StreamDecoder(self, skip_special_tokens)


_CLEAN_UP = [
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
]  # fmt: skip


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a model folder, a .gguf file, a tokenizer.json or a
    sentencepiece tokenizer.model (with the configs in its folder, if any)."""
    from cake.tokenizer_vocab import _from_sentencepiece

    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return _from_sentencepiece(path / "tokenizer.model")
        raise TokenizerError(
            f"{path} has neither tokenizer.json nor tokenizer.model; "
            "point --model at a Hugging Face model folder or a .gguf file"
        )
    if not path.is_file():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    from cake.tokenizer_vocab import _from_gguf, _from_sentencepiece

    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".json":
        return _from_tokenizer_json(path)
    if path.suffix == ".model":
        return _from_sentencepiece(path)
    raise TokenizerError(
        f"{path} is not a tokenizer: expected a folder, .gguf, tokenizer.json "
        "or tokenizer.model"
    )


# --- model folders: tokenizer_config.json, chat_template.jinja, generation_config


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TokenizerError(f"cannot read {path}: {err}") from err
    return value if isinstance(value, dict) else {}


def _content(token: Any) -> str | None:
    # Config files write a token as a string or as an AddedToken dict.
    if isinstance(token, Mapping):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _folder_settings(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config, Tokenizer keyword arguments) read from a model folder."""
    config = _read_json(folder / "tokenizer_config.json")
    # transformers 5 saves the template as chat_template.jinja, and reads it first.
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    template = template or select_chat_template(config.get("chat_template"))
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return config, {
        "chat_template": template,
        "eos_token_ids": [int(i) for i in eos_ids],
        "clean_up_tokenization_spaces": bool(
            config.get("clean_up_tokenization_spaces")
        ),
    }


def _config_tokens(config: Mapping[str, Any]) -> tuple[dict[str, str | None], list]:
    """The named special tokens and the other added tokens a tokenizer_config lists."""
    named = {f"{n}_token": _content(config.get(f"{n}_token")) for n in _NAMED_SPECIAL}
    added = []
    for _, token in sorted((config.get("added_tokens_decoder") or {}).items()):
        if isinstance(token, Mapping) and _content(token):
            flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
            added.append(
                AddedToken(
                    token["content"], **{k: token[k] for k in flags if k in token}
                )
            )
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or []
        extra = list(extra.values()) if isinstance(extra, Mapping) else extra
        added += [AddedToken(t, special=True) for t in map(_content, extra) if t]
    return named, added


def _finish(
    backend: _Backend,
    named: dict[str, str | None],
    added: Sequence[AddedToken],
    add_bos: bool | None,
    add_eos: bool | None,
    **kwargs: Any,
) -> Tokenizer:
    """Add missing special tokens and set BOS/EOS, as transformers' backend does.

    add_bos/add_eos None keep the backend's own post-processor, if it has one.
    """
    have = {t.content for t in backend.get_added_tokens_decoder().values()}
    named_added = [AddedToken(t, special=True) for t in named.values() if t]
    for token in [*added, *named_added]:
        if token.content not in have:
            have.add(token.content)
            add = backend.add_special_tokens if token.special else backend.add_tokens
            add([token])
    if add_bos is not None or add_eos is not None or backend.post_processor is None:
        bos = named.get("bos_token") if add_bos else None
        eos = named.get("eos_token") if add_eos else None

        a = " ".join(filter(None, [bos and f"{bos}:0", "$A:0", eos and f"{eos}:0"]))
        b = " ".join(filter(None, [bos and f"{bos}:1", "$B:1", eos and f"{eos}:1"]))
        ends = dict.fromkeys(t for t in (bos, eos) if t)
        backend.post_processor = processors.TemplateProcessing(
            single=a,
            pair=f"{a} {b}",
            special_tokens=[(t, backend.token_to_id(t)) for t in ends],
        )
    backend.no_truncation()
    backend.no_padding()
    return Tokenizer(backend, special_tokens=named, **kwargs)


def _from_tokenizer_json(file: Path) -> Tokenizer:
    config, kwargs = _folder_settings(file.parent)
    try:
        backend = _Backend.from_file(str(file))
    except Exception as err:  # the Rust side raises plain Exception
        raise TokenizerError(
            f"cannot load {file}: {err}; the file is corrupt or not a tokenizer.json"
        ) from err
    named, added = _config_tokens(config)
    # transformers 5 ignores the config's add_bos_token/add_eos_token when there
    # is a tokenizer.json: its post-processor decides.
    return _finish(backend, named, added, None, None, **kwargs)
