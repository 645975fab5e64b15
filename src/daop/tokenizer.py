"""Tokenizer for Hugging Face checkpoints: encode/decode, chat templates and streaming detokenisation.

Mirrors what ``transformers.AutoTokenizer`` (v5, the ``TokenizersBackend`` / ``PreTrainedTokenizerFast`` path)
does with ``tokenizer.json`` + ``tokenizer_config.json``, without importing transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken

from daop.errors import DaopError

# Named special tokens transformers always exposes (SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> Any:
    """Read a JSON file, or None if it does not exist; corrupt JSON raises DaopError naming the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DaopError(f"{path}: cannot read JSON: {exc}") from exc


def _token_str(value: Any) -> str | None:
    """A special token from a config: a string, an AddedToken-style dict {"content": ...}, or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    """A token id field from config.json/generation_config.json: int, list of ints or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' ``{% generation %}...{% endgeneration %}`` tag and renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox configured the way transformers configures its own."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """A checkpoint's tokenizer: tokenizer.json for the pipeline, tokenizer_config.json for specials and chat."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any], directory: Path,
                 chat_template: Any = None, extra_bos_ids: list[int] | None = None,
                 extra_eos_ids: list[int] | None = None) -> None:
        """Wrap a loaded backend; prefer ``Tokenizer.from_dir``."""
        self._tok = backend
        self._config = config
        self._dir = directory
        self._chat_template_src = chat_template
        self._compiled: jinja2.Template | None = None
        self._bpe = type(backend.model).__name__ == "BPE"
        # Special token strings: named ones plus model-specific "*_token" keys (transformers passes all to templates).
        self._special: dict[str, str] = {}
        extra = config.get("extra_special_tokens")
        for key, value in [*config.items(), *(extra.items() if isinstance(extra, dict) else [])]:
            if key in _NAMED_SPECIAL or (key.endswith("_token") and isinstance(value, str)):
                if (tok := _token_str(value)) is not None:
                    self._special[key] = tok
        if "pad_token" not in self._special and backend.padding:
            self._special["pad_token"] = backend.padding["pad_token"]
        self._add_missing_tokens()
        # Like transformers: encoding never pads or truncates implicitly; split_special_tokens is honoured.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        # BOS/EOS come only from tokenizer.json's post-processor, as in transformers 5, which drops add_bos_token
        # and add_eos_token from tokenizer_config.json whenever tokenizer.json exists (_from_pretrained pops them).

        # For StreamDecoder: ByteFallback decodes a run of <0xNN> tokens as a unit (one U+FFFD per byte when the
        # run is not valid UTF-8), so a stream must not cut inside such a run; skipped specials do not end one.
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._byte_ids: set[int] = set()
        if "ByteFallback" in repr(backend.decoder):
            self._byte_ids = {i for b in range(256) if (i := backend.token_to_id(f"<0x{b:02X}>")) is not None}
        bos = self._id(self.bos_token)
        self._bos_id = bos if bos is not None else next(iter(extra_bos_ids or []), None)
        eos = [] if (e := self._id(self.eos_token)) is None else [e]
        self._eos_ids = list(dict.fromkeys(eos + list(extra_eos_ids or [])))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json (optional) and, for missing bos/eos ids, the model configs."""
        directory = Path(path)
        if not directory.is_dir():
            raise DaopError(f"{directory}: checkpoint folder " + ("is a file" if directory.exists() else "not found"))
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise DaopError(f"{tok_file}: tokenizer.json not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception for every parse error
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DaopError(f"{tok_file}: cannot load tokenizer: {reason}") from exc
        cfg_file = directory / "tokenizer_config.json"
        config = _read_json(cfg_file) or {}
        if not isinstance(config, dict):
            raise DaopError(f"{cfg_file}: expected a JSON object")
        if "added_tokens_decoder" not in config:  # legacy file; transformers lets it override the config then
            config.update(_read_json(directory / "special_tokens_map.json") or {})
        template: Any = config.get("chat_template")
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():  # transformers prefers the standalone file over the config entry
            template = jinja_file.read_text(encoding="utf-8")
        gen = _read_json(directory / "generation_config.json") or {}
        model = _read_json(directory / "config.json") or {}
        gen_eos = _ids(gen.get("eos_token_id")) if isinstance(gen, dict) else []
        model_eos = _ids(model.get("eos_token_id")) if isinstance(model, dict) else []
        bos = [*(_ids(gen.get("bos_token_id")) if isinstance(gen, dict) else []),
               *(_ids(model.get("bos_token_id")) if isinstance(model, dict) else [])]
        tok = cls(backend, config, directory, template, bos, gen_eos)
        if not tok._eos_ids:
            tok._eos_ids = list(dict.fromkeys(model_eos))
        return tok

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _add_missing_tokens(self) -> None:
        """Register special tokens not already added in tokenizer.json, as transformers' __init__ does."""
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        new: list[AddedToken] = []
        for entry in (self._config.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and (content := _token_str(entry)) and content not in present:
                new.append(AddedToken(content, special=bool(entry.get("special", False)),
                                      normalized=bool(entry.get("normalized", False))))
                present.add(content)
        extra = self._config.get("extra_special_tokens") or self._config.get("additional_special_tokens") or []
        names = list(self._special.values()) + [t for t in map(_token_str, extra if isinstance(extra, list) else [])
                                                 if t]
        for content in names:
            if content not in present:
                new.append(AddedToken(content, special=True, normalized=False))
                present.add(content)
        if new:
            self._tok.add_special_tokens(new)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (the size an embedding table must cover)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token string from tokenizer_config.json, if any."""
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token string from tokenizer_config.json, if any."""
        return self._special.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of the BOS token (falls back to generation_config.json / config.json bos_token_id)."""
        return self._bos_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the eos_token plus generation_config.json's eos_token_id (int or list)."""
        return list(self._eos_ids)

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, if the checkpoint defines one."""
        return self._id(self._special.get("pad_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for text, identical to transformers' ``tokenizer(text)["input_ids"]``."""
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
                raise DaopError("the text contains unpaired surrogates (undecodable bytes read with "
                                "surrogateescape?); decode it with errors='replace' first") from None
            raise

    def _raw_decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for ids, identical to transformers' ``decode`` (which ignores space clean-up for BPE models)."""
        text = self._raw_decode(list(ids), skip_special_tokens)
        if self._config.get("clean_up_tokenization_spaces") and not self._bpe:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def _template(self) -> jinja2.Template:
        src = self._chat_template_src
        if isinstance(src, list):
            named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
            if "default" not in named:
                raise DaopError(f"{self._dir / 'tokenizer_config.json'}: chat_template has several templates "
                                f"but none named 'default' (found {sorted(map(str, named))})")
            src = named["default"]
        if not src:
            raise DaopError(f"checkpoint {self._dir} has no chat template "
                            "(no chat_template in tokenizer_config.json and no chat_template.jinja)")
        if not isinstance(src, str):
            raise DaopError(f"{self._dir / 'tokenizer_config.json'}: chat_template must be a string or a list")
        if self._compiled is None:
            try:
                self._compiled = _compile_template(src)
            except jinja2.TemplateSyntaxError as exc:
                raise DaopError(f"{self._dir}: chat template syntax error line {exc.lineno}: {exc.message}") from exc
        return self._compiled

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's chat template, as transformers' apply_chat_template(tokenize=False)."""
        if not isinstance(messages, list) or not messages:
            raise DaopError("messages: expected a non-empty list of {role, content} objects")
        clean = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise DaopError(f"messages[{i}]: expected an object with 'role' and 'content'")
            for field in ("role", "content"):
                if not isinstance(msg.get(field), str):
                    raise DaopError(f"messages[{i}].{field}: expected a string, got {type(msg.get(field)).__name__}")
            clean.append({k: v for k, v in msg.items() if v is not None})  # transformers drops None-valued keys
        template = self._template()
        try:
            return template.render(messages=clean, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self._special)
        except jinja2.TemplateError as exc:
            raise DaopError(f"chat template of {self._dir} rejected the messages: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Render the chat template and encode it without adding special tokens (the template holds them)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class StreamDecoder:
    """Incremental detokeniser: feeds token ids one at a time and yields text that is final.

    Keeps a prefix offset (start of a small context window) and a read offset (end of the text already
    emitted); each push decodes only that window, so the cost per token is constant. Text ending in an
    incomplete UTF-8 character (U+FFFD), or in a byte-fallback token, is held back until a later token
    completes it; ``flush`` releases what is left. Pieces join to the backend decode; the word-piece
    space clean-up that ``Tokenizer.decode`` applies to non-BPE models (never BPE ones) is not streamed.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        """Start an empty stream for tokenizer."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _step(self, final: bool) -> str:
        tok = self._tokenizer
        last = self._ids[-1]
        if not final and (last in tok._byte_ids or (self._skip and last in tok._special_ids)):
            return ""  # a byte-fallback run may still continue: wait for a token that ends it
        prefix_text = tok._raw_decode(self._ids[self._prefix:self._read], self._skip)
        new_text = tok._raw_decode(self._ids[self._prefix:], self._skip)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            del self._ids[:self._read]  # the emitted tokens become the next window's context
            self._prefix, self._read = 0, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self._ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back at the end of the stream."""
        return self._step(final=True) if self._read < len(self._ids) else ""
