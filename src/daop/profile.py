"""Routing statistics from a calibration set: the data behind DAOP's placement (paper section 2.1).

For every document: prefill its first prompt tokens, greedy-decode a few tokens, and record per
layer which experts every token used. Also measured: how many decode-phase selections the prompt
already used (the paper's prefill -> decode overlap, 90.7 %), and how well layer l+1's router on
layer l's normed state predicts layer l+1's experts (section 2.4; 84.1 % in the paper).
The result is a JSON artifact (schema daop.routing_stats/1) with provenance; `--routing-stats FILE`
reads its `decode_counts`. Fields, per layer (null where a layer has no experts or no data) and mean:
- prefill_counts, decode_counts [L][E]: (token, top-k slot) selections of each expert;
- prefill_decode_overlap: share of decode selections whose expert the same document's prompt used;
- next_layer_top1, next_layer_set_overlap: decode-phase prediction of layer l from layer l-1's
  state (only where both layers have experts), best expert equal / share of the top-k set found;
- two_layers_ahead_set_overlap: the same share for layer l predicted from layer l-2's state (layer
  l's router on it), the lead a copy needs to land before its layer;
- load_entropy: entropy of the decode counts over log E (1 = perfectly balanced).
Shapes: N tokens, D hidden, E experts, K top-k, L layers.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daop.config import ModelConfig
from daop.errors import DaopError
from daop.model.routing import Routing
from daop.predict.next_layer import prediction_accuracy

SCHEMA = "daop.routing_stats/1"


def _jsonl_documents(path: Path, text: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DaopError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise DaopError(f"{path}:{lineno}: expected an object with a string field \"text\"")
        docs.append(item["text"])
    return docs


def _sharegpt_documents(path: Path, text: str) -> list[str]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DaopError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(items, list):
        raise DaopError(f"{path}: expected a JSON list of {{\"conversations\": [{{\"from\", \"value\"}}, ...]}} objects")
    docs = []
    for i, item in enumerate(items):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise DaopError(f"{path}: [{i}].conversations: expected a list of {{\"from\", \"value\"}} objects")
        values = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise DaopError(f"{path}: [{i}].conversations[{j}].value: expected a string")
            values.append(turn["value"])
        docs.append("\n\n".join(values))
    return docs


def read_documents(path: str | Path) -> list[str]:
    """Calibration documents from a file; the format follows the suffix.

    .jsonl: one object per line with a string "text". .json: a ShareGPT-style list of
    {"conversations": [{"from", "value"}, ...]}, turns joined by blank lines. Anything else:
    plain text, documents separated by blank lines. Empty documents are dropped; a file without
    any, or a malformed one, is a DaopError naming the file and the line or field.
    """
    path = Path(path)
    if not path.is_file():
        raise DaopError(f"calibration data not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DaopError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DaopError(f"{path}: cannot read ({exc.strerror})") from exc
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = _jsonl_documents(path, text)
    elif suffix == ".json":
        docs = _sharegpt_documents(path, text)
    else:
        docs = re.split(r"\n[ \t\r\f\v]*\n", text)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DaopError(f"{path}: no documents (every entry is empty)")
    return docs


class RoutingRecorder:
    """Routing wrapper that counts routing and scores the next-layer predictor; routes nothing itself.

    A forward starting at position 0 is a new document's prompt; later forwards are its decode
    steps. In decode, layer l's call also asks for layer l+1's prediction from the same normed
    input h (layer l's post-attention state): exactly the paper's predictor, scored when layer l+1
    runs.
    """

    def __init__(self, inner: Routing, config: ModelConfig, moe_layers: set[int]) -> None:
        self.inner, self.config, self.moe_layers = inner, config, moe_layers
        L, E = config.num_layers, config.num_experts
        self.phase = "prefill"
        self.prefill_counts = np.zeros((L, E), dtype=np.int64)
        self.decode_counts = np.zeros((L, E), dtype=np.int64)
        self.in_prompt = np.zeros((L, E), dtype=bool)  # experts the current document's prompt used
        self.overlap_hits = np.zeros(L, dtype=np.int64)
        self.top1_hits = np.zeros(L, dtype=np.int64)
        self.set_hits = np.zeros(L, dtype=np.int64)  # predicted experts that were right, over all tokens
        self.predicted_tokens = np.zeros(L, dtype=np.int64)
        self.ahead2_hits = np.zeros(L, dtype=np.int64)  # the same, predicted two layers ahead
        self.ahead2_tokens = np.zeros(L, dtype=np.int64)
        self.pending: dict[int, torch.Tensor] = {}
        self.pending2: dict[int, torch.Tensor] = {}

    def begin(self, start: int, num_new: int) -> None:
        self.inner.begin(start, num_new)
        self.phase = "prefill" if start == 0 else "decode"
        if start == 0:
            self.in_prompt[:] = False
            self.pending.clear()
            self.pending2.clear()

    def route(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.inner.route(layer_idx, h)
        ids_np = ids.cpu().numpy()  # [N, K]
        counts = np.bincount(ids_np.reshape(-1), minlength=self.decode_counts.shape[1])
        if self.phase == "prefill":
            self.prefill_counts[layer_idx] += counts
            self.in_prompt[layer_idx] |= counts > 0
        else:
            self.decode_counts[layer_idx] += counts
            self.overlap_hits[layer_idx] += int(self.in_prompt[layer_idx][ids_np].sum())
            self.score_prediction(layer_idx, ids)
            if layer_idx + 1 in self.moe_layers:
                self.pending[layer_idx + 1] = self.inner.predict(layer_idx + 1, h)[1]
            if layer_idx + 2 in self.moe_layers:
                self.pending2[layer_idx + 2] = self.inner.predict(layer_idx + 2, h)[1]
        return ids, weights

    def predict(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inner.predict(layer_idx, h)

    def predict_ahead(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor | None:
        ahead = getattr(self.inner, "predict_ahead", None)
        return ahead(layer_idx, h) if ahead else None

    def score_prediction(self, layer_idx: int, ids: torch.Tensor) -> None:
        """Score what layers l-1 and l-2 predicted for this layer against its routing ids [N, K]."""
        n, k = ids.shape
        predicted = self.pending.pop(layer_idx, None)
        if predicted is not None:
            top1, overlap = prediction_accuracy(predicted, ids)
            self.top1_hits[layer_idx] += round(top1 * n)
            self.set_hits[layer_idx] += round(overlap * n * k)
            self.predicted_tokens[layer_idx] += n
        ahead2 = self.pending2.pop(layer_idx, None)
        if ahead2 is not None:
            self.ahead2_hits[layer_idx] += round(prediction_accuracy(ahead2, ids)[1] * n * k)
            self.ahead2_tokens[layer_idx] += n


def _per_layer(values: Sequence[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    return {"per_layer": list(values), "mean": sum(known) / len(known) if known else None}


def _fractions(hits: np.ndarray, totals: np.ndarray) -> dict[str, Any]:
    return _per_layer([float(h / t) if t > 0 else None for h, t in zip(hits, totals)])


def _entropy(counts: np.ndarray) -> float | None:
    total = counts.sum()
    if total == 0 or len(counts) < 2:
        return None
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))


def summarise(rec: RoutingRecorder, provenance: dict[str, Any]) -> dict[str, Any]:
    """The routing-statistics JSON object from a recorder's totals."""
    c = rec.config
    moe = [c.is_moe_layer(l) for l in range(c.num_layers)]
    decode_selections = rec.decode_counts.sum(axis=1)
    return {
        "schema": SCHEMA,
        "provenance": provenance,
        "num_layers": c.num_layers,
        "num_experts": c.num_experts,
        "top_k": c.top_k,
        "moe_layers": c.moe_layer_ids(),
        "prefill_counts": rec.prefill_counts.tolist(),
        "decode_counts": rec.decode_counts.tolist(),
        "prefill_decode_overlap": _fractions(rec.overlap_hits, decode_selections),
        "next_layer_top1": _fractions(rec.top1_hits, rec.predicted_tokens),
        "next_layer_set_overlap": _fractions(rec.set_hits, rec.predicted_tokens * c.top_k),
        "two_layers_ahead_set_overlap": _fractions(rec.ahead2_hits, rec.ahead2_tokens * c.top_k),
        "load_entropy": _per_layer([_entropy(rec.decode_counts[l]) if moe[l] else None for l in range(c.num_layers)]),
    }


def _run_document(engine: Any, prompt: list[int], gen_tokens: int) -> int:
    """Prefill then greedy decode one document; returns the number of decode steps run (stops at EOS)."""
    session = engine.session(prompt, gen_tokens)
    logits = session.prefill()
    for step in range(gen_tokens):
        token = int(logits[0].argmax())
        if token in engine.eos_ids:
            return step
        logits = session.step([token])
    return gen_tokens


def profile_routing(engine: Any, docs: Sequence[str], prompt_tokens: int = 128, gen_tokens: int = 32,
                    provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Routing statistics of a loaded daop Engine over calibration documents (see module docstring).

    Each document is cut to its first `prompt_tokens` tokens, then decoded greedily for up to
    `gen_tokens` steps (fewer at EOS). Per layer, counts are (token, top-k slot) selections, so a
    MoE layer's counts sum to tokens * top_k; layers without experts stay zero.
    """
    if prompt_tokens < 1 or gen_tokens < 1:
        raise DaopError(f"--prompt-tokens and --gen-tokens must be >= 1 (got {prompt_tokens}, {gen_tokens})")
    limit = engine.config.context_length
    if prompt_tokens + gen_tokens > limit:
        raise DaopError(f"--prompt-tokens + --gen-tokens = {prompt_tokens + gen_tokens} exceeds the context window of {limit}")
    if engine.tokenizer is None:
        raise DaopError(f"{engine.model_dir}: no tokenizer; profiling needs one to read text")
    dec = engine.decoder
    rec = RoutingRecorder(dec.routing, engine.config, set(dec.model_routing.routers))
    totals = {"docs": 0, "prompt_tokens": 0, "decode_tokens": 0}
    t0 = time.perf_counter()
    with dec.routed_by(rec):
        for text in docs:
            prompt = engine.encode(engine.tokenizer.encode(text)[:prompt_tokens])
            totals["decode_tokens"] += _run_document(engine, prompt, gen_tokens)
            totals["prompt_tokens"] += len(prompt)
            totals["docs"] += 1
    info = {
        **(provenance or {}), "model": str(engine.model_dir), **totals,
        "prompt_tokens_per_doc": prompt_tokens, "gen_tokens_per_doc": gen_tokens,
        "device": str(engine.device), "dtype": str(engine.decoder.dtype).replace("torch.", ""),
        "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return summarise(rec, info)


def _dumps(obj: Any, depth: int = 0) -> str:
    """Indented JSON with every list of scalars on one line (one row per layer); NaN is refused."""
    inner, outer = " " * (depth + 1), " " * depth
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(obj, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in obj):
        return "[\n" + ",\n".join(inner + _dumps(x, depth + 1) for x in obj) + f"\n{outer}]"
    return json.dumps(obj, allow_nan=False)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file beside `path`, then rename: readers never see a partial file."""
    path = Path(path)
    text = _dumps(data) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DaopError(f"{path}: cannot write ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise DaopError(f"{path}: cannot write ({exc.strerror})") from exc
        raise


def run_profile(model: str | None, data: str, output: str, max_docs: int | None = None, prompt_tokens: int = 128,
                gen_tokens: int = 32, device: str | None = None, dtype: str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Read the documents, load the model, profile, write `output` atomically; returns the statistics."""
    from daop.engine import Engine

    if max_docs is not None and max_docs < 1:
        raise DaopError(f"--max-docs must be >= 1, got {max_docs}")
    docs = read_documents(data)[:max_docs]
    engine = Engine.from_pretrained(model, device=device, dtype=dtype, progress=progress)
    stats = profile_routing(engine, docs, prompt_tokens, gen_tokens, {"data": str(Path(data))})
    write_json_atomic(output, stats)
    return stats
