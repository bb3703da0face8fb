"""Tokenizers: tokenizer.json, sentencepiece tokenizer.model, or a GGUF's vocabulary.

Every source becomes one `tokenizers.Tokenizer` (the Rust library Hugging Face uses),
built the way transformers builds it, so ids and decoded text match
`AutoTokenizer.from_pretrained(...)`:

* tokenizer.json is used as it is, its post-processor deciding BOS/EOS (transformers
  5 ignores the config's add_bos_token/add_eos_token when this file exists).
* tokenizer.model is read with sentencepiece and rebuilt as byte-fallback BPE (or
  Unigram) with a Metaspace pre-tokenizer, like transformers' LlamaTokenizer.
* A GGUF stores the vocabulary as metadata: "gpt2" files become byte-level BPE
  with their merges and split regex, "llama" files become the sentencepiece shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from cake.chat_template import render_chat_template, select_chat_template
from cake.errors import TokenizerError

_NAMED_SPECIAL = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes for GGUF `tokenizer.ggml.pre` values whose merges were learned on
# another split than GPT-2's; the rest keep ByteLevel's built-in GPT-2 regex.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "lfm2"),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O),
}


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

    def token_to_id(self, token: str) -> int | None:
        """The id of one token written as in the vocabulary, or None."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages`; encode it with add_special_tokens=False,
        since templates write BOS themselves."""
        if self.chat_template is None:
            raise TokenizerError(
                "the model has no chat template; use --raw to send the prompt as it is"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
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


# --- sentencepiece tokenizer.model


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message; enough to read a .model."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, value


def _spm_model_info(proto: bytes) -> tuple[int, set[int]]:
    """(trainer model_type: 1 unigram, 2 BPE, ...; ids of user-defined pieces).

    The sentencepiece API exposes neither; transformers reads them with protobuf.
    """
    model_type, user_defined, index = 1, set(), 0
    for field, value in _proto_fields(proto):
        if field == 1:  # ModelProto.pieces: SentencePiece.type is field 3
            if any(f == 3 and v == _USER_DEFINED for f, v in _proto_fields(value)):
                user_defined.add(index)
            index += 1
        elif field == 2:  # ModelProto.trainer_spec: TrainerSpec.model_type is field 3
            model_type = next((v for f, v in _proto_fields(value) if f == 3), 1)
    return model_type, user_defined


def _from_sentencepiece(file: Path) -> Tokenizer:
    import sentencepiece

    config, kwargs = _folder_settings(file.parent)
    try:
        proto = file.read_bytes()
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        model_type, user_defined = _spm_model_info(proto)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError/...
        raise TokenizerError(
            f"cannot load {file}: {err}; the file is corrupt or not a sentencepiece model"
        ) from err
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    if model_type == 2:  # BPE, rebuilt from the vocabulary as transformers does
        vocab = {piece: i for i, piece in enumerate(pieces)}
        model = models.BPE(
            vocab, _merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    else:
        scored = [(piece, sp.get_score(i)) for i, piece in enumerate(pieces)]
        has_bytes = any(sp.is_byte(i) for i in range(len(pieces)))
        unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        model = models.Unigram(scored, unk_id, byte_fallback=has_bytes)
    backend = _Backend(model)
    prefix = config.get("add_prefix_space")
    if prefix is None:  # the model's own normalizer says whether it adds "▁"
        prefix = sp.normalize("a").startswith("\u2581")
    scheme = "never" if not prefix else "always" if config.get("legacy") else "first"
    _sentencepiece_shape(backend, scheme)
    control = [
        AddedToken(p, normalized=False, special=sp.is_control(i))
        for i, p in enumerate(pieces)
        if sp.is_control(i) or i in user_defined
    ]
    named, added = _config_tokens(config)
    spm_ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    for name, index in spm_ids.items():
        if named[f"{name}_token"] is None and index >= 0:
            named[f"{name}_token"] = pieces[index]
    add_bos = config.get("add_bos_token", True)  # sentencepiece models start with BOS
    add_eos = config.get("add_eos_token", False)
    return _finish(backend, named, control + added, add_bos, add_eos, **kwargs)


def _sentencepiece_shape(backend: _Backend, prepend_scheme: str) -> None:
    """Pre-tokenizer and decoder of transformers' LlamaTokenizer: spaces become "▁",
    bytes come back from <0xNN> pieces, and the added leading space is dropped."""
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme=prepend_scheme, split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme != "never":
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def _merges(
    vocab: Mapping[str, int], scores: Mapping[str, float] | None = None
) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens,
    best first (by token score when given, else by token id)."""
    keys = scores if scores is not None else vocab
    found = []
    for token, key in keys.items():
        pairs = [
            (token[:i], token[i:], key)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        found += sorted(pairs, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in found]


# --- GGUF: the vocabulary stored as llama.cpp metadata


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies use."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> _Backend:
    """Byte-level BPE, like transformers' GPT2Tokenizer plus the file's split regex."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few files store a token as real text; the vocabulary spells it in bytes.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = _Backend(
        models.BPE(vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="")
    )
    split = _GGUF_SPLITS.get(pre or "")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
        if split
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def gguf_tokenizer(reader: Any) -> Tokenizer:
    """The tokenizer stored in an open `gguf.GGUFReader`'s metadata."""

    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(f"tokenizer.{key}")
        return default if field is None else field.contents()

    kind, tokens = meta("ggml.model"), meta("ggml.tokens")
    if not tokens:
        raise TokenizerError("the GGUF file has no tokenizer vocabulary")
    types = meta("ggml.token_type") or [1] * len(tokens)
    merges = meta("ggml.merges")
    if kind == "gpt2":
        backend = _byte_level(tokens, merges or [], meta("ggml.pre"))
        alphabet, add_bos = set(_bytes_to_unicode().values()), False
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = (
            [tuple(m.split(" ", 1)) for m in merges]
            if merges
            else _merges(
                vocab, dict(zip(tokens, meta("ggml.scores") or [], strict=False))
            )
        )
        backend = _Backend(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
        prefix = meta("ggml.add_space_prefix", True)
        _sentencepiece_shape(backend, "first" if prefix else "never")
        alphabet, add_bos = None, True  # llama.cpp adds BOS unless told otherwise
    else:
        raise TokenizerError(
            f"the GGUF tokenizer type {kind!r} is not supported; cake reads "
            "'gpt2' (byte-level BPE) and 'llama' (sentencepiece) vocabularies"
        )
    # Control tokens stay whole as special tokens; in a byte-level vocabulary one
    # spelled outside the byte alphabet is a llama.cpp mislabel and is skipped.
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind_ in zip(tokens, types, strict=False)
            if kind_ == _CONTROL and (alphabet is None or set(t) <= alphabet)
        ]
    )
    vocab = backend.get_vocab()
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, kind_ in zip(tokens, types, strict=False)
            if kind_ == _USER_DEFINED and t in vocab
        ]
    )
    ids = {n: meta(f"ggml.{key}_token_id") for n, key in _GGUF_IDS.items()}
    named = {
        f"{n}_token": tokens[i] if i is not None and 0 <= i < len(tokens) else None
        for n, i in ids.items()
    }
    eos_ids = [meta(f"ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    return _finish(
        backend,
        named,
        [],
        meta("ggml.add_bos_token", add_bos),
        meta("ggml.add_eos_token"),
        eos_token_ids=[i for i in eos_ids if i is not None],
        chat_template=meta("chat_template") or None,
    )


_GGUF_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def _from_gguf(path: Path) -> Tokenizer:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except Exception as err:  # numpy/struct errors on a truncated or foreign file
        raise TokenizerError(f"cannot read {path} as GGUF: {err}") from err
    return gguf_tokenizer(reader)
