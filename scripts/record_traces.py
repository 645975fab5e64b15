"""Record routing traces of a trained model on held-out text, for `daop bench --trace`; summarise traces.

    python scripts/record_traces.py --data .data/corpus/heldout.txt --prompts 10 \
        --prompt-tokens 256 --gen-tokens 64 --output benchmarks/traces/daop-moe-mini-heldout.npz

--verify first checks the checkpoint: the engine's float32 logits on the first prompt against
transformers' (AutoModelForCausalLM; largest absolute difference must stay below --max-logit-diff),
and, with --heldout-tokens, the engine's held-out perplexity over non-overlapping windows of
--ppl-seq-len tokens. Both go into the trace's provenance.

--add-two-ahead IN feeds the tokens of a trace file recorded before two-ahead predictions were kept
through the model again (teacher forced), checks that the routing comes out the same, and writes the
trace with them to --output (provenance kept, the addition noted):

    python scripts/record_traces.py --add-two-ahead benchmarks/traces/daop-moe-mini-heldout.npz \
        --output benchmarks/traces/daop-moe-mini-heldout.npz

--stats summarises saved traces (no model needed), per trace file:
  * next-layer prediction on decode steps: layer l+1's router applied to layer l's input
    (recorded with the trace) against layer l+1's true routing; top-1 match, precision of the
    predicted top-k set (|predicted & true| / k) and exact set match, over layers 1..L-1;
  * prefill -> decode overlap per layer, averaged: the share of decode-step selections whose
    expert some prompt token also selected (the DAOP paper's definition), and the top-m variant
    (m = E/4 and E/2): |top-m of the prompt & top-m of the decode steps| / m, and the share of
    decode selections served by the prompt's top-m experts;
  * expert load entropy per layer over all positions, divided by log E.

    python scripts/record_traces.py --stats benchmarks/traces/*.npz --stats-out stats.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.bench.trace import load_traces, record, rerecord, save_traces  # noqa: E402
from daop.engine import Engine  # noqa: E402
from daop.sampling import SamplingParams  # noqa: E402


def trace_stats(traces) -> dict:
    """Routing statistics of a list of RoutingTrace (see the module docstring)."""
    L, _, K = traces[0].ids.shape
    E = int(max(int(t.ids.max()) for t in traces)) + 1
    ms = sorted({max(1, E // 4), max(1, E // 2)})
    counts = np.zeros((L, E))
    top1, prec, exact, n_dec = np.zeros(L), np.zeros(L), np.zeros(L), 0
    overlap = {"set": [], **{f"top{m}_overlap": [] for m in ms}, **{f"top{m}_hit": [] for m in ms}}
    for t in traces:
        P = t.prompt_len
        ids, pred = t.ids.astype(np.int64), t.pred_ids.astype(np.int64)
        for l in range(L):
            counts[l] += np.bincount(ids[l].reshape(-1), minlength=E)
        true_d, pred_d = ids[:, P:], pred[:, P:]  # decode steps
        n_dec += true_d.shape[1]
        top1 += (pred_d[..., 0] == true_d[..., 0]).sum(-1)
        inter = (pred_d[..., :, None] == true_d[..., None, :]).any(-1).sum(-1)  # [L, T_dec]
        prec += (inter / K).sum(-1)
        exact += (inter == K).sum(-1)
        per = {key: [] for key in overlap}
        for l in range(L):
            pre, dec = ids[l, :P].reshape(-1), ids[l, P:].reshape(-1)
            in_prompt = np.zeros(E, dtype=bool)
            in_prompt[pre] = True
            per["set"].append(in_prompt[dec].mean())
            pc, dc = np.bincount(pre, minlength=E), np.bincount(dec, minlength=E)
            for m in ms:  # ties broken by expert index (stable sort)
                tp, td = np.argsort(-pc, kind="stable")[:m], np.argsort(-dc, kind="stable")[:m]
                per[f"top{m}_overlap"].append(len(set(tp.tolist()) & set(td.tolist())) / m)
                hit = np.zeros(E, dtype=bool)
                hit[tp] = True
                per[f"top{m}_hit"].append(hit[dec].mean())
        for key, v in per.items():
            overlap[key].append(v)
    load = counts / counts.sum(-1, keepdims=True)
    ent = -(load * np.log(np.clip(load, 1e-12, None))).sum(-1) / math.log(E)
    nxt = slice(1, L)  # layer 0 has no prediction

    def layers(x):
        return [round(float(v), 4) for v in x]

    pred = {"top1": top1[nxt] / n_dec, "set_precision": prec[nxt] / n_dec, "exact_set": exact[nxt] / n_dec}
    return {
        "traces": len(traces), "layers": L, "experts": E, "top_k": K,
        "prompt_tokens": traces[0].prompt_len, "decode_steps_per_trace": int(traces[0].ids.shape[1] - traces[0].prompt_len),
        "chance": {"top1": 1 / E, "set_precision": K / E, **{f"top{m}": m / E for m in ms}},
        "next_layer_prediction_decode": {
            **{k: {"mean": float(v.mean()), "min": float(v.min()), "per_layer_from_1": layers(v)} for k, v in pred.items()},
            "top1_from_layer4": float((top1[4:] / n_dec).mean()), "set_precision_from_layer4": float((prec[4:] / n_dec).mean()),
        },
        "prefill_decode": {k: {"mean": float(np.mean(v)), "per_layer": layers(np.mean(np.asarray(v), axis=0))} for k, v in overlap.items()},
        "load_entropy_norm": {"mean": float(ent.mean()), "min": float(ent.min()), "max": float(ent.max()), "per_layer": layers(ent)},
    }


@torch.no_grad()
def verify(engine: Engine, prompt: list[int], heldout: Path | None, seq_len: int, max_diff: float) -> dict:
    """Engine vs transformers logits on one prompt; optionally the engine's held-out perplexity."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    want = ref(torch.tensor([prompt])).logits[0].float()
    del ref
    got = engine.logits(prompt).float()
    diff = float((got - want).abs().max())
    out = {"transformers_max_abs_logit_diff": diff, "transformers_argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
           "checked_tokens": len(prompt)}
    print(f"logits vs transformers on {len(prompt)} tokens: max abs diff {diff:.2e}, "
          f"argmax agreement {out['transformers_argmax_agreement']:.4f}", flush=True)
    if diff >= max_diff:
        raise SystemExit(f"engine and transformers logits differ by {diff:.3e} >= {max_diff}")
    if heldout is not None:
        toks = np.load(heldout).astype(np.int64)
        n = (len(toks) - 1) // seq_len
        t0, total = time.time(), 0.0
        for i in range(n):
            w = toks[i * seq_len: (i + 1) * seq_len + 1]
            logits = engine.logits(w[:-1].tolist()).float()
            total += float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(w[1:]), reduction="sum"))
        loss = total / (n * seq_len)
        out.update(heldout_windows=n, heldout_seq_len=seq_len, heldout_tokens_scored=n * seq_len,
                   heldout_loss=loss, heldout_ppl=math.exp(loss))
        print(f"held-out perplexity {math.exp(loss):.2f} (loss {loss:.4f}, {n} windows of {seq_len}, "
              f"{time.time() - t0:.0f}s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="trained checkpoint (default: the shipped daop-moe-mini)")
    ap.add_argument("--data", help="plain text; prompts are consecutive chunks of it")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--output")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample the continuations (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="with --temperature: prompt i samples with seed + i")
    ap.add_argument("--verify", action="store_true", help="check logits against transformers before recording")
    ap.add_argument("--max-logit-diff", type=float, default=1e-4)
    ap.add_argument("--heldout-tokens", type=Path, help="with --verify: token file (.npy) to score perplexity on")
    ap.add_argument("--ppl-seq-len", type=int, default=1024)
    ap.add_argument("--stats", nargs="+", type=Path, help="summarise these trace files instead of recording")
    ap.add_argument("--stats-out", type=Path, help="with --stats: write the summaries as JSON")
    ap.add_argument("--add-two-ahead", type=Path, help="re-record this trace file's tokens, adding two-ahead predictions")
    args = ap.parse_args()
    if args.add_two_ahead:
        if not args.output:
            ap.error("--add-two-ahead needs --output")
        traces, provenance = load_traces(args.add_two_ahead)
        engine = Engine.from_pretrained(args.model, device="cpu", dtype="fp32", progress=False)
        again = [rerecord(engine, t) for t in traces]
        for old, new in zip(traces, again):  # only the two-ahead predictions are new: keep the stored arrays
            new.weights, new.pred_ids, new.pred_weights = old.weights, old.pred_ids, old.pred_weights
        provenance["two_ahead_added"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
                                         "how": "the trace's tokens fed through the model again; its routing ids came out the same"}
        save_traces(again, Path(args.output), provenance)
        print(f"{len(again)} traces with two-ahead predictions -> {args.output}")
        return
    if args.stats:
        result = {}
        for path in args.stats:
            traces, provenance = load_traces(path)
            result[path.name] = {"provenance": provenance, **trace_stats(traces)}
            s = result[path.name]
            p, o = s["next_layer_prediction_decode"], s["prefill_decode"]
            m = max(1, s["experts"] // 4)
            print(f"{path.name}: {s['layers']} layers, top-{s['top_k']} of {s['experts']}; decode next-layer top-1 "
                  f"{p['top1']['mean']:.3f}, set precision {p['set_precision']['mean']:.3f}; prefill->decode set "
                  f"{o['set']['mean']:.3f}, top-{m} overlap {o[f'top{m}_overlap']['mean']:.3f}; load entropy "
                  f"{s['load_entropy_norm']['mean']:.3f} (min {s['load_entropy_norm']['min']:.3f})")
        if args.stats_out:
            args.stats_out.write_text(json.dumps(result, indent=1) + "\n")
        return
    if not args.data or not args.output:
        ap.error("recording needs --data and --output")
    engine = Engine.from_pretrained(args.model, device="cpu", dtype="fp32", progress=False)
    engine.eos_ids = frozenset()  # record exactly gen-tokens decode steps per prompt
    ids = engine.tokenizer.encode(Path(args.data).read_text(encoding="utf-8"), add_special_tokens=False)
    stride = len(ids) // args.prompts
    prompts = [[engine.tokenizer.bos_token_id] + ids[i * stride: i * stride + args.prompt_tokens - 1] for i in range(args.prompts)]
    checks = verify(engine, prompts[0], args.heldout_tokens, args.ppl_seq_len, args.max_logit_diff) if args.verify else {}
    sampling = [SamplingParams(max_new_tokens=args.gen_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed + i) for i in range(len(prompts))]
    traces = [record(engine, prompt, args.gen_tokens, params) for prompt, params in zip(prompts, sampling)]
    provenance = {"model": str(engine.model_dir.name), "data": Path(args.data).name, "prompts": args.prompts,
                  "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "torch": torch.__version__,
                  "decoding": "greedy" if args.temperature == 0 else {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed},
                  "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **checks}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_traces(traces, Path(args.output), provenance)
    print(f"{len(traces)} traces -> {args.output}")


if __name__ == "__main__":
    sys.exit(main())
