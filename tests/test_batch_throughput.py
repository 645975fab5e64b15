"""scripts/batch_throughput.py on the shipped model: its JSON line, and the tokens of both runs
(max batch 1 and C) equal each request generated alone."""
import json

import pytest

from daop.engine import Engine
from daop.sampling import SamplingParams
from helpers import load_script

@pytest.fixture(scope="module")
def script():
    return load_script("batch_throughput")


def test_batch_throughput_reports_both_runs_with_the_tokens_each_request_gets_alone(script, capsys):
    args = script.parse(["--device", "cpu", "-n", "3", "-c", "2", "--prompt-tokens", "12", "--gen-tokens", "5"])
    summary, outputs = script.run(args)
    lines = capsys.readouterr().out.strip().splitlines()
    card = json.loads(lines[0])
    assert card["kind"] == "card" and card["concurrency"] == 2 and card["git_sha"]
    assert [r["max_batch"] for r in summary["runs"]] == [1, 2]
    for row in summary["runs"]:
        assert row["generated_tokens"] == 3 * 5 and row["tokens_per_s"] > 0
        assert 0 < row["ttft_ms"]["p50"] <= row["ttft_ms"]["p99"] and 0 < row["itl_ms"]["p50"] <= row["itl_ms"]["p99"]
    assert summary["throughput_ratio"] == pytest.approx(summary["runs"][1]["tokens_per_s"] / summary["runs"][0]["tokens_per_s"], rel=1e-2)
    engine = Engine.from_pretrained(None, device="cpu", progress=False)
    engine.eos_ids = frozenset()
    alone = [list(engine.generate_ids(p, SamplingParams(max_new_tokens=5))) for p in script.prompts(engine, 3, 12, 0)]
    assert outputs[1] == alone and outputs[2] == alone and summary["same_tokens"]


def test_the_last_line_is_the_summary(script, capsys):
    script.main(["--device", "cpu", "-n", "1", "-c", "1", "--prompt-tokens", "4", "--gen-tokens", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["kind"] == "summary" and [r["max_batch"] for r in last["runs"]] == [1] and last["same_tokens"]
