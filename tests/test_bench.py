"""`daop bench --smoke` runs on the CPU and ends with a JSON summary with the expected keys."""
import json
import os
import math
import subprocess
import sys

import torch

POINT_KEYS = {"policy", "expert_ratio", "ttft_ms", "decode_ms_per_token", "tokens_per_s_incl_prefill", "gpu_hit_rate",
              "cpu_calls_per_token", "copy_calls_per_token", "resident_calls_per_token", "h2d_bytes_per_token",
              "cpu_wait_share", "bound_ms", "measured_over_bound", "cpu_ms_per_expert_token", "universal_bound_ms",
              "measured_over_universal", "cuda_graph", "host_syncs_per_step", "prefill_bound_ms", "ttft_over_prefill_bound",
              "expert_calls_per_step", "expert_calls_source"}
CARD_KEYS = {"geometry", "layers", "dtype", "gpu", "cpu", "cpu_capability", "cpu_threads", "cpu_mode", "cpu_threads_reason",
             "torch", "git_sha", "expert_bytes", "hardware_profile", "routing_source"}


def test_bench_smoke(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "DAOP_DECODE_SCRATCH": "keep"}  # daop-exact predicts in decode, to copy ahead
    proc = subprocess.run([sys.executable, "-m", "daop.cli", "bench", "--smoke", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "summary"
    assert CARD_KEYS <= set(summary["card"])
    policies = {p["policy"] for p in summary["points"]}
    assert policies == {"gpu", "fiddler", "static", "lru", "ondemand", "daop-paper", "daop-exact"}
    assert {p["expert_ratio"] for p in summary["points"] if p["policy"] != "gpu"} == {0.25, 0.375, 0.5, 0.625}
    for point in summary["points"]:
        assert POINT_KEYS <= set(point)
        assert point["decode_ms_per_token"] > 0
    for point in summary["points"]:
        if point["policy"] == "daop-exact":  # predicts from layer 1 on (its decode keeps its scratch slots)
            assert 0 < point["prediction_precision"] <= 1 and point["degradation_rate"] == 0
        if point["policy"] == "daop-paper":  # predicts from layer 4 on, and tiny-mixtral has 4 layers
            assert point["prediction_precision"] is None
    gpu = next(p for p in summary["points"] if p["policy"] == "gpu")
    assert gpu["gpu_hit_rate"] == 1.0 and gpu["cpu_calls_per_token"] == 0 and gpu["cpu_ms_per_expert_token"] is None
    for point in summary["points"]:
        if point["policy"] == "static":  # computes its host layers on the CPU at every ratio
            assert point["cpu_calls_per_token"] > 0 and point["cpu_ms_per_expert_token"] > 0
    for point in summary["points"]:  # offloaded prefills have a bound over the all-GPU prefill's TTFT
        if point["policy"] == "gpu":
            assert point["prefill_bound_ms"] is None
        else:
            assert point["prefill_gpu_source"] == "gpu policy TTFT" and point["prefill_bound_ms"] > gpu["ttft_ms"]
            assert point["ttft_over_prefill_bound"] > 0
    card = summary["card"]
    assert card["cpu_threads_reason"].startswith(f"{card['cpu_mode']} x{card['cpu_threads']} ")
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "card" and json.loads(lines[-1])["kind"] == "summary"
    assert len(lines) == 2 + len(summary["points"])
    table = subprocess.run([sys.executable, "-m", "daop.cli", "bench", "--table", str(out)], capture_output=True, text=True)
    assert table.returncode == 0 and "| fiddler |" in table.stdout


def test_batch_rows_of_a_runner_that_does_not_count_count_their_expert_calls(tmp_path):
    """The all-resident runner routes on the device and counts no calls: one token calls top_k
    experts per layer; a batch's calls are each layer's distinct experts, counted after the timed
    runs, so its bound reads the experts the batch touches."""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "-m", "daop.cli", "bench", "--smoke", "--policies", "gpu", "--batch", "1,3",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    card = summary["card"]
    layers, k, experts = card["layers"], card["top_k"], card["experts"]
    one, three = sorted(summary["points"], key=lambda p: p["batch"])
    assert (one["batch"], three["batch"]) == (1, 3)
    assert one["expert_calls_per_step"] == k * layers and one["expert_calls_source"] == "one token's top_k"
    assert three["expert_calls_source"] == "counted after the timed runs"
    assert k * layers < three["expert_calls_per_step"] <= min(experts, 3 * k) * layers
    assert three["universal_bound_ms"] > one["universal_bound_ms"]


def test_universal_bound_splits_host_experts_between_the_channels():
    from daop.bench.sweep import prefill_bound_ms, universal_bound_ms
    from daop.hardware import HardwareProfile
    from daop.placement.cost import CostModel

    profile = HardwareProfile(hidden_size=8, intermediate_size=16, dtype="float32", expert_bytes=1, copy_pinned_ms=6.0,
                              copy_pageable_ms=12.0, cpu_threads=1, cpu_token_counts=(1, 8), cpu_expert_ms=(3.0, 3.0),
                              gpu_token_counts=(1, 8), gpu_expert_ms=(0.1, 0.1))
    cost = CostModel(profile)
    # 16 calls per step, half on the host: 8 reads at 3 ms (CPU) and 6 ms (PCIe) side by side = 2 ms each
    assert abs(universal_bound_ms(16, 16, 0.5, cost) - (8 * 2.0 + 16 * 0.1)) < 1e-9
    assert abs(universal_bound_ms(16, 16, 1.0, cost) - 16 * 0.1) < 1e-9  # all resident: GPU time only
    assert universal_bound_ms(0, 0, 0.5, cost) == 0.0
    assert abs(universal_bound_ms(4, 4, 0.0, CostModel()) - 4 * 1.0) < 1e-9  # no profile: the CPU alone
    # a prefill: 8 calls of 8 tokens, half on the host (2 ms each over both channels), plus the GPU's 5 ms
    assert abs(prefill_bound_ms(8, 64, 0.5, cost, 5.0) - (4 * 2.0 + 5.0)) < 1e-9
    assert prefill_bound_ms(0, 0, 0.5, cost, 5.0) == 5.0


def test_shared_bound_slows_both_channels_and_never_beats_the_faster_one_alone():
    import dataclasses

    from daop.bench.sweep import host_expert_ms, universal_bound_ms
    from daop.hardware import HardwareProfile
    from daop.placement.cost import CostModel

    base = HardwareProfile(hidden_size=8, intermediate_size=16, dtype="float32", expert_bytes=1, copy_pinned_ms=6.0,
                           copy_pageable_ms=12.0, cpu_threads=1, cpu_token_counts=(1, 8), cpu_expert_ms=(3.0, 3.0),
                           gpu_token_counts=(1, 8), gpu_expert_ms=(0.1, 0.1))
    assert CostModel(base).shared_factors() is None  # not measured: the shared bound is the separate one
    assert host_expert_ms(1, CostModel(base), shared=True) == host_expert_ms(1, CostModel(base)) == 2.0
    # side by side the CPU takes 1.5x and a copy 1.25x as long: 4.5 ms and 7.5 ms, 2.8125 ms per read
    cost = CostModel(dataclasses.replace(base, shared_cpu_factor=1.5, shared_copy_factor=1.25))
    assert cost.shared_factors() == (1.5, 1.25)
    assert abs(host_expert_ms(1, cost, shared=True) - 4.5 * 7.5 / 12.0) < 1e-9
    assert host_expert_ms(1, cost) == 2.0  # the separate bound is unchanged
    assert abs(universal_bound_ms(16, 16, 0.5, cost, shared=True) - (8 * 4.5 * 7.5 / 12.0 + 16 * 0.1)) < 1e-9
    # channels that slow each other to more than the CPU's own time: the CPU alone is the bound
    worse = CostModel(dataclasses.replace(base, shared_cpu_factor=3.0, shared_copy_factor=2.0))
    assert host_expert_ms(1, worse, shared=True) == 3.0


def test_side_by_side_costs_slow_the_cpu_and_the_copies_by_the_measured_factors(monkeypatch):
    import dataclasses

    from daop.hardware import HardwareProfile
    from daop.placement.cost import CostModel
    from daop.runtime.daop_runner import timing_costs

    base = HardwareProfile(hidden_size=8, intermediate_size=16, dtype="float32", expert_bytes=1, copy_pinned_ms=6.0,
                           copy_pageable_ms=12.0, cpu_threads=1, cpu_token_counts=(1, 8), cpu_expert_ms=(3.0, 5.0),
                           gpu_token_counts=(1, 8), gpu_expert_ms=(0.1, 0.2))
    assert CostModel(base).side_by_side() == CostModel(base)  # not measured: the times alone
    cost = CostModel(dataclasses.replace(base, shared_cpu_factor=1.5, shared_copy_factor=1.25))
    both = cost.side_by_side()
    assert (both.cpu_ms(1), both.cpu_ms(8), both.copy_ms()) == (4.5, 7.5, 7.5)
    assert (both.gpu_ms(1), both.shared_factors()) == (0.1, (1.5, 1.25))  # the GPU's time and the factors kept
    assert both.side_by_side() == both  # applied once
    assert CostModel().side_by_side().cpu_ms(1) == 1.0  # no profile
    assert timing_costs(cost) == both
    monkeypatch.setenv("DAOP_SIDE_BY_SIDE", "0")
    assert timing_costs(cost) == cost


def test_every_geometry_maps_to_a_config():
    from daop.bench.geometry import GEOMETRIES, geometry_config

    for name in GEOMETRIES:
        config, spec = geometry_config(name, 2)
        assert config.num_layers == 2 and spec.model_type == GEOMETRIES[name]["model_type"]
    lite, _ = geometry_config("deepseek-v2-lite")
    assert (lite.num_layers, lite.num_experts, lite.top_k, lite.moe_layer_ids()[0]) == (27, 64, 6, 1)
    assert lite.latent_attention.kv_lora_rank == 512 and lite.rope.kind == "yarn"
    yarn_mscale = 0.1 * 0.707 * math.log(40) + 1  # squared into the softmax scale, as transformers does
    assert abs(lite.latent_attention.softmax_scale - 192 ** -0.5 * yarn_mscale ** 2) < 1e-9


def test_gpt_oss_20b_geometry_and_its_synthetic_experts():
    from dataclasses import replace

    from daop.bench.geometry import geometry_config, synthetic_host_experts

    oss, spec = geometry_config("gpt-oss-20b")
    assert spec.model_type == "gpt_oss" and (oss.num_layers, oss.num_experts, oss.top_k) == (24, 32, 4)
    assert (oss.hidden_size, oss.expert_intermediate_size, oss.num_heads, oss.num_kv_heads, oss.head_dim) == (2880, 2880, 64, 8, 64)
    assert oss.layer_windows == (128, 0) * 12 and oss.context_length == 131072 and oss.vocab_size == 201088
    assert oss.attention_sinks and oss.expert_bias and oss.expert_glu == (1.702, 7.0)
    assert oss.rope.kind == "yarn" and not oss.rope.truncate and oss.rope.factor == 32.0
    assert geometry_config("gpt-oss-20b", 3)[0].layer_windows == (128, 0, 128)
    small = replace(geometry_config("gpt-oss-20b", 2)[0], hidden_size=64, expert_intermediate_size=32, num_experts=4)
    host = synthetic_host_experts(small, torch.float32, pin=False)
    w = host.weights(1, 3)
    assert host.fmt.biased and [tuple(t.shape) for t in w] == [(64, 64), (64, 32), (64,), (64,)]
    assert all(t.abs().sum() > 0 for t in w)


def test_batch_bytes_reads_what_a_run_s_steps_read(tmp_path):
    """scripts/batch_bytes.py: bytes per step from a run's expert calls, card and geometry."""
    from helpers import load_script

    from daop.bench.geometry import geometry_config

    config, _ = geometry_config("tiny-mixtral")
    rows = tmp_path / "rows.jsonl"
    card = {"kind": "card", "dtype": "float32", "expert_bytes": 10**9}
    points = [{"kind": "point", "policy": "gpu", "batch": b, "expert_calls_per_step": calls, "decode_ms_per_token": ms,
               "decode_tokens_per_s": 1000 * b / ms} for b, calls, ms in ((2, 6.0, 4.0), (1, 2.0, 2.0))]
    rows.write_text("\n".join(json.dumps(r) for r in [card, *points]))
    out = load_script("batch_bytes").main([str(rows), "--geometry", "tiny-mixtral"])
    dense = load_script("batch_bytes").dense_bytes(config, torch.float32)
    assert dense > 0 and out["dense_gb"] == round(dense / 1e9, 3)
    one, two = out["points"]
    assert (one["batch"], two["batch"]) == (1, 2)
    assert one["gb_per_step"] == round(2 + dense / 1e9, 2) and two["gb_per_step"] == round(6 + dense / 1e9, 2)
    assert one["tb_per_s"] == round(one["gb_per_step"] / 2.0, 2)
    assert two["tokens_per_s_over_first"] == 1.0 and two["at_one_speed_over_first"] == round(2 * one["gb_per_step"] / two["gb_per_step"], 2)
