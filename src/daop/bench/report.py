"""Reports from bench JSONL files: a plot of tokens/s against expert ratio, and a Markdown table."""
from __future__ import annotations

import json
from pathlib import Path

from daop.errors import DaopError


def read_rows(path: Path) -> tuple[dict, list[dict]]:
    """The last card and all points of a bench JSONL file (a leading "run" row's commit, when given,
    names the code that ran)."""
    card, points, commit = {}, [], None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DaopError(f"{path}: cannot read ({exc.strerror})") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DaopError(f"{path}:{n}: not JSON ({exc})") from exc
        if row.get("kind") == "run" and row.get("commit"):
            commit = row["commit"]
        elif row.get("kind") == "card":
            card = dict(row, git_sha=commit or row.get("git_sha"))
        elif row.get("kind") == "point":
            points.append(row)
    if not points:
        raise DaopError(f"{path}: no benchmark points")
    return card, points


def plot(path: Path, output: Path) -> Path:
    """Decode tokens/s against expert ratio, one line per policy (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DaopError("plotting needs matplotlib: pip install 'daop[plot]'") from exc
    card, points = read_rows(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy in dict.fromkeys(p["policy"] for p in points):
        pts = sorted((p["expert_ratio"], 1000 / p["decode_ms_per_token"]) for p in points if p["policy"] == policy)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=policy)
    ax.set_xlabel("share of experts resident on the GPU")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"{card.get('geometry', '?')} ({card.get('layers', '?')} layers), {card.get('gpu', '?')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    return output


def markdown_table(path: Path) -> str:
    card, points = read_rows(path)
    gbps = card.get("host_bandwidth_gbps")
    read = card.get("host_read_gbps")
    bandwidth = (f"; host memory {read} GB/s read, {gbps} GB/s copy" if read else f"; host read bandwidth {gbps} GB/s" if gbps else "")
    if card.get("cpu_kernel"):
        bandwidth += f"; CPU experts: {card['cpu_kernel']}"
    head = (f"{card.get('geometry')} geometry, {card.get('layers')} layers, {card.get('dtype')}, batch 1, "
            f"{card.get('prompt_tokens')}-token prompts, {card.get('gen_tokens')} generated tokens, "
            f"median of {card.get('prompts')} prompts; GPU: {card.get('gpu')}; CPU threads: {card.get('cpu_threads')}"
            f"{' (' + card['cpu_mode'] + ')' if card.get('cpu_mode') else ''}"
            f"{bandwidth}; "
            f"torch {card.get('torch')}; commit {card.get('git_sha')}.\n\n")
    formats = any("expert_format" in p for p in points)
    syncs = any(p.get("host_syncs_per_step") is not None for p in points)
    universal = any(p.get("measured_over_universal") is not None for p in points)
    shared = any(p.get("measured_over_universal_shared") is not None for p in points)
    floor = any(p.get("cpu_over_read_floor") is not None for p in points)
    prefill = any(p.get("ttft_over_prefill_bound") is not None for p in points)
    lead = "| experts | GPU memory (bf16 expert share) " if formats else ""
    rows = [lead + "| policy | expert ratio | decode ms/token | tokens/s | TTFT ms | GPU hit rate | CPU experts/token | CPU ms/expert-token | H2D MB/token | measured/bound |"
            + " host syncs/step |" * syncs + " measured/universal bound |" * universal
            + " measured/universal bound, shared channels |" * shared + " CPU expert / read floor |" * floor
            + " TTFT / prefill bound |" * prefill,
            "|---|---" * bool(formats) + "|---|---|---|---|---|---|---|---|---|---|" + "---|" * (syncs + universal + shared + floor + prefill)]
    for p in points:
        first = f"| {p.get('expert_format', card.get('dtype'))} | {p.get('budget_ratio', p['expert_ratio']):.3g} " if formats else ""
        if p["policy"] == "accelerate":
            rows.append(first + f"| accelerate | {p['expert_ratio']:.3g} | {p['decode_ms_per_token']:.1f} | "
                        f"{1000 / p['decode_ms_per_token']:.1f} | {p['ttft_ms']:.0f} | | | | | |")
            continue
        cpu_ms = p.get("cpu_ms_per_expert_token")
        rows.append(first + f"| {p['policy']} | {p['expert_ratio']:.3g} | {p['decode_ms_per_token']:.1f} | {1000 / p['decode_ms_per_token']:.1f} | "
                    f"{p['ttft_ms']:.0f} | {p['gpu_hit_rate']:.2f} | {p['cpu_calls_per_token']:.2f} | "
                    f"{f'{cpu_ms:.2f}' if cpu_ms else ''} | {p['h2d_bytes_per_token'] / 1e6:.0f} | {p['measured_over_bound']} |"
                    + (f" {p['host_syncs_per_step']:g} |" if p.get("host_syncs_per_step") is not None else " |") * syncs
                    + (f" {p.get('measured_over_universal') or ''} |") * universal
                    + (f" {p.get('measured_over_universal_shared') or ''} |") * shared
                    + (f" {p.get('cpu_over_read_floor') or ''} |") * floor
                    + (f" {p.get('ttft_over_prefill_bound') or ''} |") * prefill)
    return head + "\n".join(rows) + "\n"
