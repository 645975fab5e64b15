"""A CPU decode step attends over the cache's written part, rounded up to CPU_ATTEND_POSITIONS
(`Decoder.written_part`), with the same bits as over the whole cache under its mask."""
import pytest
import torch

import daop.model.decoder as decoder_module
from daop.model.decoder import written_length
from daop.engine import Engine
from daop.model.layers import attend, decode_mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,heads,groups", [(8, 4, 2), (1, 4, 2), (3, 8, 8)])
def test_attention_over_the_rounded_written_part_has_the_whole_caches_bits(dtype, rows, heads, groups):
    gen = torch.Generator().manual_seed(rows * heads)
    keys, values = (torch.randn(rows, groups, 1024, 32, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(rows, heads, 1, 32, generator=gen).to(dtype)
    block = decoder_module.CPU_ATTEND_POSITIONS
    for _ in range(12):
        pos = torch.randint(0, 900, (rows,), generator=gen)
        length = written_length(pos, block)
        whole = attend(q, keys, values, decode_mask(pos, 1024), 32 ** -0.5, heads != groups)
        part = attend(q, keys[:, :, :length], values[:, :, :length], decode_mask(pos, length), 32 ** -0.5, heads != groups)
        assert torch.equal(part, whole), (pos.tolist(), length)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_decode_attends_over_the_written_part_with_the_whole_caches_bits(dtype, monkeypatch):
    """The shipped model, rows at different positions in a 256-position cache, decoded past a multiple
    of 64: every step's logits equal those of steps reading the whole cache, bit for bit, and the
    step's cache is the written part (a multiple of 64 positions) while the rows' caches stay whole."""
    engine = Engine.from_pretrained(None, device="cpu", dtype=dtype, progress=False)
    dec = engine.decoder
    gen = torch.Generator().manual_seed(1)
    lengths = [50, 61, 3]

    def prefilled():
        cache = dec.new_cache(len(lengths), 256)
        for row, n in enumerate(lengths):
            dec.forward(torch.randint(3, 1000, (1, n), generator=gen), 0, cache.rows(row, row + 1))
        return cache

    seen = []
    real = decoder_module.Decoder.written_part

    def spy(self, cache, pos):
        part = real(self, cache, pos)
        seen.append(part.max_len)
        return part

    monkeypatch.setattr(decoder_module.Decoder, "written_part", spy)
    logits_by_block = {}
    for block in (64, 0):
        monkeypatch.setattr(decoder_module, "CPU_ATTEND_POSITIONS", block)
        gen.manual_seed(1)
        cache, logits = prefilled(), []
        ids = torch.tensor([[5], [6], [7]])
        for step in range(12):
            pos = torch.tensor([n + step for n in lengths])
            out = dec.decode(ids, pos, cache)
            logits.append(out)
            ids = out.argmax(-1, keepdim=True)
        logits_by_block[block] = logits
        assert cache.max_len == 256
    assert all(torch.equal(a, b) for a, b in zip(logits_by_block[64], logits_by_block[0]))
    assert seen[:12] == [64] * 3 + [128] * 9 and seen[12:] == [256] * 12  # the furthest row writes 61, 62, ...


def test_cpu_attend_probe_finds_the_rounded_part_exact_and_times_both_ways():
    """scripts/cpu_attend_probe.py (the README's written-part numbers), a few cases and steps."""
    from helpers import load_script

    before = torch.get_num_threads()
    try:
        rows = load_script("cpu_attend_probe").main(["--trials", "2", "--batch", "2", "--steps", "3"])
    finally:
        torch.set_num_threads(before)
    bits = [r for r in rows if r["kind"] == "bits"]
    assert sum(r["cases"] for r in bits) == 2 * 2 * 3 * 2  # dtypes x layouts x trials x (rounded, written)
    assert all(r["equal"] for r in bits if r["length"] == "rounded")
    step = rows[-1]
    assert step["kind"] == "step" and step["same_tokens"] and step["row_positions"] == 256
