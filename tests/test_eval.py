"""daop eval: exact policies score exactly like the reference; approximations show up; parsing."""
import json

import pytest

from daop.engine import Engine
from daop.errors import DaopError
from daop.evaluate import EvalArgs, agreement, compare, final_number, read_gsm8k, score

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
        "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n\n")


CODE = ("def merge(left, right):\n    result = []\n    while left and right:\n        if left[0] <= right[0]:\n"
        "            result.append(left.pop(0))\n        else:\n            result.append(right.pop(0))\n"
        "    return result + left + right\n\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "docs.txt"
    path.write_text(TEXT * 3)
    return path


def engine(policy, ratio=None):
    return Engine.from_pretrained(None, device="cpu", dtype="fp32", progress=False, policy=policy, expert_ratio=ratio)


def test_exact_policy_has_no_quality_change(data):
    args = EvalArgs(data, max_docs=2, prompt_tokens=16, continuation_tokens=24, gen_tokens=12)
    report = compare(score(engine("gpu"), args), score(engine("daop-exact", 0.25), args), 12)
    assert report["perplexity_change_pct"] == 0.0
    assert report["greedy_token_match"] == 1.0
    assert report["scored_tokens"] == 2 * 24


def test_approximate_policy_changes_the_decode_path(tmp_path):
    data = tmp_path / "code.txt"  # text the model has not memorised, so a changed decode path shows
    data.write_text(CODE * 3)
    args = EvalArgs(data, max_docs=2, prompt_tokens=16, continuation_tokens=24, gen_tokens=12)
    report = compare(score(engine("gpu"), args), score(engine("daop-paper", 0.25), args), 12)
    assert report["perplexity_change_pct"] != 0.0
    assert report["greedy_token_match"] < 1.0  # predicted routing changes greedy continuations of this text
    assert report["greedy_first_divergence_median"] < 12


def test_cli_scores_against_the_all_gpu_reference(data, capsys):
    from daop.cli import main

    rc = main(["eval", "--data", str(data), "--policy", "daop-exact", "--expert-ratio", "0.25", "--device", "cpu",
               "--dtype", "fp32", "--max-docs", "1", "--prompt-tokens", "16", "--continuation-tokens", "8",
               "--gen-tokens", "4", "--no-progress"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert (report["reference_policy"], report["reference_device"], report["reference_dtype"]) == ("gpu", "cpu", "float32")
    assert report["policy"] == "daop-exact" and report["expert_ratio"] == 0.25
    assert report["perplexity_change_pct"] == 0.0 and report["greedy_token_match"] == 1.0


def test_final_number_and_agreement():
    assert final_number("so 9 * 2 = 18.\n#### 1,234") == "1234"
    assert final_number("The answer is 42.") == "42"
    assert final_number("no digits") is None
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert agreement([1, 2], [1, 2]) == (1.0, 2)


def test_gsm8k_scoring_and_bad_file(tmp_path, data):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("\n".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}\n#### {2 * a}"}) for a in (1, 2)))
    assert read_gsm8k(gsm, 10) == [("What is 1 plus 1?", "2"), ("What is 2 plus 2?", "4")]
    assert read_gsm8k(gsm, 1) == [("What is 1 plus 1?", "2")]
    args = EvalArgs(data, max_docs=1, prompt_tokens=16, continuation_tokens=8, gen_tokens=4, gsm8k=gsm, gsm8k_items=2,
                    gsm8k_max_tokens=6)
    model = engine("gpu")
    result = score(model, args)
    # the score is the share of generated final numbers equal to the gold ones, for 6-token answers
    answers = [final_number(model.generate(f"Question: {q}\nAnswer:", max_new_tokens=6)) for q, _ in read_gsm8k(gsm, 2)]
    assert result["gsm8k_items"] == 2
    assert result["gsm8k"] == sum(a == gold for a, gold in zip(answers, ["2", "4"])) / 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(DaopError, match="bad.jsonl:1"):
        read_gsm8k(bad, 5)
