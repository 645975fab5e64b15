"""`daop profile`: routing statistics checked against transformers' own routing on a tiny checkpoint."""
import json

import numpy as np
import pytest
import torch

from daop.cli import main
from daop.engine import Engine
from daop.errors import DaopError
from daop.predict import quota_placement
from daop.profile import SCHEMA, profile_routing, read_documents, run_profile, write_json_atomic
from daop.runtime.setup import load_popularity
from daop.tokenizer import Tokenizer

DOCS = ["In the beginning was the word, and the word was with the model.",
        "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.",
        "def forward(self, x):\n    return self.layer(x) + x"]
EOS = 2


def write_text(tmp_path, docs=DOCS):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n  \n".join(docs) + "\n")
    return path


def topk_ids(logits, k=2):
    return logits.topk(k, dim=-1).indices


def oracle(hf, model_dir, docs, prompt_tokens, gen_tokens):
    """The same statistics from transformers: greedy generation, then one full forward per document."""
    tok = Tokenizer.from_dir(model_dir)
    layers = hf.model.layers
    L, E = len(layers), hf.config.num_local_experts
    r = {k: np.zeros((L, E), dtype=np.int64) for k in ("prefill", "decode")}
    r.update({k: np.zeros(L) for k in ("overlap", "top1", "set", "predicted", "set2", "predicted2")})
    normed = {}
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o, l=l: normed.__setitem__(l, o[0]))
             for l, layer in enumerate(layers)]
    decode_tokens = 0
    try:
        with torch.no_grad():
            for text in docs:
                prompt = tok.encode(text)[:prompt_tokens]
                P = len(prompt)
                gen = hf.generate(torch.tensor([prompt]), max_new_tokens=gen_tokens, do_sample=False,
                                  pad_token_id=EOS)[0, P:].tolist()
                fed = gen[: gen.index(EOS)] if EOS in gen else gen  # the loop stops before feeding EOS
                decode_tokens += len(fed)
                router = hf(torch.tensor([prompt + fed]), output_router_logits=True).router_logits
                for l in range(L):
                    ids = topk_ids(router[l])
                    r["prefill"][l] += np.bincount(ids[:P].flatten().numpy(), minlength=E)
                    r["decode"][l] += np.bincount(ids[P:].flatten().numpy(), minlength=E)
                    seen = set(ids[:P].flatten().tolist())
                    r["overlap"][l] += sum(e in seen for e in ids[P:].flatten().tolist())
                    if l + 1 < L:
                        pred = topk_ids(normed[l][P:] @ layers[l + 1].mlp.gate.weight.T)
                        true = topk_ids(router[l + 1])[P:]
                        r["top1"][l + 1] += int((pred[:, 0] == true[:, 0]).sum())
                        r["set"][l + 1] += int((pred[:, :, None] == true[:, None, :]).any(-1).sum())
                        r["predicted"][l + 1] += len(fed)
                    if l + 2 < L:
                        pred = topk_ids(normed[l][P:] @ layers[l + 2].mlp.gate.weight.T)
                        true = topk_ids(router[l + 2])[P:]
                        r["set2"][l + 2] += int((pred[:, :, None] == true[:, None, :]).any(-1).sum())
                        r["predicted2"][l + 2] += len(fed)
    finally:
        for h in hooks:
            h.remove()
    return r, decode_tokens


def test_profile_matches_transformers_routing(tiny_dir, tmp_path):
    hf, path = tiny_dir("mixtral")
    out = tmp_path / "stats.json"
    stats = run_profile(str(path), str(write_text(tmp_path)), str(out), prompt_tokens=12, gen_tokens=6,
                        device="cpu", dtype="fp32", progress=False)
    assert json.loads(out.read_text()) == stats
    ref, decode_tokens = oracle(hf, path, DOCS, 12, 6)
    assert decode_tokens > 0
    assert stats["provenance"]["decode_tokens"] == decode_tokens
    assert stats["prefill_counts"] == ref["prefill"].tolist()
    assert stats["decode_counts"] == ref["decode"].tolist()
    selections = ref["decode"].sum(axis=1)
    assert stats["prefill_decode_overlap"]["per_layer"] == pytest.approx((ref["overlap"] / selections).tolist())
    assert stats["next_layer_top1"]["per_layer"][0] is None
    assert stats["next_layer_top1"]["per_layer"][1:] == pytest.approx((ref["top1"][1:] / ref["predicted"][1:]).tolist())
    assert stats["next_layer_set_overlap"]["per_layer"][1:] == pytest.approx(
        (ref["set"][1:] / (2 * ref["predicted"][1:])).tolist())
    assert stats["two_layers_ahead_set_overlap"]["per_layer"][:2] == [None, None]
    assert stats["two_layers_ahead_set_overlap"]["per_layer"][2:] == pytest.approx(
        (ref["set2"][2:] / (2 * ref["predicted2"][2:])).tolist())


