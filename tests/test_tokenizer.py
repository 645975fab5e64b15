"""daop.tokenizer against transformers.AutoTokenizer on tokenizers built here (offline, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from daop.errors import DaopError
from daop.tokenizer import StreamDecoder, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "Mixture-of-Experts models route every token to a few experts, so most weights stay idle.",
    "def forward(self, x):\n    return self.w2(F.silu(self.w1(x)) * self.w3(x))\n",
    "for i in range(10):\n\tprint(f'{i:03d}', end=' ')  # tabs and spaces   mixed",
    "Hello world! Hello there, world. It's a test; isn't it? We're done, they've gone.",
    "Emoji: 🤗 🚀 🎉 and CJK: 你好，世界。日本語のテキスト。 한국어 텍스트. Café naïve résumé.",
] * 3

TEXTS = [
    "Hello world!",
    " leading space and  double  spaces ",
    "def f(x):\n    return x ** 2\n\n",
    "Emoji 🤗🚀 mixed with 你好，世界 and 한국어 — plus naïve café",
    "unseen chars: ∮ 𝔘 ✓ Ω",
    "literal specials <s> and </s> inside text",
    "",
    "   ",
]

MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not loop.last or not add_generation_prompt %}{{ '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_end|>\n<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "Hi there 🤗, what is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 你好?"},
]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _write(directory: Path, backend: HFTokenizer, tok_config: dict, **extra_files: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **tok_config}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    for name, content in extra_files.items():
        (directory / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")
    return directory


def _byte_level(post_processor: bool = True) -> HFTokenizer:
    tok = HFTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=450, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def _sentencepiece(metaspace_decoder: bool) -> HFTokenizer:
    """Llama-style: BPE with byte_fallback (<0xNN> tokens), Metaspace pre-tokenizer, BOS via post-processor."""
    trained = HFTokenizer(BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    ascii_corpus = [line.encode("ascii", "ignore").decode() for line in CORPUS]  # non-ASCII -> byte fallback
    trained.train_from_iterator(ascii_corpus, BpeTrainer(vocab_size=300))
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = HFTokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    if metaspace_decoder:
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                         decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture
def byte_level_dir(tmp_path: Path) -> Path:
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True, "__type": "AddedToken"},
              "unk_token": "<unk>", "chat_template": MIXTRAL_TEMPLATE, "clean_up_tokenization_spaces": False}
    return _write(tmp_path / "bl", _byte_level(), config, generation_config={"eos_token_id": [2, 4]})


@pytest.fixture(params=[("replace_strip", "PreTrainedTokenizerFast"), ("metaspace", "PreTrainedTokenizerFast"),
                        ("replace_strip", "LlamaTokenizer")], ids=lambda p: "-".join(p))
def sp_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    # Mixtral's tokenizer_config.json names LlamaTokenizer, which transformers 5 rebuilds from vocab + merges.
    decoder, tokenizer_class = request.param
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "chat_template": MIXTRAL_TEMPLATE, "clean_up_tokenization_spaces": False,
              "tokenizer_class": tokenizer_class, "legacy": False}
    return _write(tmp_path / decoder, _sentencepiece(decoder == "metaspace"), config)


def _reference(directory: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def _assert_matches_transformers(directory: Path) -> Tokenizer:
    ours, ref = Tokenizer.from_dir(directory), _reference(directory)
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref(text, add_special_tokens=add)["input_ids"], (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    return ours


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    stream = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [stream.push(i) for i in ids]
    return pieces + [stream.flush()]


def test_byte_level_matches_transformers(byte_level_dir: Path) -> None:
    tok = _assert_matches_transformers(byte_level_dir)
    assert tok.encode("Hello")[0] == tok.bos_token_id == 1
    assert tok.encode("Hello", add_special_tokens=False)[0] != 1
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.eos_token_ids == [2, 4]  # eos_token (dict form) plus generation_config's list, deduplicated
    assert tok.pad_token_id is None
    assert tok.vocab_size == _reference(byte_level_dir).__len__()


def test_sentencepiece_matches_transformers(sp_dir: Path) -> None:
    tok = _assert_matches_transformers(sp_dir)
    ids = tok.encode("naïve 你好", add_special_tokens=False)
    assert any(3 <= i < 259 for i in ids), "non-ASCII text must go through <0xNN> byte fallback tokens"
    assert tok.decode(tok.encode("Hello  world\n x")) == "Hello  world\n x"
    assert tok.decode(tok.encode(" Hello")) == "Hello"  # Metaspace merges the leading space into the prefix
    assert tok.eos_token_ids == [2]


@pytest.mark.parametrize("post_processor", [True, False])
@pytest.mark.parametrize("flags", [{"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_bos_token": False}, {}])
def test_add_bos_token_flag_follows_transformers(tmp_path: Path, post_processor: bool, flags: dict) -> None:
    # transformers 5 pops add_bos_token/add_eos_token from tokenizer_config.json when tokenizer.json exists,
    # so BOS/EOS come from tokenizer.json's post-processor alone, whatever the flags say.
    config = {"bos_token": "<s>", "eos_token": "</s>", **flags}
    directory = _write(tmp_path / "flags", _byte_level(post_processor=post_processor), config)
    tok = _assert_matches_transformers(directory)
    ids, bare = tok.encode("Hello world"), tok.encode("Hello world", add_special_tokens=False)
    assert ids == ([tok.bos_token_id] if post_processor else []) + bare


def test_special_token_missing_from_vocab_is_added(tmp_path: Path) -> None:
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tok = _assert_matches_transformers(_write(tmp_path / "pad", _byte_level(), config))
    assert tok.pad_token_id == tok.vocab_size - 1
    assert tok.encode("a<pad>b", add_special_tokens=False).count(tok.pad_token_id) == 1


def test_eos_fallback_from_config_json(tmp_path: Path) -> None:
    directory = _write(tmp_path / "cfg", _byte_level(), {}, config={"bos_token_id": 1, "eos_token_id": 3})
    tok = Tokenizer.from_dir(directory)
    assert (tok.bos_token, tok.eos_token) == (None, None)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, [3])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_mixtral_chat_template(byte_level_dir: Path, add_generation_prompt: bool) -> None:
    tok, ref = Tokenizer.from_dir(byte_level_dir), _reference(byte_level_dir)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert text == "<s>[INST] Hi there 🤗, what is 2+2? [/INST]It is 4.</s>[INST] And 你好? [/INST]"
    assert text == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = tok.encode_chat(MESSAGES, add_generation_prompt=add_generation_prompt)
    ref_ids = ref.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert ids == list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS only; encode adds no second one


def test_chatml_template_list_form(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "{{ raise_exception('wrong template') }}"},
                 {"name": "default", "template": CHATML_TEMPLATE}]
    config = {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": templates}
    directory = _write(tmp_path / "chatml", _byte_level(post_processor=False), config)
    tok, ref = Tokenizer.from_dir(directory), _reference(directory)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🚀"}]
    for gen in (True, False):
        text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text.endswith("<|im_start|>assistant\n") is gen
        ref_ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        assert tok.encode_chat(msgs, gen) == list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    assert tok.encode_chat(msgs)[0] == tok.encode("<|im_start|>", add_special_tokens=False)[0]
    assert tok.bos_token_id is None and tok.eos_token_ids == [tok.encode("<|im_end|>")[0]]


def test_template_features(tmp_path: Path) -> None:
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}")
    directory = _write(tmp_path / "feat", _byte_level(), {"eos_token": "</s>", "chat_template": template})
    tok = Tokenizer.from_dir(directory)
    msgs = [{"role": "user", "content": "é<b>"}]
    assert tok.apply_chat_template(msgs) == _reference(directory).apply_chat_template(msgs, tokenize=False)
    assert tok.apply_chat_template(msgs).startswith('[{"role": "user", "content": "é<b>"}]|4|</s>')
    with pytest.raises(DaopError, match="first must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


SPECIALS_TEMPLATE = ("{{ bos_token }}|{{ eos_token }}|{{ image_token }}|{{ think_token }}|{{ pad_token }}|"
                     "{{ unk_token }}|{% for m in messages %}{{ m.content }}{% endfor %}")


@pytest.mark.parametrize(
    ("tok_config", "special_tokens_map"),
    [({"bos_token": "<s>", "eos_token": "</s>", "image_token": "<img>",
       "extra_special_tokens": {"think_token": "<think>"}, "chat_template": SPECIALS_TEMPLATE}, None),
     ({"chat_template": SPECIALS_TEMPLATE}, {"bos_token": {"content": "<s>", "normalized": False}, "eos_token": "</s>",
                                             "pad_token": "<pad>", "unk_token": "<unk>"})],
    ids=["model_specific_tokens", "special_tokens_map_json"],
)
def test_special_tokens_reach_template_and_vocab(
    tmp_path: Path, tok_config: dict, special_tokens_map: dict | None
) -> None:
    extra = {"special_tokens_map": special_tokens_map} if special_tokens_map else {}
    directory = _write(tmp_path / "specials", _byte_level(), tok_config, **extra)
    tok, ref = Tokenizer.from_dir(directory), _reference(directory)
    msgs = [{"role": "user", "content": "x<img>y<think>z<pad>"}]
    text = tok.apply_chat_template(msgs)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s>|</s>|")
    ids = tok.encode_chat(msgs)
    assert ids == list(ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (tok.vocab_size, tok.pad_token_id) == (len(ref), ref.pad_token_id)


@pytest.mark.parametrize("kind", ["byte_level", "replace_strip", "metaspace"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_matches_decode(tmp_path: Path, kind: str, skip: bool) -> None:
    backend = _byte_level() if kind == "byte_level" else _sentencepiece(kind == "metaspace")
    tok = Tokenizer.from_dir(_write(tmp_path / kind, backend, {"bos_token": "<s>", "eos_token": "</s>"}))
    text = " Hello 🤗🚀 world, 你好，世界! naïve ∮𝔘\n\tdef f(): pass"
    ids = tok.encode(text) + tok.encode(" more 한국어 text</s> after", add_special_tokens=False)
    pieces = _stream(tok, ids, skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
    held = [tok.decode([i], skip_special_tokens=False).endswith("\ufffd") for i in ids]
    assert any(held), "test text must split multi-byte characters across tokens"
    assert "".join(pieces[:5]) == tok.decode(ids[:5], skip_special_tokens=skip).rstrip("\ufffd")


def test_stream_decoder_decodes_a_bounded_window(byte_level_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = Tokenizer.from_dir(byte_level_dir)
    ids = tok.encode(" ".join(CORPUS) * 4)
    assert len(ids) > 2000
    expected, windows, raw = tok.decode(ids), [], tok._raw_decode
    monkeypatch.setattr(tok, "_raw_decode", lambda window, skip: windows.append(len(window)) or raw(window, skip))
    assert "".join(_stream(tok, ids)) == expected
    assert max(windows) <= 16  # bounded by the longest run of held-back tokens, not by the history


def test_stream_decoder_flush_emits_incomplete_tail(byte_level_dir: Path) -> None:
    tok = Tokenizer.from_dir(byte_level_dir)
    ids = tok.encode("ok 🤗", add_special_tokens=False)
    partial = ids[:-1]  # the emoji's last byte is missing
    pieces = _stream(tok, partial)
    assert "".join(pieces[:-1]).rstrip() == "ok" and pieces[-1].endswith("\ufffd")
    assert not any("\ufffd" in p for p in pieces[:-1])
    assert "".join(pieces) == tok.decode(partial)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_invalid_byte_fallback_run(tmp_path: Path, skip: bool) -> None:
    # ByteFallback turns an invalid <0xNN> run into one U+FFFD per byte, so the stream must not split the run
    # (a valid ASCII byte token followed by a stray lead byte, a special token in between, then normal text).
    tok = Tokenizer.from_dir(_write(tmp_path / "sp", _sentencepiece(False), {"bos_token": "<s>", "eos_token": "</s>"}))
    byte = {b: 3 + b for b in range(256)}
    the = tok.encode(" the", add_special_tokens=False)
    ids = [byte[0x66], byte[0xE4], *the, byte[0x41], 2, byte[0xB8], *the, byte[0xE4], byte[0xB8], byte[0xAD], *the]
    pieces = _stream(tok, ids, skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids[:2]) == "\ufffd\ufffd" and "中" in "".join(pieces)


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(DaopError, match="does_not_exist"):
        Tokenizer.from_dir(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DaopError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "empty")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_corrupt_json(byte_level_dir: Path, name: str) -> None:
    (byte_level_dir / name).write_text('{"model": {"type": "BPE", ', encoding="utf-8")
    with pytest.raises(DaopError, match=name.replace(".", r"\.")):
        Tokenizer.from_dir(byte_level_dir)


def test_missing_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_write(tmp_path / "nochat", _byte_level(), {"bos_token": "<s>"}))
    with pytest.raises(DaopError, match="no chat template.*tokenizer_config.json"):
        tok.apply_chat_template(MESSAGES)
    assert tok.encode("hi")[0] == 1  # the tokenizer itself still works


@pytest.mark.parametrize(
    ("messages", "field"),
    [([], "messages"), ("hello", "messages"), (["hello"], r"messages\[0\]"),
     ([{"content": "x"}], r"messages\[0\]\.role"), ([{"role": "user", "content": 3}], r"messages\[0\]\.content"),
     ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\.content")],
)
def test_bad_messages(byte_level_dir: Path, messages: object, field: str) -> None:
    tok = Tokenizer.from_dir(byte_level_dir)
    with pytest.raises(DaopError, match=field):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]
    with pytest.raises(DaopError, match=field):
        tok.encode_chat(messages)  # type: ignore[arg-type]
