"""Routing traces: record a trained model's routing on real text, replay it on a synthetic geometry.

Random weights route like no trained model (no locality, no cross-layer predictability), so a
speed benchmark of a full-size geometry replays the decisions of a trained model with the same
layer, expert and top-k structure: its true experts and weights per layer and token, and its
one-layer-ahead predictions (layer l+1's router on layer l's normed input). Tokens are replayed
too (teacher forcing), so decode steps see exactly the recorded sequence. Traces recorded since the
runner copies two layers ahead also keep the two-ahead predictions (layer l+2's router on layer
l's normed input); older files have none, and replaying them makes no two-ahead copies.
Shapes: L layers, T positions, K top-k.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from daop.errors import DaopError
from daop.model.routing import ModelRouting, Routing
from daop.sampling import SamplingParams


@dataclass
class RoutingTrace:
    tokens: list[int]
    prompt_len: int
    ids: np.ndarray  # [L, T, K] true experts
    weights: np.ndarray  # [L, T, K]
    pred_ids: np.ndarray  # [L, T, K] predicted from layer l-1 (-1: none)
    pred_weights: np.ndarray
    pred2_ids: np.ndarray | None = None  # [L, T, K] predicted from layer l-2 (-1: none); None: not recorded


class TraceRecorder:
    """Routing wrapper that keeps every layer's experts and weights and the next layer's prediction."""

    def __init__(self, inner: Routing, num_layers: int, moe_layers: set[int]) -> None:
        self.inner, self.moe_layers = inner, moe_layers
        self.ids: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.weights: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.pred: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in range(num_layers)}
        self.pred2: dict[int, list[torch.Tensor]] = {l: [] for l in range(num_layers)}

    def begin(self, start: int, num_new: int) -> None:
        self.inner.begin(start, num_new)

    def route(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.inner.route(layer_idx, h)
        self.ids[layer_idx].append(ids.cpu())
        self.weights[layer_idx].append(weights.float().cpu())
        if layer_idx + 1 in self.moe_layers:
            _, p_ids, p_w = self.inner.predict(layer_idx + 1, h)
            self.pred[layer_idx + 1].append((p_ids.cpu(), p_w.float().cpu()))
        if layer_idx + 2 in self.moe_layers:
            self.pred2[layer_idx + 2].append(self.inner.predict(layer_idx + 2, h)[1].cpu())
        return ids, weights

    def predict(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inner.predict(layer_idx, h)

    def predict_ahead(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor | None:
        ahead = getattr(self.inner, "predict_ahead", None)
        return ahead(layer_idx, h) if ahead else None


def record(engine, prompt_ids: list[int], gen_tokens: int, params: SamplingParams | None = None) -> RoutingTrace:
    """Generate from prompt_ids with the engine's model (greedy unless `params` samples) and record its routing."""
    dec = engine.decoder
    rec = TraceRecorder(dec.routing, engine.config.num_layers, set(dec.model_routing.routers))
    params = replace(params, max_new_tokens=gen_tokens) if params is not None else SamplingParams(max_new_tokens=gen_tokens)
    with dec.routed_by(rec):
        out = list(engine.generate_ids(prompt_ids, params))
    return recorded(engine, rec, list(prompt_ids) + out, len(prompt_ids))


def rerecord(engine, trace: RoutingTrace) -> RoutingTrace:
    """The trace's own tokens fed through the engine's model again (teacher forced) and recorded, so
    a trace recorded before two-ahead predictions were kept gains them. The model must be the one that
    recorded it: its routing must come out the same (an error names the first layer and position where
    it does not)."""
    dec = engine.decoder
    rec = TraceRecorder(dec.routing, engine.config.num_layers, set(dec.model_routing.routers))
    tokens, p = trace.tokens, trace.prompt_len
    with dec.routed_by(rec):
        session = engine.session(tokens[:p], len(tokens) - p)
        session.prefill()
        for pos in range(p, len(tokens) - 1):
            session.step([tokens[pos]])
    again = recorded(engine, rec, tokens, p)
    differ = np.argwhere((again.ids != trace.ids).any(-1))
    if len(differ):
        l, t = differ[0]
        raise DaopError(f"re-recorded routing differs from the trace at layer {l}, position {t} "
                        f"({len(differ)} layer-positions): not the model that recorded it")
    return again


def recorded(engine, rec: TraceRecorder, tokens: list[int], prompt_len: int) -> RoutingTrace:
    """A RoutingTrace of what `rec` saw while `tokens` were fed (the last one never is)."""
    T = len(tokens) - 1  # the last generated token is never fed back
    L, K = engine.config.num_layers, engine.config.top_k
    ids = np.full((L, T, K), -1, dtype=np.int16)
    weights = np.zeros((L, T, K), dtype=np.float32)
    pred_ids, pred_w = np.full((L, T, K), -1, dtype=np.int16), np.zeros((L, T, K), dtype=np.float32)
    pred2_ids = np.full((L, T, K), -1, dtype=np.int16)
    for l in range(L):
        if rec.ids[l]:
            ids[l] = torch.cat(rec.ids[l])[:T].numpy()
            weights[l] = torch.cat(rec.weights[l])[:T].numpy()
        if rec.pred[l]:
            pred_ids[l] = torch.cat([p for p, _ in rec.pred[l]])[:T].numpy()
            pred_w[l] = torch.cat([w for _, w in rec.pred[l]])[:T].numpy()
        if rec.pred2[l]:
            pred2_ids[l] = torch.cat(rec.pred2[l])[:T].numpy()
    return RoutingTrace(list(tokens[: T + 1]), prompt_len, ids, weights, pred_ids, pred_w, pred2_ids)


