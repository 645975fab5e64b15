"""Routing traces: record a trained model's routing on real text, replay it on a synthetic geometry.

Random weights route like no trained model (no locality, no cross-layer predictability), so a
speed benchmark of a full-size geometry replays the decisions of a trained model with the same
layer, expert and top-k structure: its true experts and weights per layer and token, and its
one-layer-ahead predictions (layer l+1's router on layer l's normed input). Tokens are replayed
too (teacher forcing), so decode steps see exactly the recorded sequence.
Shapes: L layers, T positions, K top-k.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from daop.errors import DaopError
from daop.model.moe import select_experts
from daop.sampling import SamplingParams


@dataclass
class RoutingTrace:
    tokens: list[int]
    prompt_len: int
    ids: np.ndarray  # [L, T, K] true experts
    weights: np.ndarray  # [L, T, K]
    pred_ids: np.ndarray  # [L, T, K] predicted from layer l-1 (-1: none)
    pred_weights: np.ndarray


class TraceRecorder:
    """Wraps an expert runner; records routing and next-layer predictions of every call."""

    def __init__(self, inner, decoder) -> None:
        self.inner, self.decoder = inner, decoder
        L = decoder.config.num_layers
        self.ids: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.weights: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.pred: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in range(L)}

    def __call__(self, layer_idx, h, ids, weights):
        self.ids[layer_idx].append(ids.cpu())
        self.weights[layer_idx].append(weights.float().cpu())
        nxt = layer_idx + 1
        if nxt < len(self.decoder.layers) and self.decoder.layers[nxt].router is not None:
            p_ids, p_w = select_experts(self.decoder.config, F.linear(h, self.decoder.layers[nxt].router))
            self.pred[nxt].append((p_ids.cpu(), p_w.float().cpu()))
        return self.inner(layer_idx, h, ids, weights)


def record(engine, prompt_ids: list[int], gen_tokens: int, params: SamplingParams | None = None) -> RoutingTrace:
    """Generate from prompt_ids with the engine's model (greedy unless `params` samples) and record its routing."""
    inner = engine.decoder.experts
    rec = TraceRecorder(inner, engine.decoder)
    engine.decoder.experts = rec
    try:
        params = replace(params, max_new_tokens=gen_tokens) if params is not None else SamplingParams(max_new_tokens=gen_tokens)
        out = list(engine.generate_ids(prompt_ids, params))
    finally:
        engine.decoder.experts = inner
    tokens = list(prompt_ids) + out
    T = len(tokens) - 1  # the last generated token is never fed back
    L, K = engine.config.num_layers, engine.config.top_k
    ids = np.full((L, T, K), -1, dtype=np.int16)
    weights = np.zeros((L, T, K), dtype=np.float32)
    pred_ids, pred_w = np.full((L, T, K), -1, dtype=np.int16), np.zeros((L, T, K), dtype=np.float32)
    for l in range(L):
        if rec.ids[l]:
            ids[l] = torch.cat(rec.ids[l])[:T].numpy()
            weights[l] = torch.cat(rec.weights[l])[:T].numpy()
        if rec.pred[l]:
            pred_ids[l] = torch.cat([p for p, _ in rec.pred[l]])[:T].numpy()
            pred_w[l] = torch.cat([w for _, w in rec.pred[l]])[:T].numpy()
    return RoutingTrace(tokens[: T + 1], len(prompt_ids), ids, weights, pred_ids, pred_w)


def save_traces(traces: list[RoutingTrace], path: Path, provenance: dict) -> None:
    arrays = {}
    for i, t in enumerate(traces):
        arrays.update({f"{i}_tokens": np.asarray(t.tokens, dtype=np.int32), f"{i}_ids": t.ids, f"{i}_weights": t.weights.astype(np.float16),
                       f"{i}_pred_ids": t.pred_ids, f"{i}_pred_weights": t.pred_weights.astype(np.float16),
                       f"{i}_prompt_len": np.asarray(t.prompt_len)})
    arrays["provenance"] = np.frombuffer(json.dumps(provenance).encode(), dtype=np.uint8)
    tmp = Path(str(path) + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_traces(path: Path) -> tuple[list[RoutingTrace], dict]:
    try:
        data = np.load(path)
        provenance = json.loads(bytes(data["provenance"]).decode())
        n = len([k for k in data.files if k.endswith("_tokens")])
        traces = [RoutingTrace(data[f"{i}_tokens"].tolist(), int(data[f"{i}_prompt_len"]), data[f"{i}_ids"],
                               data[f"{i}_weights"].astype(np.float32), data[f"{i}_pred_ids"],
                               data[f"{i}_pred_weights"].astype(np.float32)) for i in range(n)]
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise DaopError(f"{path}: not a routing trace file ({exc})") from exc
    return traces, provenance


class TraceRouting:
    """Routing override for a decoder: experts and weights come from a trace at the current positions."""

    def __init__(self, trace: RoutingTrace, num_layers: int, num_experts: int, top_k: int) -> None:
        if trace.ids.shape[0] < num_layers or trace.ids.shape[2] != top_k or trace.ids.max() >= num_experts:
            raise DaopError(f"routing trace has {trace.ids.shape[0]} layers, top-{trace.ids.shape[2]} of "
                            f"{int(trace.ids.max()) + 1}+ experts; the geometry needs {num_layers} layers, top-{top_k} of {num_experts}")
        self.trace = trace
        self.window = slice(0, 0)

    def at(self, start: int, num_new: int) -> None:
        self.window = slice(start, start + num_new)

    def route(self, layer_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.trace.ids[layer_idx, self.window].astype(np.int64)).to(device)
        return ids, torch.from_numpy(self.trace.weights[layer_idx, self.window]).to(device)

    def predicted(self, layer_idx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.trace.pred_ids[layer_idx, self.window].astype(np.int64)).to(device)
        return ids, torch.from_numpy(self.trace.pred_weights[layer_idx, self.window]).to(device)