def test_profile_cli_fields_and_counts(tiny_dir, tmp_path, capsys):
    _, path = tiny_dir("mixtral")
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "sub" / "routing.json"
    rc = main(["profile", "--model", str(path), "--data", str(data), "--output", str(out), "--max-docs", "2",
               "--prompt-tokens", "8", "--gen-tokens", "4", "--device", "cpu", "--dtype", "fp32"])
    assert rc == 0 and str(out) in capsys.readouterr().err
    stats = json.loads(out.read_text())
    prov = stats["provenance"]
    assert stats["schema"] == SCHEMA and prov["docs"] == 2 and prov["data"] == str(data)
    assert prov["model"] == str(path) and prov["torch"] == torch.__version__ and prov["prompt_tokens"] == 16
    assert (stats["num_layers"], stats["num_experts"], stats["top_k"]) == (3, 8, 2)
    for l in range(3):
        assert sum(stats["prefill_counts"][l]) == prov["prompt_tokens"] * 2
        assert sum(stats["decode_counts"][l]) == prov["decode_tokens"] * 2
    for key in ("prefill_decode_overlap", "next_layer_top1", "next_layer_set_overlap", "two_layers_ahead_set_overlap",
                "load_entropy"):
        known = [v for v in stats[key]["per_layer"] if v is not None]
        assert known and all(0.0 <= v <= 1.0 for v in known)
        assert stats[key]["mean"] == pytest.approx(sum(known) / len(known))
    popularity = load_popularity(str(out), 3, 8)
    assert popularity.tolist() == stats["decode_counts"]
    assert len(quota_placement(popularity, [0, 1, 2], 6).resident_experts(0)) == 2


def test_profile_dense_layers_stay_zero(tiny_dir, tmp_path):
    _, path = tiny_dir("qwen2_moe")  # layer 1 is a dense MLP
    engine = Engine.from_pretrained(path, device="cpu", dtype="fp32", progress=False)
    runner = engine.decoder.experts
    stats = profile_routing(engine, DOCS[:2], prompt_tokens=6, gen_tokens=3)
    assert engine.decoder.experts is runner
    assert stats["moe_layers"] == [0, 2] and stats["prefill_counts"][1] == [0] * 8 and stats["decode_counts"][1] == [0] * 8
    assert sum(stats["prefill_counts"][2]) == stats["provenance"]["prompt_tokens"] * 2
    assert stats["next_layer_top1"]["per_layer"] == [None, None, None]  # no two consecutive MoE layers
    assert stats["next_layer_top1"]["mean"] is None and stats["load_entropy"]["per_layer"][1] is None
    with pytest.raises(DaopError, match="context window"):
        profile_routing(engine, DOCS, prompt_tokens=250, gen_tokens=10)


def test_read_documents_formats(tmp_path):
    assert read_documents(write_text(tmp_path)) == DOCS
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a b"}\n\n{"text": "  "}\n{"text": "c", "id": 3}\n')
    assert read_documents(jsonl) == ["a b", "c"]
    chat = tmp_path / "d.json"
    chat.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    assert read_documents(chat) == ["hi\n\nhello"]


BAD = [
    ("bad.jsonl", '{"text": "ok"}\n{"text": 5}\n', r"bad\.jsonl:2: expected an object with a string field"),
    ("broken.jsonl", '{"text": "ok"}\nnot json\n', r"broken\.jsonl:2: not valid JSON"),
    ("chat.json", '[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}]',
     r"chat\.json: \[0\]\.conversations\[1\]\.value"),
    ("object.json", '{"conversations": []}', r"object\.json: expected a JSON list"),
    ("empty.txt", "\n\n  \n", r"empty\.txt: no documents"),
    ("latin.txt", b"caf\xe9\n", r"latin\.txt: not UTF-8"),
]


@pytest.mark.parametrize("name,content,match", BAD)
def test_bad_data_file_names_file_and_place(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DaopError, match=match):
        read_documents(path)


def test_bad_data_file_from_cli_writes_nothing(tmp_path, capsys):
    path, out = tmp_path / "bad.jsonl", tmp_path / "out.json"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    assert main(["profile", "--model", str(tmp_path), "--data", str(path), "--output", str(out)]) == 2
    assert f"{path}:2" in capsys.readouterr().err
    assert main(["profile", "--data", str(tmp_path / "missing.txt"), "--output", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    out = tmp_path / "stats.json"
    write_json_atomic(out, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(out, {"a": float("nan")})  # not valid JSON: refused before the rename
    assert json.loads(out.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [out]
