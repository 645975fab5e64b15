"""The user-facing engine: load a checkpoint folder, then generate, stream or score tokens.

Non-goal here: deciding where experts run. The engine attaches an expert runner to the decoder;
offloading policies provide other runners with the same contract.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from daop.config import ModelConfig, load_config, read_json
from daop.errors import DaopError
from daop.generate import DecodeSession
from daop.model.decoder import Decoder
from daop.model.specs import FamilySpec, spec_for
from daop.runtime.setup import RuntimeOptions, prepare_runtime
from daop.sampling import Sampler, SamplingParams, generation_defaults, sampling_params
from daop.threads import apply_threads, check_threads, choose_threads
from daop.tokenizer import StreamDecoder, Tokenizer
from daop.weights.loader import load_weights
from daop.weights.lowbit_folder import load_options, stored_names
from daop.weights.safetensors_io import Checkpoint

DEFAULT_MODEL = "daop-moe-mini"


def default_model_dir() -> Path:
    """The small trained model shipped inside the package."""
    return Path(str(resources.files("daop") / "assets" / DEFAULT_MODEL))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DaopError("device 'cuda' requested but CUDA is not available (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise DaopError(f"unsupported device {str(device)!r}; choose cpu or cuda")
    return dev


@dataclass
class GenerationStats:
    """Numbers of the last generation (for --stats and the server's usage field)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "length"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


class Engine:
    """A loaded model with its tokenizer, ready to generate."""

    def __init__(self, model_dir: Path, config: ModelConfig, spec: FamilySpec, decoder: Decoder, tokenizer: Tokenizer | None, load_s: float) -> None:
        self.model_dir, self.config, self.spec, self.decoder, self.tokenizer = model_dir, config, spec, decoder, tokenizer
        self.load_s = load_s
        self.last_stats = GenerationStats()
        self.threads: int | None = None                  # torch intra-op threads of the dense path (None: torch's)
        self.generation_defaults: dict[str, Any] = {}    # sampling defaults of generation_config.json
        self.batch_runner: Any = None                    # generate_batch's Batcher, kept for the next call
        eos = set(tokenizer.eos_token_ids if tokenizer else ()) | set(config.eos_token_ids)
        self.eos_ids = frozenset(eos)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool = True,
        threads: int | None = None,
        reserved_cores: int = 0,
        **options: Any,
    ) -> "Engine":
        """Load a Hugging Face-layout checkpoint folder (the shipped default model when path is None).

        A folder written by `daop quantize` loads with the expert format it stores (its stored
        tensors are read as they are); options asking for another format are a DaopError.
        threads: torch's intra-op threads for the dense path; None picks them (see daop.threads),
        leaving out `reserved_cores` that other threads of the process keep busy (a server's event loop).
        """
        check_threads(threads, "threads")
        try:
            runtime_opts = RuntimeOptions(**options)
        except TypeError as exc:
            raise DaopError(f"unknown option: {exc}") from exc
        t0 = time.perf_counter()
        model_dir = Path(path).expanduser() if path is not None else default_model_dir()
        if not model_dir.is_dir():
            raise DaopError(f"model folder not found: {model_dir}")
        config = load_config(model_dir)
        raw = read_json(model_dir / "config.json", "config.json")
        spec = spec_for(raw)
        torch_dtype, expert_dtype, group_size, stored = load_options(
            raw, model_dir, dtype, config.torch_dtype, runtime_opts.expert_dtype, runtime_opts.group_size)
        runtime_opts = replace(runtime_opts, expert_dtype=expert_dtype, group_size=group_size)
        tokenizer = Tokenizer.from_dir(model_dir)
        dev = resolve_device(device)
        defaults = generation_defaults(model_dir)
        chosen_threads = choose_threads(threads, dev, reserved_cores)
        apply_threads(chosen_threads)
        ckpt = Checkpoint(model_dir)
        decoder = Decoder(config, spec, dev, torch_dtype)
        runtime = prepare_runtime(decoder, runtime_opts)
        if stored is not None:
            load_weights(ckpt, decoder, runtime.stored_dest, progress, partial(stored_names, spec))
        else:
            load_weights(ckpt, decoder, runtime.expert_dest, progress)
        decoder.experts = runtime.start()
        engine = cls(model_dir, config, spec, decoder, tokenizer, time.perf_counter() - t0)
        engine.budget, engine.policy, engine.expert_format = runtime.budget, runtime.policy_name, runtime.fmt
        engine.threads, engine.generation_defaults = chosen_threads, defaults
        engine.max_context, engine.max_batch = runtime_opts.max_context, runtime.max_batch
        return engine

    def session(self, prompt: Sequence[int], max_new_tokens: int) -> DecodeSession:
        """A new sequence through the model, on this thread's intra-op thread count (the server
        generates on a thread of its own)."""
        apply_threads(self.threads)
        return DecodeSession(self.decoder, prompt, max_new_tokens)

    def counters(self) -> dict[str, float]:
        """Expert counters since load (empty for the all-resident path)."""
        return self.decoder.experts.totals()

    def close(self) -> None:
        """Stop the expert runner's worker threads (the engine cannot generate afterwards) and free
        generate_batch's KV rows and captured steps."""
        self.batch_runner = None
        self.decoder.experts.close()

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise DaopError("this engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise DaopError("the prompt is empty")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise DaopError(f"token id out of range: the vocabulary has {self.config.vocab_size} entries")
        limit = self.config.context_length
        if len(ids) >= limit:
            raise DaopError(f"prompt has {len(ids)} tokens; the context window is {limit} tokens (max_position_embeddings)")
        return ids

    @torch.inference_mode()
    def logits(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Full forward without sampling: float32 logits [T, V] (for parity checks)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).tolist()
        return self.session(ids, 0).prefill(all_logits=True)[0]

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams, stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield generated token ids until EOS or max_new_tokens (stop strings are handled by stream).

        Closing the iterator early cancels the generation and frees its KV cache.
        """
        ids = self.encode(prompt_ids)
        budget = min(params.max_new_tokens, self.config.context_length - len(ids))
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(ids)
        self.last_stats = stats
        session = self.session(ids, budget)
        sampler = Sampler(params, ids)
        token = int(sampler(session.prefill())[0])
        stats.prefill_s = session.prefill_s
        stats.extra["counters_after_prefill"] = session.counters_after_prefill
        t1 = time.perf_counter()
        for step in range(budget):
            if token in self.eos_ids:
                stats.finish_reason = "stop"
                break
            stats.generated_tokens += 1
            stats.decode_s = time.perf_counter() - t1
            yield token
            if step + 1 == budget:
                break
            token = int(sampler(session.step([token]))[0])
        stats.decode_s = time.perf_counter() - t1

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams,
                       stats: GenerationStats | None = None) -> list[list[int]]:
        """Generate for several prompts at once; token ids per prompt, EOS excluded.

        Runs the server's batch path (`daop.batching`) with every prompt prefilled first, then decode
        steps over all rows; a row leaves at its EOS, stop string or budget. Each prompt gets the
        tokens it gets alone under an exact policy (greedy). A failed step (out of memory) raises.
        stats (see `daop.batching.generate_tokens`): generated_tokens is the longest row's count.
        """
        from daop.batching import generate_tokens  # the batcher is built on this module

        rows = [self.encode(p) for p in prompts]
        if not rows:
            return []
        apply_threads(self.threads)
        return generate_tokens(self, rows, params, stats if stats is not None else GenerationStats())

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               stop: Sequence[str] | None = None, stats: GenerationStats | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, presence_penalty: float | None = None,
               frequency_penalty: float | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated; never a broken UTF-8 character or part of a stop string.

        Sampling values left None come from the checkpoint's generation_config.json, else the
        defaults of SamplingParams (greedy). Pass `stats` to receive this call's numbers (token counts,
        finish_reason) when several generations share the engine; otherwise read `engine.last_stats`.
        """
        params = self.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      seed=seed, stop=stop, min_p=min_p, repetition_penalty=repetition_penalty,
                                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        prompt_ids = self.encode(prompt)
        text = TextStream(self.tokenizer, params.stop)
        stats = stats if stats is not None else GenerationStats()
        for token in self.generate_ids(prompt_ids, params, stats):
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                stats.finish_reason = "stop"
                return
        piece = text.finish()
        if text.stopped:
            stats.finish_reason = "stop"
        if piece:
            yield piece

    def sampling_params(self, **given: Any) -> SamplingParams:
        """Checked SamplingParams: values left None come from generation_config.json, then the defaults."""
        return sampling_params(self.generation_defaults, **{**given, "stop": tuple(given.get("stop") or ())})

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        """The whole completion as one string (same arguments as stream)."""
        return "".join(self.stream(prompt, **kwargs))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the checkpoint's chat template."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)


class TextStream:
    """Generated token ids in, text pieces out: never a broken UTF-8 character, never part of a
    stop string. `stopped` turns true once a stop string has appeared (nothing after it is given)."""

    def __init__(self, tokenizer: Tokenizer | None, stops: Sequence[str]) -> None:
        self.detok = StreamDecoder(tokenizer)
        self.stops = tuple(stops)
        self.text, self.emitted, self.stopped = "", 0, False

    def _take(self, end: int) -> str:
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def push(self, token: int) -> str:
        """The text that is safe to give after this token ('' when none)."""
        self.text += self.detok.push(token)
        cut = find_stop(self.text, self.stops, self.emitted)
        if cut is not None:
            self.stopped = True
            return self._take(cut)
        return self._take(len(self.text) - held_back(self.text, self.stops))

    def finish(self) -> str:
        """The rest of the text once generation has ended (up to a stop string, if one appears)."""
        self.text += self.detok.flush()
        cut = find_stop(self.text, self.stops, self.emitted)
        if cut is not None:
            self.stopped = True
        return self._take(len(self.text) if cut is None else cut)


def find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Index where the first stop string starts, searching only text not yet emitted (plus overlap)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if s.startswith(text[-n:]):
                keep = n
                break
    return keep
