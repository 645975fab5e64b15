"""scripts/ab_bench.py: the interleaved order, the per-point summary, and one real old-against-new run of
the bench's smoke setup (both sides this checkout's source: the same code, so only the bookkeeping is
checked, not a speed)."""
import json

import pytest

from helpers import SCRIPTS, load_script



@pytest.fixture(scope="module")
def script():
    return load_script("ab_bench")


def test_each_side_runs_first_and_last_equally_often(script):
    assert script.order(1) == ["old", "new", "new", "old"]
    runs = script.order(3)
    assert runs.count("old") == runs.count("new") == 6 and runs[::4].count("old") == 3


def point(side, policy, decode, ttft, ratio=0.5):
    return {"kind": "point", "side": side, "policy": policy, "expert_ratio": ratio, "batch": 1, "prompt_tokens": 256,
            "gen_tokens": 64, "expert_format": "bfloat16", "decode_ms_per_token": decode, "ttft_ms": ttft}


def test_the_summary_keeps_every_run_and_compares_medians(script):
    points = [point("old", "static", 30.0, 400.0), point("new", "static", 24.0, 380.0), point("new", "static", 26.0, 390.0),
              point("old", "static", 32.0, 420.0), point("old", "gpu", 2.7, 20.0, 1.0), point("new", "gpu", 2.2, 22.0, 1.0)]
    rows = {r["policy"]: r for r in script.summarize(points)}
    static = rows["static"]
    assert static["decode_ms_per_token_old"] == [30.0, 32.0] and static["decode_ms_per_token_new"] == [24.0, 26.0]
    assert static["decode_ms_per_token_old_median"] == 31.0 and static["decode_ms_per_token_new_median"] == 25.0
    assert static["decode_ms_per_token_old_over_new"] == pytest.approx(1.24)
    assert static["ttft_ms_old_over_new"] == pytest.approx(410 / 385, rel=1e-3)
    assert rows["gpu"]["decode_ms_per_token_old_over_new"] == pytest.approx(2.7 / 2.2, rel=1e-3)


def test_a_smoke_run_writes_sides_runs_and_a_summary(script, tmp_path, capsys):
    out = tmp_path / "ab.jsonl"
    src = str(SCRIPTS.parent / "src")
    # the new side's name comes through its environment setting (--new-env), the old side's through --old-sha
    assert script.main(["--old", src, "--old-sha", "aaaaaaa", "--new-env", "DAOP_GIT_SHA=bbbbbbb", "--output", str(out), "--",
                        "--smoke", "--policies", "gpu", "--gen-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["kind"] == "run" and rows[0]["order"] == ["old", "new", "new", "old"]
    assert rows[0]["new_env"] == {"DAOP_GIT_SHA": "bbbbbbb"} and rows[0]["old_env"] == {}
    cards = [r for r in rows if r["kind"] == "card"]
    assert [c["side"] for c in cards] == ["old", "new", "new", "old"]
    assert [c["git_sha"] for c in cards] == ["aaaaaaa", "bbbbbbb", "bbbbbbb", "aaaaaaa"]
    summary = rows[-1]
    assert summary["kind"] == "ab_summary" and len(summary["points"]) == 1
    assert len(summary["points"][0]["decode_ms_per_token_old"]) == 2 and summary["points"][0]["decode_ms_per_token_old_over_new"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "ab_summary"


def test_a_folder_without_daop_is_refused(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--old", str(tmp_path), "--output", str(tmp_path / "x.jsonl"), "--", "--smoke"])


def test_a_side_setting_without_a_value_is_refused(script, tmp_path):
    assert script.parse_env(["GOMP_SPINCOUNT=100", "X="], "--new-env") == {"GOMP_SPINCOUNT": "100", "X": ""}
    for bad in ("GOMP_SPINCOUNT", "=1"):
        with pytest.raises(SystemExit, match="expected NAME=VALUE"):
            script.parse_env([bad], "--new-env")
