#!/usr/bin/env python3
"""How fast do Mixtral-size int4 experts go through daop's int4 kernel on this GPU, by variant?

For an expert's gate_up [2I, D] and down [D, I] in int4 (groups of 128, the host's packed layout),
with 1 row (an expert alone) and 2 rows (a token's top-2, routed on the device): daop's
`gemv_int4` at several (BLOCK_K, warps, split) choices, against torch's CUDA int4 kernel
(`_weight_int4pack_mm` on its own converted layout) and the prefill path (dequantize, then a bf16
product). Times are CUDA-event medians (triton.testing.do_bench), rotating among 8 experts so each
call reads its weights from HBM; GB/s counts packed bytes and scales.

    python3 scripts/int4_gemv_probe.py
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
import triton.testing

from daop import int4_layout
from daop.kernels import expert_gemv
from daop.quant import dequantize, int4_inner_k_tiles, quantize

VARIANTS = [(64, 4, None), (32, 4, None), (128, 8, None), (64, 8, None), (64, 8, 1), (64, 8, 2), (64, 8, 4),
            (64, 8, 8), (64, 8, 16), (32, 8, 16)]


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main() -> None:
    D, I, G, E = 4096, 14336, 128, 8
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for name, N, K in (("gate_up", 2 * I, D), ("down", D, I)):
        qs, szs, tiny = [], [], []
        for _ in range(E):
            q, sz = quantize(torch.randn(N, K, device=dev) * 0.02, "int4", G, torch.bfloat16)
            qs.append(q)
            szs.append(sz)
        ref_w = dequantize((qs[0], szs[0]))
        Q, SZ = torch.stack(qs), torch.stack(szs)
        for q in qs:
            codes = int4_layout.unpack(q, int4_layout.cpu_block_n())
            tiny.append(torch._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous(),
                                                           int4_inner_k_tiles(K)))
        nbytes = Q[0].numel() + SZ[0].numel() * 2
        for M in (1, 2):
            x = torch.randn(M, K, device=dev).bfloat16()
            ref = x.float() @ ref_w.t()
            j = [0]

            def torch_int4():
                j[0] = (j[0] + 1) % E
                return torch._weight_int4pack_mm(x, tiny[j[0]], G, SZ[j[0]])
            ms = bench(torch_int4)
            rows.append({"product": name, "rows": M, "kernel": "torch _weight_int4pack_mm (per expert)", "ms": ms,
                         "gbps": nbytes / ms / 1e6})
            if M == 1:
                def prefill_path():
                    j[0] = (j[0] + 1) % E
                    return F.linear(x, expert_gemv.dequantize_int4(Q[j[0]], SZ[j[0]], x.dtype))
                ms = bench(prefill_path)
                rows.append({"product": name, "rows": M, "kernel": "dequantize + F.linear", "ms": ms, "gbps": nbytes / ms / 1e6})
            for block_k, warps, split in VARIANTS:
                idx = [torch.tensor([(i + m) % E for m in range(M)], device=dev) for i in range(E)]

                def ours():
                    j[0] = (j[0] + 1) % E
                    if M == 1:
                        return expert_gemv.gemv_int4(x, Q[j[0]], SZ[j[0]], split=split, block_k=block_k, warps=warps)
                    return expert_gemv.gemv_int4(x, Q, SZ, idx=idx[j[0]], split=split, block_k=block_k, warps=warps)
                try:
                    ours()
                    ms = bench(ours)
                except Exception as exc:  # noqa: BLE001 - a probe reports what fails
                    rows.append({"product": name, "rows": M, "kernel": f"daop int4 {block_k}/{warps}/{split}", "error": str(exc)[:200]})
                    continue
                default_split = expert_gemv.int4_split(N, K, G, int4_layout.cpu_block_n(), dev)
                row = {"product": name, "rows": M, "kernel": f"daop int4 k{block_k} w{warps} split {split or default_split}",
                       "ms": ms, "gbps": M * nbytes / ms / 1e6,
                       "default": (block_k, warps) == (expert_gemv.int4_block_k(G), 4) and split in (None, default_split)}
                if M == 1:
                    y = expert_gemv.gemv_int4(x, Q[0], SZ[0], split=split, block_k=block_k, warps=warps)
                    row["rel_err_vs_fp32"] = float((y.float() - ref).norm() / ref.norm())
                rows.append(row)
    print(f"{'product':8} {'rows':>4} {'kernel':44} {'ms':>8} {'GB/s':>7}  extra")
    for r in rows:
        extra = {k: v for k, v in r.items() if k in ("rel_err_vs_fp32", "default", "error")}
        print(f"{r['product']:8} {r['rows']:>4} {r['kernel']:44} {r.get('ms', float('nan')):8.4f} "
              f"{r.get('gbps', float('nan')):7.0f}  {extra}")
    print(json.dumps({"kind": "int4_gemv_probe", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "D": D, "I": I, "group": G, "rows": rows}))


if __name__ == "__main__":
    main()
