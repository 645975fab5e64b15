"""Low-bit routed experts: weight-only int8 and int4, quantized once at load.

An expert is a tuple of tensors in one of three formats, told apart by its tensors' dtypes:
- float: (gate_up [2I, D], down [D, I]) in the model's dtype;
- int8: (gate_up int8 [2I, D], gate_up scales [2I], down int8 [D, I], down scales [D]); symmetric,
  one scale per output channel: w = q * scale;
- int4: (gate_up packed uint8 [2I, D/2], gate_up scales and zeros [D/G, 2I, 2], down packed
  [D, I/2], down scales and zeros [I/G, D, 2]); asymmetric, one scale and zero per group of G
  input channels: w = (q - 8) * scale + zero, q in 0..15. The packed bytes are laid out as torch's
  CPU kernel reads them on this machine, in blocks of 64 or 32 output rows (`daop.int4_layout`). A GPU
  slot holds the CUDA kernel's own layout, converted on the GPU after each copy (`to_slot_format`).
  The kernels need the intermediate size I in whole blocks and groups, so int4 experts pad it with
  zeros to a multiple of max(64, G) (`padded_inter`): zero gate and up rows give exactly zero
  activations, which the padded down columns multiply, so the function is unchanged.

Scales are in the model's dtype (the kernels take activations and scales in one dtype). Every
expert, wherever it runs, goes through `expert_forward`, so exact runners stay bitwise equal
to each other on one device. Kernels: on the CPU, torch's `_weight_int8pack_mm` and int4 pack/mm
ops; on CUDA, daop's GEMV kernel (`daop.kernels.expert_gemv`) for float and int8 experts with a
few rows, torch's products for more rows, and torch's int4 kernel.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from daop import int4_layout
from daop.errors import DaopError
from daop.kernels import expert_gemv
from daop.model.moe import add_picks, combine, gated, index_tensor, swiglu

EXPERT_DTYPES = ("auto", "int8", "int4")
DEFAULT_GROUP_SIZE = 128
INT4_BLOCK_N = 64  # int4 sizes are whole multiples of every CPU layout's block (daop.int4_layout)
INT8_INNER = 16  # int8 experts: hidden and intermediate sizes in whole multiples of this (`check_geometry`)


def bits_of(expert_dtype: str) -> int | None:
    return {"int8": 8, "int4": 4}.get(expert_dtype)


def parse_expert_dtype(name: str | None, model_dtype: torch.dtype) -> str:
    """'auto' (experts in the model's dtype), 'int8' or 'int4'; a float name must be the model's own dtype."""
    if name is None:
        return "auto"
    key = str(name).lower()
    if key in EXPERT_DTYPES:
        return key
    from daop.weights.loader import DTYPE_NAMES  # late import: the loader imports this module
    if key in DTYPE_NAMES:
        if DTYPE_NAMES[key] != model_dtype:
            raise DaopError(f"--expert-dtype {name} differs from the model's dtype {str(model_dtype).removeprefix('torch.')}; "
                            "float experts use --dtype, low-bit ones int8 or int4")
        return "auto"
    raise DaopError(f"unsupported expert dtype {name!r}; choose one of auto, int8, int4")


def check_geometry(expert_dtype: str, hidden: int, inter: int, group_size: int) -> None:
    """A clear error when the expert shapes cannot be quantized in this format."""
    if expert_dtype == "int8":
        # torch's int8 weight-only product on the CPU takes inner sizes in whole 16s: others gave NaN
        # or crashed (torch 2.13, AVX-512)
        for name, size in (("hidden", hidden), ("intermediate", inter)):
            if size % INT8_INNER:
                raise DaopError(f"int8 experts: the {name} size {size} is not a multiple of {INT8_INNER}; keep the "
                                "model's own dtype for its experts")
        return
    if expert_dtype != "int4":
        return
    if group_size < 32 or group_size & (group_size - 1):
        raise DaopError(f"--group-size {group_size} must be a power of two of at least 32")
    if hidden % group_size or hidden % INT4_BLOCK_N:
        raise DaopError(f"int4 experts: the hidden size {hidden} is not a multiple of --group-size {group_size} "
                        f"and of {INT4_BLOCK_N}; try a smaller --group-size, or int8")


def padded_inter(expert_dtype: str, inter: int, group_size: int) -> int:
    """The intermediate size as stored: int4 pads it to whole kernel blocks and groups."""
    if expert_dtype != "int4":
        return inter
    step = max(INT4_BLOCK_N, group_size)
    return -(-inter // step) * step


def expert_bytes(hidden: int, inter: int, element_size: int, expert_dtype: str = "auto",
                 group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one routed expert (weights and scales) in a format."""
    if expert_dtype == "int8":
        return 3 * hidden * inter + (2 * inter + hidden) * element_size
    if expert_dtype == "int4":
        n = 3 * hidden * padded_inter(expert_dtype, inter, group_size)
        return n // 2 + 2 * (n // group_size) * element_size
    return 3 * hidden * inter * element_size


def expert_shapes(hidden: int, inter: int, expert_dtype: str, group_size: int, dtype: torch.dtype
                  ) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor of one expert in a format (host layout)."""
    D, I = hidden, padded_inter(expert_dtype, inter, group_size)
    if expert_dtype == "int8":
        return [((2 * I, D), torch.int8), ((2 * I,), dtype), ((D, I), torch.int8), ((D,), dtype)]
    if expert_dtype == "int4":
        return [((2 * I, D // 2), torch.uint8), ((D // group_size, 2 * I, 2), dtype),
                ((D, I // 2), torch.uint8), ((I // group_size, D, 2), dtype)]
    return [((2 * I, D), dtype), ((D, I), dtype)]


# --- quantization (float weights -> format) ---

def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of w [N, K]: (q int8 [N, K], scale [N]); w ~ q * scale."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127).clamp_min(1e-12)
    scale = scale.to(dtype or w.dtype)  # round the scale first, quantize against the stored value
    q = torch.round(wf / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_codes(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of w [N, K]: (codes uint8 [N, K] in 0..15, scales and zeros [K/G, N, 2])."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    zero = lo + 8 * scale
    sz = torch.stack([scale, zero], dim=-1).to(dtype or w.dtype)  # [N, K/G, 2]
    s, z = sz[..., 0].float(), sz[..., 1].float()
    codes = torch.round((wg - z[..., None]) / s[..., None] + 8).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return codes, sz.transpose(0, 1).contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] -> packed uint8 [N, K/2] in this machine's CPU kernel layout."""
    return int4_layout.pack(codes, int4_layout.cpu_block_n())


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: codes uint8 [N, K]."""
    return int4_layout.unpack(packed, int4_layout.cpu_block_n())


def quantize(w: torch.Tensor, expert_dtype: str, group_size: int = DEFAULT_GROUP_SIZE,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight matrix [N, K] in a low-bit format: (quantized weights, scales) as the host stores them."""
    if expert_dtype == "int8":
        return quantize_int8(w, dtype)
    if expert_dtype == "int4":
        codes, sz = int4_codes(w, group_size, dtype)
        return pack_int4(codes), sz
    raise ValueError(f"not a low-bit format: {expert_dtype!r}")


def dequantize(w: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """One quantized matrix (weights, scales) in float32 [N, K]."""
    q, s = w
    if q.dtype == torch.int8:
        return q.float() * s.float()[:, None]
    codes = unpack_int4(q).float()  # [N, K]
    G = codes.shape[1] // s.shape[0]
    scale = s[..., 0].float().t().repeat_interleave(G, dim=1)
    zero = s[..., 1].float().t().repeat_interleave(G, dim=1)
    return (codes - 8) * scale + zero


# --- products ---

def int4_inner_k_tiles(K: int) -> int:
    """The CUDA int4 layout's inner K tiles for K input channels (8 where K allows)."""
    for tiles in (8, 4, 2):
        if K % (tiles * 16) == 0:
            return tiles
    raise DaopError(f"int4 experts on CUDA need input sizes that are multiples of 32, got {K}")


def to_slot_format(q: torch.Tensor) -> torch.Tensor:
    """A tensor of an expert copied to a CUDA device, in the layout that device's kernels read: int4
    weights are converted to the CUDA int4 kernel's layout; everything else is used as copied. Runs
    on q's device, on the current stream."""
    if q.dtype != torch.uint8 or q.device.type != "cuda":
        return q
    codes = unpack_int4(q)
    plain = (codes[:, ::2] << 4) | codes[:, 1::2]
    return torch._convert_weight_to_int4pack(plain.contiguous(), int4_inner_k_tiles(codes.shape[1]))


def slot_shapes(fmt: "ExpertFormat", hidden: int, inter: int, device: torch.device) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor of one expert as a device's slot holds it."""
    shapes = fmt.shapes(hidden, inter)
    if fmt.kind != "int4" or device.type != "cuda":
        return shapes
    out = []
    for shape, dtype in shapes:
        if dtype == torch.uint8:
            N, K = shape[0], shape[1] * 2
            tiles = int4_inner_k_tiles(K)
            shape, dtype = (N // 8, K // (tiles * 16), 32, tiles // 2), torch.int32
        out.append((shape, dtype))
    return out


GEMV_MAX_ROWS = 8  # CUDA, at most this many rows through one expert: daop's GEMV kernel; more: torch's products


def gemv_on_cuda(x: torch.Tensor) -> bool:
    """Products of x's rows through experts on CUDA go through daop's GEMV kernel (decode), the
    same kernel for an expert alone and for experts routed on the device (`routed_experts`)."""
    return x.is_cuda and x.shape[0] <= GEMV_MAX_ROWS and expert_gemv.AVAILABLE


@torch.jit.ignore
def float_linear_cuda(x, w):  # no annotations: TorchScript takes an ignored function as Tensors -> Tensor
    """A float expert's product on CUDA: daop's GEMV kernel for a few rows (each row's sum walked
    in one fixed order), torch's F.linear for more (prefill)."""
    if gemv_on_cuda(x):
        return expert_gemv.gemv(x.contiguous(), w)
    return F.linear(x, w)


@torch.jit.ignore
def int8_linear_cuda(x, q, s):  # no annotations: TorchScript takes an ignored function as Tensors -> Tensor
    """int8 weight-only product on CUDA. A few rows (decode): daop's GEMV kernel, which reads each
    int8 weight once and scales in float32 (torch's own CUDA int8 kernel measured 1.6 ms for one
    Mixtral expert, 14x a bf16 product). More rows (prefill): the weights converted to x's dtype
    (exact: |q| <= 127) for one float product, then scaled. Without Triton, always the latter."""
    if gemv_on_cuda(x):
        return expert_gemv.gemv(x, q, s)
    return F.linear(x, q.to(x.dtype)) * s


@torch.jit.ignore
def float_swiglu_cuda(x, w):  # no annotations: TorchScript takes an ignored function as Tensors -> Tensor
    """silu(gate) * up of a float expert's gate_up product [2I, D] on CUDA: for a few rows the GEMV
    kernel computes the activation as it stores the product (the same bits as torch's kernels), for
    more F.linear, F.silu and a product."""
    if gemv_on_cuda(x):
        return expert_gemv.gemv(x.contiguous(), w, glu=True)
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    return F.silu(gate) * up


@torch.jit.ignore
def int8_swiglu_cuda(x, q, s):  # no annotations: TorchScript takes an ignored function as Tensors -> Tensor
    """`float_swiglu_cuda` for an int8 gate_up q with its scales s."""
    if gemv_on_cuda(x):
        return expert_gemv.gemv(x.contiguous(), q, s, glu=True)
    gate, up = int8_linear_cuda(x, q, s).chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_q(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] times a quantized matrix's transpose -> [M, N] in x's dtype (TorchScript-compatible).

    int8: torch's int8 weight-only kernel on the CPU; on CUDA `int8_linear_cuda`. int4: torch's kernel
    for the layout at hand (CPU layout on the CPU, the converted layout on CUDA)."""
    x = x.contiguous()
    if q.dtype == torch.int8:
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x, q, s)
        return int8_linear_cuda(x, q, s)
    if q.dtype == torch.uint8:
        return torch._weight_int4pack_mm_for_cpu(x, q, 2 * q.shape[1] // s.shape[0], s)
    return torch._weight_int4pack_mm(x, q, x.shape[1] // s.shape[0], s)


def expert_forward(x: torch.Tensor, w: List[torch.Tensor], glu: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """One gated expert, down(act(gate x, up x)), for an expert in any format (TorchScript-compatible).

    Float experts run `daop.model.moe.swiglu` (one product over the stacked gate_up) on the CPU and
    the same sequence through `float_linear_cuda` on CUDA; low-bit ones through `linear_q`. A biased
    expert (gpt-oss) or one with another activation (glu, see `daop.model.moe.gated`) runs
    `biased_expert_forward`."""
    quantized = not w[0].is_floating_point()
    if len(w) != (4 if quantized else 2) or glu is not None:
        return biased_expert_forward(x, w, glu)
    if not quantized:
        if not x.is_cuda:
            return swiglu(x, w[0], w[1])
        return float_linear_cuda(float_swiglu_cuda(x, w[0]), w[1])
    if x.is_cuda and w[0].dtype == torch.int8:
        return linear_q(int8_swiglu_cuda(x, w[0], w[1]), w[2], w[3])
    gate, up = linear_q(x, w[0], w[1]).chunk(2, dim=-1)
    return linear_q(F.silu(gate) * up, w[2], w[3])


def expert_rows(x: torch.Tensor, w: List[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Intermediate rows [lo, hi) of a float SwiGLU expert (w = gate_up [2I, D], down [D, I]): gate
    rows [lo, hi), up rows [I + lo, I + hi), down columns [lo, hi). The parts of a split expert add up
    to its output (as sums in another order: within rounding, not bit for bit); only the rows read
    need to be in w, so a slot holding rows [lo, hi) of an expert serves this part."""
    I = w[1].shape[1]
    gate, up = F.linear(x, w[0][lo:hi]), F.linear(x, w[0][I + lo:I + hi])
    return F.linear(F.silu(gate) * up, w[1][:, lo:hi])


def expert_product(x: torch.Tensor, w: List[torch.Tensor], part: int, quantized: bool) -> torch.Tensor:
    """x times an expert's gate_up (part 0) or down (part 1) matrix, in the expert's format."""
    if quantized:
        return linear_q(x, w[2 * part], w[2 * part + 1])
    if x.is_cuda:
        return float_linear_cuda(x, w[part])
    return F.linear(x, w[part])


def biased_expert_forward(x: torch.Tensor, w: List[torch.Tensor], glu: Optional[Tuple[float, float]]) -> torch.Tensor:
    """An expert whose tensors (format's weights, then optionally the gate_up bias [2I] and the down
    bias [D]) are applied as transformers' gpt-oss experts do: each product, then its bias."""
    quantized = not w[0].is_floating_point()
    k = 4 if quantized else 2
    gate_up = expert_product(x, w, 0, quantized)
    if len(w) > k:
        gate_up = gate_up + w[k]
    gate, up = gate_up.chunk(2, dim=-1)
    y = expert_product(gated(gate, up, glu), w, 1, quantized)
    if len(w) > k:
        y = y + w[k + 1]
    return y


def routes_on_device(fmt: "ExpertFormat", device: torch.device, num_tokens: int) -> bool:
    """Whether `routed_experts` serves these tokens: CUDA with the GEMV kernel, float or int8
    experts (int4 runs torch's kernel per expert), and few enough tokens for the kernel."""
    return (device.type == "cuda" and expert_gemv.AVAILABLE and fmt.kind != "int4" and fmt.plain
            and num_tokens <= GEMV_MAX_ROWS)


# Where a layer's float experts for more rows than the GEMV kernel takes run as two grouped products
# (`grouped_swiglu`) rather than a product pair per expert: on CUDA unless DAOP_NO_GROUPED_MM=1 (the
# CPU keeps its per-expert products; tests turn it on there to check the bookkeeping around it).
GROUPED = {"cuda": os.environ.get("DAOP_NO_GROUPED_MM", "") in ("", "0"), "cpu": False}


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped product runs on this device and dtype and gives per-group products
    (checked once on a small case with an empty group; torch has it for bf16 on recent GPUs)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(24, 64, generator=gen).to(device, dtype)
        w = torch.randn(3, 32, 64, generator=gen).to(device, dtype)
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([8, 8, 24], dtype=torch.int32, device=device))
        ref = torch.cat([F.linear(x[:8], w[0]), F.linear(x[8:], w[2])])
        return bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-1))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_on_device(fmt: "ExpertFormat", device: torch.device, num_tokens: int, hidden: int, inter: int) -> bool:
    """Whether a layer's experts for `num_tokens` rows run as grouped products (`grouped_swiglu`):
    plain float SwiGLU experts of sizes the device's grouped product takes (`grouped_sizes_ok`), more
    rows than the GEMV kernel takes, and grouped products on for the device (`GROUPED`) and working
    there. Every runner asks this with the layer's whole token count, so resident, copied and slot
    experts agree."""
    return (GROUPED.get(device.type, False) and not fmt.quantized and fmt.plain and num_tokens > GEMV_MAX_ROWS
            and grouped_sizes_ok(device, fmt.dtype, hidden, inter) and grouped_mm_works(device, fmt.dtype))


