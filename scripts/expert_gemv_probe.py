#!/usr/bin/env python3
"""How fast does one decode token go through Mixtral-size experts on this GPU, by kernel?

For the two products of an expert (gate_up [2I, D] and down [D, I]) in bf16 and int8, with 1 row
(one expert alone), 2 rows (one token's top-2, routed on the device) and 8 rows (4 tokens): cuBLAS
`F.linear` per expert (the experts picked on the host), `torch._grouped_mm` over sorted rows (bf16,
where torch has it) and daop's Triton kernel (`daop.kernels.expert_gemv`) at several block shapes,
direct and indexed. Times are CUDA-event medians (triton.testing.do_bench), rotating among 8
experts, so each call reads its weights from HBM. Also checks that the indexed kernel gives the
direct kernel's output bit for bit and states each variant's error against a float32 reference.

    python3 scripts/expert_gemv_probe.py [--small]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's daop, installed or not
from daop.kernels import expert_gemv  # noqa: E402

BLOCKS = [(32, 256, 4), (16, 512, 4), (8, 1024, 4), (32, 256, 8), (16, 512, 8), (8, 1024, 8), (4, 2048, 4), (4, 2048, 8),
          (4, 1024, 4), (2, 4096, 4), (2, 2048, 4), (8, 2048, 8)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    D, I = (256, 896) if args.small else (4096, 14336)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    E = 8
    rows = []
    for name, N, K in (("gate_up", 2 * I, D), ("down", D, I)):
        w = (torch.randn(E, N, K, device=dev) * 0.02).bfloat16()
        s8 = w.float().abs().amax(-1) / 127
        q8 = torch.round(w.float() / s8[..., None]).clamp(-127, 127).to(torch.int8)
        s8 = s8.bfloat16()
        for fmt in ("bf16", "int8"):
            wbytes = N * K * (2 if fmt == "bf16" else 1)
            W, S = (w, None) if fmt == "bf16" else (q8, s8)
            for M in (1, 2, 8):
                x = torch.randn(M, K, device=dev).bfloat16()
                experts = [torch.tensor([(j + m) % E for m in range(M)], device=dev) for j in range(E)] if M > 1 else None
                uniq = min(M, E)
                ref = None
                if M == 1:
                    ref = F.linear(x.float(), (W[0].float() * (S[0].float()[:, None] if S is not None else 1)))
                # cuBLAS per expert (bf16 only; int8 via a float conversion is not a contender)
                if fmt == "bf16":
                    j = [0]

                    def cublas():
                        j[0] = (j[0] + 1) % E
                        if M == 1:
                            return F.linear(x, W[j[0]])
                        return [F.linear(x[m:m + 1], W[(j[0] + m) % E]) for m in range(M)]
                    ms = bench(cublas)
                    rows.append({"product": name, "format": fmt, "rows": M, "kernel": "cublas per expert", "ms": ms,
                                 "gbps": uniq * wbytes / ms / 1e6})
                    if hasattr(torch, "_grouped_mm") and M > 1:
                        # rows sorted by expert: each expert has M/E or 1 row; offs = cumulative row ends
                        try:
                            ids = torch.arange(M, device=dev) % E
                            counts = torch.bincount(ids, minlength=E)
                            offs = counts.cumsum(0).to(torch.int32)
                            order = ids.argsort(stable=True)
                            xs = x[order]
                            wt = W.transpose(-2, -1)

                            def grouped():
                                return torch._grouped_mm(xs, wt, offs=offs)
                            y = grouped()
                            ms = bench(grouped)
                            rows.append({"product": name, "format": fmt, "rows": M, "kernel": "torch._grouped_mm", "ms": ms,
                                         "gbps": uniq * wbytes / ms / 1e6})
                        except Exception as exc:  # noqa: BLE001 - a probe reports what is missing
                            rows.append({"product": name, "format": fmt, "rows": M, "kernel": "torch._grouped_mm",
                                         "error": str(exc)[:200]})
                for blocks in BLOCKS:
                    j = [0]
                    if M == 1:
                        def direct():
                            j[0] = (j[0] + 1) % E
                            return expert_gemv.gemv(x, W[j[0]], S[j[0]] if S is not None else None, blocks=blocks)
                        fn = direct
                    else:
                        def indexed():
                            j[0] = (j[0] + 1) % E
                            return expert_gemv.gemv(x, W, S, idx=experts[j[0]], blocks=blocks)
                        fn = indexed
                    try:
                        y = fn()
                        ms = bench(fn)
                    except Exception as exc:  # noqa: BLE001
                        rows.append({"product": name, "format": fmt, "rows": M, "kernel": f"triton {blocks}", "error": str(exc)[:200]})
                        continue
                    row = {"product": name, "format": fmt, "rows": M, "kernel": f"triton {blocks}", "ms": ms,
                           "gbps": uniq * wbytes / ms / 1e6, "default": blocks == expert_gemv.block_shape(N, K, dev)}
                    if M == 1:
                        y0 = expert_gemv.gemv(x, W[0], S[0] if S is not None else None, blocks=blocks)
                        row["rel_err_vs_fp32"] = rel_err(y0, ref)
                    else:
                        idx = experts[0]
                        y = expert_gemv.gemv(x, W, S, idx=idx, blocks=blocks)
                        alone = torch.cat([expert_gemv.gemv(x[m:m + 1], W[int(idx[m])], S[int(idx[m])] if S is not None else None,
                                                            blocks=blocks) for m in range(M)])
                        row["indexed_equals_direct"] = bool(torch.equal(y, alone))
                    rows.append(row)
    print(f"{'product':8} {'fmt':5} {'rows':>4} {'kernel':32} {'ms':>8} {'GB/s':>7}  extra")
    for r in rows:
        extra = {k: v for k, v in r.items() if k in ("rel_err_vs_fp32", "indexed_equals_direct", "default", "error")}
        print(f"{r['product']:8} {r['format']:5} {r['rows']:>4} {r['kernel']:32} {r.get('ms', float('nan')):8.4f} "
              f"{r.get('gbps', float('nan')):7.0f}  {extra}")
    print(json.dumps({"kind": "expert_gemv_probe", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "D": D, "I": I, "rows": rows}))


if __name__ == "__main__":
    main()
