"""`daop eval`: quality of a policy against the oracle, the all-GPU path, on the same prompts.

The reference is always policy `gpu` (every expert resident): on the requested device and dtype
when the whole model fits there, otherwise on the CPU in float32; each report names the
reference's policy, device and dtype. Approximations act only in the decode phase (prefill is
exact), so scoring goes through the decode path: teacher-forced perplexity feeds the document's
continuation one token at a time as decode steps; greedy agreement compares generated tokens with
the reference's; a GSM8K-style set (JSONL with question/answer) scores exact-match accuracy of
the generated final answers.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from daop.engine import Engine
from daop.errors import DaopError
from daop.generate import DEVICE_OOM
from daop.profile import read_documents
from daop.sampling import SamplingParams


@torch.inference_mode()
def teacher_forced(engine: Engine, ids: list[int], prompt_tokens: int) -> tuple[float, list[int]]:
    """Feed the continuation ids[prompt_tokens:] one token at a time as decode steps; returns the
    sum of -log p(next token) and the greedy choice at every continuation position.

    Free-running greedy decoding gives the same tokens as ids up to the first position where the
    greedy choice differs from ids, so that position is the first divergence from ids."""
    session = engine.session(ids[:prompt_tokens], len(ids) - prompt_tokens)
    logits = session.prefill()
    nll, choices = 0.0, []
    for pos in range(prompt_tokens, len(ids)):
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        nll -= logp[ids[pos]].item()
        choices.append(int(logp.argmax()))
        if pos + 1 < len(ids):
            logits = session.step([ids[pos]])
    return nll, choices


def decode_path_nll(engine: Engine, ids: list[int], prompt_tokens: int) -> tuple[float, int]:
    """Sum of -log p(next token) over the continuation, each step run as a decode step."""
    return teacher_forced(engine, ids, prompt_tokens)[0], len(ids) - prompt_tokens


def agreement(ref: list[int], ours: list[int]) -> tuple[float, int]:
    """(share of positions with the same token, index of the first divergence or the length)."""
    n = max(len(ref), len(ours), 1)
    same = sum(a == b for a, b in zip(ref, ours))
    first = next((i for i, (a, b) in enumerate(zip(ref, ours)) if a != b), min(len(ref), len(ours)))
    return same / n, first


NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(text: str) -> str | None:
    """The answer after '####' if present, else the last number in the text, without commas."""
    if "####" in text:
        text = text.split("####")[-1]
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def read_gsm8k(path: Path, limit: int) -> list[tuple[str, str]]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append((str(row["question"]), str(final_number(str(row["answer"])))))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DaopError(f"{path}:{n}: expected a JSON object with question and answer ({exc})") from exc
        if len(items) >= limit:
            break
    return items


@dataclass
class EvalArgs:
    data: Path
    max_docs: int = 16
    prompt_tokens: int = 64
    continuation_tokens: int = 64
    gen_tokens: int = 32
    gsm8k: Path | None = None
    gsm8k_items: int = 20
    gsm8k_max_tokens: int = 256


def load_reference(model: str | None, options: dict) -> tuple[Engine, dict]:
    """The oracle: policy gpu on the requested device and dtype, or float32 on the CPU when the
    model does not fit the device. Returns the engine and a description for the report."""
    options = dict(options, policy="gpu", gpu_memory=None, expert_ratio=None, expert_dtype=None)
    try:
        engine = Engine.from_pretrained(model, **options)
    except (DaopError, DEVICE_OOM) as exc:
        if isinstance(exc, DaopError) and "policy 'gpu' needs all" not in str(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine = Engine.from_pretrained(model, **dict(options, device="cpu", dtype="fp32"))
    return engine, {"reference_policy": "gpu", "reference_device": engine.device.type,
                    "reference_dtype": str(engine.decoder.dtype).replace("torch.", ""), "reference_threads": engine.threads}


def documents(engine: Engine, args: EvalArgs) -> list[list[int]]:
    """Token ids of the first max_docs documents long enough for prompt + continuation."""
    need = args.prompt_tokens + args.continuation_tokens
    out = []
    for doc in read_documents(args.data):
        ids = engine.tokenizer.encode(doc)
        if len(ids) >= need:
            out.append(ids[:need])
        if len(out) >= args.max_docs:
            break
    if not out:
        raise DaopError(f"{args.data}: no document has {need} tokens (lower --prompt-tokens/--continuation-tokens)")
    return out


def score(engine: Engine, args: EvalArgs) -> dict:
    """One engine's raw results: decode-path NLL, greedy continuations, GSM8K answers."""
    docs = documents(engine, args)
    nll = n = 0.0
    greedy, continuations = SamplingParams(max_new_tokens=args.gen_tokens), []
    for ids in docs:
        d_nll, d_n = decode_path_nll(engine, ids, args.prompt_tokens)
        nll, n = nll + d_nll, n + d_n
        continuations.append(list(engine.generate_ids(ids[: args.prompt_tokens], greedy)))
    result = {"nll": nll, "tokens": int(n), "continuations": continuations, "documents": len(docs)}
    if args.gsm8k:
        items = read_gsm8k(args.gsm8k, args.gsm8k_items)
        answers = [final_number(engine.generate(f"Question: {q}\nAnswer:", max_new_tokens=args.gsm8k_max_tokens,
                                                stop=["\n\nQuestion:"]))
                   for q, _ in items]
        result["gsm8k"] = sum(a == gold for a, (_, gold) in zip(answers, items)) / len(items)
        result["gsm8k_items"] = len(items)
    return result


def compare(reference: dict, ours: dict, gen_tokens: int) -> dict:
    """The report: our numbers next to exact inference's."""
    ppl_ref = math.exp(reference["nll"] / reference["tokens"])
    ppl = math.exp(ours["nll"] / ours["tokens"])
    pairs = [agreement(r, o) for r, o in zip(reference["continuations"], ours["continuations"])]
    report = {
        "documents": ours["documents"], "scored_tokens": ours["tokens"],
        "decode_path_perplexity": round(ppl, 4), "reference_perplexity": round(ppl_ref, 4),
        "perplexity_change_pct": round(100 * (ppl / ppl_ref - 1), 3),
        "greedy_token_match": round(statistics.mean(m for m, _ in pairs), 4),
        "greedy_first_divergence_median": statistics.median(f for _, f in pairs), "greedy_tokens": gen_tokens,
    }
    if "gsm8k" in ours:
        report.update(gsm8k_items=ours["gsm8k_items"], gsm8k_exact_match=ours["gsm8k"], gsm8k_reference_exact_match=reference["gsm8k"])
    return report