def save_traces(traces: list[RoutingTrace], path: Path, provenance: dict) -> None:
    arrays = {}
    for i, t in enumerate(traces):
        arrays.update({f"{i}_tokens": np.asarray(t.tokens, dtype=np.int32), f"{i}_ids": t.ids, f"{i}_weights": t.weights.astype(np.float16),
                       f"{i}_pred_ids": t.pred_ids, f"{i}_pred_weights": t.pred_weights.astype(np.float16),
                       f"{i}_prompt_len": np.asarray(t.prompt_len)})
        if t.pred2_ids is not None:
            arrays[f"{i}_pred2_ids"] = t.pred2_ids
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
                               data[f"{i}_pred_weights"].astype(np.float32),
                               data[f"{i}_pred2_ids"] if f"{i}_pred2_ids" in data.files else None) for i in range(n)]
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise DaopError(f"{path}: not a routing trace file ({exc})") from exc
    return traces, provenance


_TABLES: dict[tuple[str, str], torch.Tensor] = {}  # (device, table) -> device buffer reused by every trace


def into_table(device: torch.device, name: str, a: torch.Tensor) -> torch.Tensor:
    """`a` [layers, tokens, ...] copied into the device buffer kept for this table (grown when too
    short), as a view of its first tokens; the buffer's address stays put while traces fit."""
    key = (str(device), name)
    buf = _TABLES.get(key)
    if buf is None or buf.shape[0] != a.shape[0] or buf.shape[2:] != a.shape[2:] or buf.shape[1] < a.shape[1] \
            or buf.dtype != a.dtype:
        buf = _TABLES[key] = torch.empty(a.shape, dtype=a.dtype, device=device)
    view = buf[:, : a.shape[1]]
    view.copy_(a)
    return view


class TraceRouting:
    """Routing from a trace at the current positions; predictions too, scored by the model's routers.

    The trace's arrays are uploaded to the device once, so replay adds no host copies per layer.
    """

    def __init__(self, trace: RoutingTrace, model: ModelRouting, device: torch.device) -> None:
        c = model.config
        if trace.ids.shape[0] < c.num_layers or trace.ids.shape[2] != c.top_k or trace.ids.max() >= c.num_experts:
            raise DaopError(f"routing trace has {trace.ids.shape[0]} layers, top-{trace.ids.shape[2]} of "
                            f"{int(trace.ids.max()) + 1}+ experts; the geometry needs {c.num_layers} layers, "
                            f"top-{c.top_k} of {c.num_experts}")
        self.model = model

        def upload(name: str, a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return into_table(device, name, torch.from_numpy(np.ascontiguousarray(a[: c.num_layers])).to(dtype))

        self.ids, self.weights = upload("ids", trace.ids, torch.long), upload("weights", trace.weights, torch.float32)
        self.pred_ids = upload("pred_ids", trace.pred_ids, torch.long)
        self.pred_weights = upload("pred_weights", trace.pred_weights, torch.float32)
        self.pred2_ids = upload("pred2_ids", trace.pred2_ids, torch.long) if trace.pred2_ids is not None else None
        # a captured decode step reads the tables at these addresses: the same for every trace that fits
        self.graph_key = tuple(t.data_ptr() for t in (self.ids, self.weights, self.pred_ids, self.pred_weights))
        self.window = slice(0, 0)
        self.position: torch.Tensor | None = None  # a decode step's position on the device, once bound
        self.decoding = False

    device_only = True  # decode steps read the trace at a position tensor: they may be captured

    def bind_position(self, pos: torch.Tensor) -> None:
        """Decode steps read their rows at `pos` (the step's position tensor [1] on the device)."""
        self.position = pos

    def begin(self, start: int, num_new: int) -> None:
        self.window = slice(start, start + num_new)
        self.decoding = num_new == 1 and self.position is not None

    def rows(self, table: torch.Tensor, layer_idx: int) -> torch.Tensor:
        if self.decoding:
            return table[layer_idx].index_select(0, self.position)
        return table[layer_idx, self.window]

    def route(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(self.ids, layer_idx), self.rows(self.weights, layer_idx)

    def predict(self, layer_idx: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model.predict(layer_idx, h)[0]
        return logits, self.rows(self.pred_ids, layer_idx), self.rows(self.pred_weights, layer_idx)

    def predict_ahead(self, layer_idx: int, h: torch.Tensor) -> torch.Tensor | None:
        return self.rows(self.pred2_ids, layer_idx) if self.pred2_ids is not None else None
