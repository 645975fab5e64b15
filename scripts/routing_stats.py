#!/usr/bin/env python3
"""Check the default model with Hugging Face transformers and measure its routing.

Everything here runs on the CPU through ``transformers.MixtralForCausalLM`` (not
through daop), so the numbers are independent of the engine:

  load      from_pretrained must report no missing, unexpected or mismatched keys.
  ppl       held-out perplexity over non-overlapping windows of heldout.npy
            (same windows and token counting as scripts/train_default_model.py).
  samples   greedy and sampled continuations of a few prompts.
  routing   on held-out text, from ``output_router_logits=True`` and hooks on the routers:
            * expert load entropy per layer, normalised by log(E);
            * prefill -> decode overlap: a prompt of --prompt-len tokens, then
              --decode-len continuation tokens. For each layer, the fraction of the
              continuation's (token, expert) selections whose expert was selected by
              some prompt token; also the stricter top-m variant: overlap of the m
              experts used most in the prompt with the m used most in the continuation
              (m = E/4, E/2), and the share of continuation selections that hit the
              prompt's top-m experts. The continuation is either the held-out text
              itself (teacher-forced) or the model's greedy continuation;
            * next-layer prediction: layer l+1's router applied to layer l's MoE input
              (post-attention RMSNorm output); top-1 match, top-k set overlap and
              exact top-k set match with layer l+1's true routing.
  plot      draw the training loss curve from train_log.json.

    python3 scripts/routing_stats.py --model src/daop/assets/daop-moe-mini \
        --heldout .data/tok/heldout.npy --out .data/eval.json --all
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
import torch.nn.functional as F

PROMPTS = [
    ("bible", "And it came to pass, when the king heard these words, that"),
    ("shakespeare", "KING.\nWhat news, my lord? Speak, and tell me true."),
    ("devil", "LAWYER, n."),
    ("python", "def read_config(path):"),
    ("python-class", 'class Stack:\n    """A last-in, first-out list."""\n\n    def push(self, item):'),
]


def load(model_dir: Path, dtype):
    from transformers import AutoTokenizer, MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", output_loading_info=True
    )
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    info = {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items()}
    ok = not (info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys"))
    return model, tok, info, ok


def moe_blocks(model):
    out = []
    for layer in model.model.layers:
        blk = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")
        out.append(blk)
    return out


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    n = (len(tokens) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx].astype(np.int64)


@torch.no_grad()
def perplexity(model, held: np.ndarray, seq_len: int, max_windows: int | None):
    w = windows(held, seq_len)
    if max_windows:
        w = w[:max_windows]
    total, count = 0.0, 0
    t0 = time.time()
    for row in w:
        x = torch.from_numpy(row)[None]
        logits = model(x[:, :-1]).logits.float()
        total += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        count += seq_len
    loss = total / count
    return {"windows": int(len(w)), "tokens": count, "loss": loss, "ppl": math.exp(loss), "seconds": time.time() - t0}


@torch.no_grad()
def samples(model, tok, max_new: int, seed: int):
    out = []
    for name, prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        g = model.generate(ids, max_new_tokens=max_new, do_sample=False)
        torch.manual_seed(seed)
        s = model.generate(ids, max_new_tokens=max_new, do_sample=True, temperature=0.8, top_p=0.95, top_k=0)
        out.append({
            "name": name,
            "prompt": prompt,
            "greedy": tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True),
            "sampled": tok.decode(s[0, ids.shape[1]:], skip_special_tokens=True),
        })
    return out


class RouterTap:
    """Record each layer's MoE input (the router's input) during a forward pass."""

    def __init__(self, model):
        self.inputs: list[torch.Tensor | None] = []
        self.handles = []
        self.gates = []
        for i, blk in enumerate(moe_blocks(model)):
            self.inputs.append(None)
            self.gates.append(blk.gate.weight)
            self.handles.append(blk.gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def fn(mod, args, out):
            self.inputs[i] = args[0].reshape(-1, args[0].shape[-1]).detach()
        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def topk_from_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.topk(probs, k, dim=-1).indices


@torch.no_grad()
def routed(model, ids: torch.Tensor, k: int, tap: RouterTap):
    """Top-k expert indices per layer [L, T, k] and router inputs for one sequence."""
    out = model(ids[None], output_router_logits=True)
    sel = torch.stack([topk_from_logits(r.reshape(-1, r.shape[-1]), k) for r in out.router_logits])
    hs = [h.clone() for h in tap.inputs]
    return sel, hs, out


def overlap_stats(sel: torch.Tensor, P: int, E: int, ms: list[int]):
    """sel [L, T, k]; prompt = first P tokens, continuation = the rest."""
    L = sel.shape[0]
    res = {"set": [], **{f"top{m}_overlap": [] for m in ms}, **{f"top{m}_hit": [] for m in ms}}
    for l in range(L):
        pre, dec = sel[l, :P].reshape(-1), sel[l, P:].reshape(-1)
        pre_set = torch.zeros(E, dtype=torch.bool)
        pre_set[pre] = True
        res["set"].append(pre_set[dec].float().mean().item())
        pc = torch.bincount(pre, minlength=E).float()
        dc = torch.bincount(dec, minlength=E).float()
        for m in ms:
            # ties broken by expert index, deterministically (stable sort)
            tp = torch.sort(-pc, stable=True).indices[:m]
            td = torch.sort(-dc, stable=True).indices[:m]
            res[f"top{m}_overlap"].append(len(set(tp.tolist()) & set(td.tolist())) / m)
            hit = torch.zeros(E, dtype=torch.bool)
            hit[tp] = True
            res[f"top{m}_hit"].append(hit[dec].float().mean().item())
    return res


@torch.no_grad()
def routing(model, held: np.ndarray, n_seq: int, prompt_len: int, decode_len: int, seed: int,
            sweep: tuple[int, ...] = (4, 8, 16, 32, 64, 128)):
    cfg = model.config
    E, k, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    ms = sorted({max(1, E // 4), max(1, E // 2)})
    # sequences: start at document starts (<s>) in the held-out stream
    bos = np.flatnonzero(held == cfg.bos_token_id)
    need = prompt_len + decode_len
    starts = [int(s) for s in bos if s + need <= len(held)]
    rng = np.random.default_rng(seed)
    if len(starts) > n_seq:
        starts = sorted(rng.choice(starts, n_seq, replace=False).tolist())
    tap = RouterTap(model)
    counts = torch.zeros(L, E)
    tf = {"set": [], **{f"top{m}_overlap": [] for m in ms}, **{f"top{m}_hit": [] for m in ms}}
    gen = {key: [] for key in tf}
    sweep = tuple(p for p in sweep if p < prompt_len)
    set_by_len = {p: [] for p in sweep}
    pred_top1 = torch.zeros(L - 1)
    pred_overlap = torch.zeros(L - 1)
    pred_exact = torch.zeros(L - 1)
    base_top1 = torch.zeros(L - 1)
    base_overlap = torch.zeros(L - 1)
    perm_gen = torch.Generator().manual_seed(seed)
    n_tok = 0
    for s in starts:
        ids = torch.from_numpy(held[s : s + need].astype(np.int64))
        sel, hs, _ = routed(model, ids, k, tap)
        for l in range(L):
            counts[l] += torch.bincount(sel[l].reshape(-1), minlength=E).float()
        for key, v in overlap_stats(sel, prompt_len, E, ms).items():
            tf[key].append(v)
        for p in sweep:  # the set rule with only the last p prompt tokens as "the prompt"
            set_by_len[p].append(overlap_stats(sel[:, prompt_len - p :], p, E, [])["set"])
        # next-layer prediction over all tokens of the sequence
        for l in range(L - 1):
            pl = F.linear(hs[l].float(), tap.gates[l + 1].float())
            pk = topk_from_logits(pl, k)
            true = sel[l + 1]
            pred_top1[l] += (pk[:, 0] == true[:, 0]).float().sum()
            inter = (pk.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float().sum(-1)  # [T]
            pred_overlap[l] += (inter / k).sum()
            pred_exact[l] += (inter == k).float().sum()
            # baseline: the same router on another token's state (keeps per-layer popularity, drops the token)
            perm = torch.randperm(hs[l].shape[0], generator=perm_gen)
            bk = topk_from_logits(F.linear(hs[l][perm].float(), tap.gates[l + 1].float()), k)
            base_top1[l] += (bk[:, 0] == true[:, 0]).float().sum()
            base_overlap[l] += ((bk.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float().sum(-1) / k).sum()
        n_tok += ids.numel()
        # the model's own greedy continuation of the prompt
        prompt = ids[:prompt_len]
        out = model.generate(prompt[None], max_new_tokens=decode_len, do_sample=False, min_new_tokens=decode_len)
        sel_g, _, _ = routed(model, out[0], k, tap)
        for key, v in overlap_stats(sel_g, prompt_len, E, ms).items():
            gen[key].append(v)
    tap.close()
    load = counts / counts.sum(-1, keepdim=True)
    ent = -(load * load.clamp_min(1e-12).log()).sum(-1) / math.log(E)

    def agg(d):
        return {key: {"mean": float(np.mean(v)), "per_layer": np.mean(np.asarray(v), axis=0).round(4).tolist()} for key, v in d.items()}

    return {
        "sequences": len(starts),
        "prompt_len": prompt_len,
        "decode_len": decode_len,
        "num_experts": E,
        "top_k": k,
        "chance": {"set_random_prompt_set": None, **{f"top{m}": m / E for m in ms}},
        "load_entropy_norm": {"mean": float(ent.mean()), "min": float(ent.min()), "max": float(ent.max()), "per_layer": ent.round(decimals=4).tolist()},
        "load_per_layer": load.round(decimals=4).tolist(),
        "prefill_decode_teacher_forced": agg(tf),
        "prefill_decode_greedy": agg(gen),
        "prefill_decode_set_by_prompt_len": {str(p): float(np.mean(v)) for p, v in set_by_len.items()},
        "next_layer_prediction": {
            "tokens": n_tok,
            "top1_match": {"mean": float((pred_top1 / n_tok).mean()), "per_layer": (pred_top1 / n_tok).round(decimals=4).tolist()},
            "topk_overlap": {"mean": float((pred_overlap / n_tok).mean()), "per_layer": (pred_overlap / n_tok).round(decimals=4).tolist()},
            "topk_exact": {"mean": float((pred_exact / n_tok).mean()), "per_layer": (pred_exact / n_tok).round(decimals=4).tolist()},
            "topk_overlap_from_layer4": float((pred_overlap / n_tok)[4:].mean()),
            "top1_match_from_layer4": float((pred_top1 / n_tok)[4:].mean()),
            "baseline_shuffled_tokens": {"top1_match": float((base_top1 / n_tok).mean()), "topk_overlap": float((base_overlap / n_tok).mean())},
        },
    }


def plot(log_path: Path, out_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(log_path.read_text())
    tr, ev = log["train"], log["eval"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr], lw=1.0, label="train (dropout on, mean of 10 steps)")
    ax.plot([r["tokens"] / 1e6 for r in ev], [r["val_loss"] for r in ev], "o-", ms=3, label="validation (1 % of train.txt, never trained on)")
    ax.plot([r["tokens"] / 1e6 for r in ev], [r["heldout_loss"] for r in ev], "s-", ms=3, label="held-out (heldout.txt)")
    s = log.get("summary", {})
    if "best_step" in s:
        bt = s["best_step"] * s["tokens_per_step"] / 1e6
        ax.axvline(bt, color="grey", ls=":", lw=1)
        ax.text(bt, 6.5, "saved checkpoint ", color="grey", va="top", ha="right", fontsize=8)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(1.8, 7.0)
    ax.grid(alpha=0.3)
    n_tok = s.get("tokens_seen")
    ax.set_title(f"daop-moe-mini: {log['params']['total'] / 1e6:.1f}M params, {n_tok / 1e6:.0f}M tokens" if n_tok else "daop-moe-mini")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("src/daop/assets/daop-moe-mini"))
    ap.add_argument("--heldout", type=Path, default=Path(".data/tok/heldout.npy"))
    ap.add_argument("--out", type=Path, default=Path(".data/eval.json"))
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="load check, ppl, samples and routing")
    ap.add_argument("--ppl", action="store_true")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--ppl-windows", type=int, default=0, help="0: all held-out windows")
    ap.add_argument("--samples", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--routing", action="store_true")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--plot-log", type=Path, help="train_log.json to plot")
    ap.add_argument("--plot-out", type=Path, default=Path("docs/img/loss.png"))
    args = ap.parse_args(argv)

    if args.plot_log:
        plot(args.plot_log, args.plot_out)
        print(f"wrote {args.plot_out}")
        if not (args.all or args.ppl or args.samples or args.routing):
            return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model, tok, info, ok = load(args.model, dtype)
    result = {"model": str(args.model), "dtype": args.dtype, "torch": torch.__version__, "loading_info": info, "load_ok": ok}
    import transformers

    transformers.logging.set_verbosity_error()
    result["transformers"] = transformers.__version__
    print(f"load: missing={info.get('missing_keys')} unexpected={info.get('unexpected_keys')} "
          f"mismatched={info.get('mismatched_keys')} -> {'ok' if ok else 'FAILED'}")
    held = np.load(args.heldout) if (args.all or args.ppl or args.routing) else None
    if args.all or args.ppl:
        r = perplexity(model, held, args.seq_len, args.ppl_windows or None)
        result["heldout"] = r
        print(f"held-out: {r['windows']} windows x {args.seq_len} tokens, loss {r['loss']:.4f}, ppl {r['ppl']:.2f} ({r['seconds']:.0f}s)")
    if args.all or args.samples:
        result["samples"] = samples(model, tok, args.max_new_tokens, args.seed)
        for s in result["samples"]:
            print(f"--- {s['name']}: {s['prompt']!r}\n[greedy] {s['greedy']!r}\n[sampled] {s['sampled']!r}")
    if args.all or args.routing:
        r = routing(model, held.astype(np.int64), args.sequences, args.prompt_len, args.decode_len, args.seed)
        result["routing"] = r
        nl = r["next_layer_prediction"]
        print(f"routing over {r['sequences']} held-out sequences ({r['prompt_len']} prompt + {r['decode_len']} continuation tokens):")
        print(f"  load entropy (normalised): mean {r['load_entropy_norm']['mean']:.3f}, min {r['load_entropy_norm']['min']:.3f}")
        for name in ("prefill_decode_teacher_forced", "prefill_decode_greedy"):
            d = r[name]
            print(f"  {name}: " + ", ".join(f"{key} {v['mean']:.3f}" for key, v in d.items()))
        print("  set overlap by prompt length: " + ", ".join(f"{p}: {v:.3f}" for p, v in r["prefill_decode_set_by_prompt_len"].items()))
        print(f"  next-layer prediction: top1 {nl['top1_match']['mean']:.3f}, top-k overlap {nl['topk_overlap']['mean']:.3f}, "
              f"exact set {nl['topk_exact']['mean']:.3f} (shuffled-token baseline: top1 "
              f"{nl['baseline_shuffled_tokens']['top1_match']:.3f}, overlap {nl['baseline_shuffled_tokens']['topk_overlap']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