def grouped_sizes_ok(device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> bool:
    """torch's CUDA grouped product needs every row of its operands to be whole 16 bytes: a hidden or
    expert size that is not (e.g. a custom checkpoint 100 wide in bf16) keeps a product pair per expert."""
    if device.type != "cuda":
        return True
    size = torch.empty((), dtype=dtype).element_size()
    return (hidden * size) % 16 == 0 and (inter * size) % 16 == 0


def grouped_swiglu(x: torch.Tensor, offs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Rows x [M, D] sorted by group through a stack of SwiGLU experts (gate_up [G, 2I, D], down
    [G, D, I]): offs [G] int32, the end of each group's rows (a group may be empty). One product pair
    for every group. A group's rows come out the same bit for bit whatever other groups share the
    call and wherever its expert sits in the stack (checked on an H200 at 16, 256 and 1024 tokens,
    `scripts/prefill_probe.py`), so the all-resident runner (the layer's experts) and the offloaded
    one (its slots) agree; the values differ from a product pair per expert within rounding."""
    gate, up = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)


# A CPU device's small bf16 experts, several at a time, run as one batched product pair over the
# stack (`stacked_swiglu`). torch's bf16 CPU product costs 14-16 us a call at 1 or 8 rows of the
# shipped model's shapes (oneDNN's overhead; float32 takes 3-11, benchmarks/results/cpu-attention-
# probe-2core.jsonl), so a layer of a batch step, which
# touches most of its experts, paid that twice per expert: on the 2-core test machine one layer's 8
# experts for 8 tokens took 326 us a pair each against 84 us stacked, and an 8-row decode step 21.4
# against 15.5 ms (`scripts/cpu_stacked_probe.py`, benchmarks/results/cpu-stacked-experts-2core.jsonl). Only
# for experts this small (a product's overhead above its read time: at most STACKED_MAX_EXPERT_BYTES),
# at most STACKED_MAX_TOKENS rows (decode steps and short prompt chunks), and in bf16 where the
# batched product gives each expert's rows the bits of its own product pair, so every runner still
# agrees with the others bit for bit: checked once per expert size on the machine at hand
# (`stacked_is_exact`). On the 2-core test machine (AVX512-BF16) it holds in bf16; in float32 it does
# not, so float32 keeps the products per expert.
STACKED_MAX_EXPERT_BYTES = 256 << 10
STACKED_MAX_TOKENS = 64


def stacks_on_cpu(fmt: "ExpertFormat", h: torch.Tensor, hidden: int, inter: int, experts: list[int]) -> bool:
    """Whether a CPU device's layer runs its routed experts (ascending ids) for h's rows as
    `stacked_swiglu`: when the product pairs it saves (one per expert but one) are at least the
    unpicked experts inside their range that it reads for nothing. Each costs about one pair's time
    at these sizes (a cold expert's read against a call's overhead), so a lone token's two experts
    far apart keep their own pairs."""
    used = len(experts)
    return (h.device.type == "cpu" and h.dtype == torch.bfloat16 and fmt.plain and not fmt.quantized and used > 1
            and experts[-1] - experts[0] + 1 - used <= used - 1
            and h.shape[0] <= STACKED_MAX_TOKENS and 3 * hidden * inter * h.element_size() <= STACKED_MAX_EXPERT_BYTES
            and stacked_is_exact(hidden, inter, h.dtype))


@functools.lru_cache(maxsize=None)
def stacked_is_exact(hidden: int, inter: int, dtype: torch.dtype) -> bool:
    """Whether `stacked_swiglu` gives each expert's rows the bits `expert_forward` gives them alone, on
    this CPU at these sizes: random experts and rows (one token; several, one expert skipped inside
    the range, rows padded), checked once."""
    gen = torch.Generator().manual_seed(0)
    stacked = [(torch.randn(4, 2 * inter, hidden, generator=gen) * hidden ** -0.5).to(dtype),
               (torch.randn(4, hidden, inter, generator=gen) * inter ** -0.5).to(dtype)]
    h = torch.randn(5, hidden, generator=gen).to(dtype)
    cases = [(h[:1], {0: ([0], [0]), 3: ([0], [1])}),
             (h, {0: ([0, 2, 3], [0, 0, 1]), 1: ([1, 4], [0, 1]), 3: ([0, 1, 2, 3, 4], [1, 1, 1, 0, 0])})]
    with torch.inference_mode():
        for x, picks in cases:
            rows_host = {e: (torch.tensor(t), torch.tensor(k)) for e, (t, k) in picks.items()}
            ys = stacked_swiglu(x, rows_host, stacked)
            for e, (tokens, _) in rows_host.items():
                alone = expert_forward(x if x.shape[0] == 1 else x[tokens], [stacked[0][e], stacked[1][e]])
                if not torch.equal(ys[e], alone):
                    return False
    return True


def stacked_swiglu(h: torch.Tensor, rows_host: dict, stacked: List[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each routed expert's output for its rows of h [N, D] (`daop.model.moe.group_by_expert`'s
    rows_host: expert -> (token rows, column)), as `expert_forward` gives it, from one batched product
    pair over the experts lo..hi of the stack (float gate_up [E, 2I, D], down [E, D, I]; views, no
    copy), each expert's rows padded with zero rows to the most any has. An expert in between that no
    row picked runs on zero rows; see STACKED_MAX_EXPERT_BYTES for when that is cheaper."""
    experts = sorted(rows_host)
    lo, hi = experts[0], experts[-1] + 1
    N, D = h.shape
    if N == 1:  # one token: every expert reads it whole
        counts = {e: 1 for e in experts}
        x = h.expand(hi - lo, 1, D)
    else:
        counts = {e: len(rows_host[e][0]) for e in experts}
        M = max(counts.values())
        idx: list[int] = []
        for e in range(lo, hi):
            tokens = rows_host[e][0].tolist() if e in rows_host else []
            idx += tokens + [N] * (M - len(tokens))  # row N: a zero row
        x = torch.cat((h, h.new_zeros(1, D)))[index_tensor(tuple(idx))].view(hi - lo, M, D)
    gate, up = torch.bmm(x, stacked[0][lo:hi].transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, stacked[1][lo:hi].transpose(1, 2))
    return {e: out[e - lo, :counts[e]] for e in experts}


def indexed_swiglu(x: torch.Tensor, idx: torch.Tensor, x_div: int, stacked: List[torch.Tensor],
                   row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows through a stack of SwiGLU experts picked per row by the GEMV kernel (a few rows: decode):
    row m of the output is expert idx[m] of the stack (float gate_up [S, 2I, D] and down [S, D, I];
    int8 with their scales) on x[m // x_div], unweighted or, with row_weights [M] (float32), scaled
    as `combine` scales it. Each row comes out as `expert_forward` gives it for that expert alone on
    CUDA (the same kernel walks each row's sums in the same order), so several experts take one
    launch per product instead of one each."""
    scales = len(stacked) == 4
    act = expert_gemv.gemv(x, stacked[0], stacked[1] if scales else None, idx=idx, x_div=x_div, glu=True)
    down, down_s = (stacked[2], stacked[3]) if scales else (stacked[1], None)
    return expert_gemv.gemv(act, down, down_s, idx=idx, row_weights=row_weights)


def grouped_experts(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, stacked: List[torch.Tensor]) -> torch.Tensor:
    """The weighted sum of every token's routed experts through grouped products, routed on the
    device (no host sync): h [N, D], ids and weights [N, K], stacked float gate_up [E, 2I, D] and down
    [E, D, I]. The picks are sorted by expert (by token and column within one, as
    `daop.model.moe.group_by_expert` lists them), scaled as `combine` does and added per token in
    ascending expert order, as `weighted_sum` adds the same outputs."""
    N, K = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    experts = torch.arange(stacked[0].shape[0], device=h.device, dtype=flat.dtype)
    offs = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)
    tokens = order // K
    parts = combine(grouped_swiglu(h[tokens], offs, stacked[0], stacked[1]), weights.reshape(-1)[order])
    return add_picks(parts[tokens.argsort(stable=True)].view(N, K, -1))


def routed_experts(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, stacked: List[torch.Tensor]) -> torch.Tensor:
    """The weighted sum of every token's routed experts, routed on the device: no host sync, so a
    decode step can be captured. h [N, D] contiguous; stacked: the layer's expert tensors stacked
    over experts (float gate_up [E, 2I, D], down [E, D, I]; int8 with their scales).

    Equal, bit for bit, to running each routed expert alone through `expert_forward` and adding the
    outputs with `daop.model.moe.weighted_sum`: each (token, pick) row goes through the GEMV kernel
    as it would alone, the down product stores it scaled by its weight as `combine` does, and a
    token's picks are added in ascending expert order (two picks in the order routed: their sum is
    the same either way).
    """
    N, K = ids.shape
    if K <= 2:  # two picks: a + b == b + a in floating point, so the picks' order is already the sum's
        experts, row_weights = ids.reshape(-1), weights.reshape(-1).float()
    else:
        by_expert = ids.argsort(dim=-1)
        experts = ids.gather(-1, by_expert).reshape(-1)  # row m: token m // K, its picks in ascending expert order
        row_weights = weights.gather(-1, by_expert).reshape(-1).float()
    # Rows stay in token order, unsorted: the kernel runs the rows of one weight tile side by side
    # whatever their order (the row is its fastest program index), so the tokens routed to one
    # expert share each of its tiles through the L2 cache without a sort and its gathers (about 10
    # launches per layer on an H200: the argsort alone took 5).
    parts = indexed_swiglu(h, experts, K, stacked, row_weights)
    return add_picks(parts.view(N, K, -1))


# --- the format of a model's routed experts, and loading into it ---

@dataclass(frozen=True)
class ExpertFormat:
    """How routed experts are stored: kind 'auto' (the model's float dtype), 'int8' or 'int4';
    dtype is the model's dtype (activations, scales, float weights). biased: each expert also holds
    its gate_up bias [2I] and down bias [D] (model dtype, never quantized), after its weights; glu:
    (alpha, limit) of gpt-oss's clamped SwiGLU, None for silu(gate) * up (`for_model` sets both)."""

    kind: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    group_size: int = DEFAULT_GROUP_SIZE
    biased: bool = False
    glu: tuple[float, float] | None = None

    def for_model(self, config) -> "ExpertFormat":
        """This format with the expert function of a model (its ModelConfig)."""
        return replace(self, biased=config.expert_bias, glu=config.expert_glu)

    @property
    def plain(self) -> bool:
        """A SwiGLU expert without biases: what daop's GEMV routing and CPU kernel compute."""
        return not self.biased and self.glu is None

    @property
    def num_weights(self) -> int:
        """Tensors before the biases: 2 float, 4 low-bit (weights and scales)."""
        return 4 if self.quantized else 2

    @staticmethod
    def of(fmt: "ExpertFormat | torch.dtype") -> "ExpertFormat":
        """A format as given, or experts kept in the float dtype given."""
        return fmt if isinstance(fmt, ExpertFormat) else ExpertFormat("auto", fmt)

    def __post_init__(self) -> None:
        if self.kind not in EXPERT_DTYPES:
            raise DaopError(f"unsupported expert dtype {self.kind!r}; choose one of {', '.join(EXPERT_DTYPES)}")

    @property
    def quantized(self) -> bool:
        return self.kind != "auto"

    @property
    def name(self) -> str:
        """'bfloat16', 'int8' or 'int4-g128': what bench rows and profiles record."""
        if self.kind == "int4":
            return f"int4-g{self.group_size}"
        return self.kind if self.quantized else str(self.dtype).replace("torch.", "")

    def shapes(self, hidden: int, inter: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        shapes = expert_shapes(hidden, inter, self.kind, self.group_size, self.dtype)
        if self.biased:
            shapes += [((2 * self.padded_inter(inter),), self.dtype), ((hidden,), self.dtype)]
        return shapes

    def bytes(self, hidden: int, inter: int) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        biases = (2 * self.padded_inter(inter) + hidden) * size if self.biased else 0
        return expert_bytes(hidden, inter, size, self.kind, self.group_size) + biases

    def bias_views(self, w: tuple[torch.Tensor, ...], inter: int) -> tuple[torch.Tensor, ...]:
        """(gate bias [I], up bias [I], down bias [D]) destinations in an expert's tensors w; () unbiased.
        The padding of int4's gate_up bias stays zero (zero activations, as for its weights)."""
        if not self.biased:
            return ()
        gate_up, down = w[self.num_weights], w[self.num_weights + 1]
        padded = gate_up.shape[0] // 2
        return gate_up[:inter], gate_up[padded:padded + inter], down

    def check(self, hidden: int, inter: int) -> None:
        check_geometry(self.kind, hidden, inter, self.group_size)

    def padded_inter(self, inter: int) -> int:
        return padded_inter(self.kind, inter, self.group_size)

    def quantize_part(self, w: torch.Tensor, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One checkpoint matrix, gate or up [I, D] or down [D, I], quantized (padded to the stored I)."""
        inter = w.shape[1] if part == "down" else w.shape[0]
        pad = self.padded_inter(inter) - inter
        if pad:
            w = F.pad(w, (0, pad) if part == "down" else (0, 0, 0, pad))
        return quantize(w.to(self.dtype), self.kind, self.group_size, self.dtype)

    def from_float(self, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A float expert (gate_up [2I, D], down [D, I]) in this format, host layout."""
        gate_up, down = gate_up.to(self.dtype), down.to(self.dtype)
        if not self.quantized:
            return gate_up, down
        (gq, gs), (uq, us) = (self.quantize_part(t, "gate") for t in gate_up.chunk(2, dim=0))
        dq, ds = self.quantize_part(down, "down")
        cat = 0 if self.kind == "int8" else 1  # the scales' output-row dimension
        return torch.cat([gq, uq]), torch.cat([gs, us], dim=cat), dq, ds


def copy_into_slot(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    """Copy one tensor of an expert from its host layout into a slot (converting int4 for CUDA)."""
    if dst.dtype == src.dtype and dst.shape == src.shape:
        dst.copy_(src, non_blocking=non_blocking)
    else:
        dst.copy_(to_slot_format(src.to(dst.device, non_blocking=non_blocking)))
