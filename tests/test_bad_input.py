"""Bad input: one clear line naming the file, tensor, field or limit; exit code 2; nothing written."""
import json
import shutil
import struct
import subprocess
import sys

import pytest

from daop.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("daop: error:")], err


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    """A private copy of a tiny checkpoint that each test may damage."""
    _, src = tiny_dir("mixtral")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def expect_error(capsys, ckpt, needle, *extra):
    before = sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else None
    code, errors, err = run_cli(capsys, "generate", "--model", str(ckpt), "--device", "cpu", "--no-progress", *extra, "hello")
    assert code == 2
    assert len(errors) == 1, err
    assert needle in errors[0]
    assert not any("Traceback" in line for line in err)
    if before is not None:
        assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing written into the checkpoint folder
    return errors[0]


def test_missing_folder(capsys, tmp_path):
    expect_error(capsys, tmp_path / "nope", "model folder not found")


@pytest.mark.parametrize("name, needle", [("config.json", "config.json not found"), ("tokenizer.json", "tokenizer.json"),
                                           ("model.safetensors", "no *.safetensors weight files")])
def test_missing_file(capsys, ckpt, name, needle):
    (ckpt / name).unlink()
    expect_error(capsys, ckpt, needle)


def test_unsupported_architecture(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = expect_error(capsys, ckpt, "unsupported architecture 'llama'")
    assert "MixtralForCausalLM" in msg and "Qwen3MoeForCausalLM" in msg


def test_corrupt_config(capsys, ckpt):
    (ckpt / "config.json").write_text("{not json")
    expect_error(capsys, ckpt, "config.json: not valid JSON")


def rewrite_header(path, mutate):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_missing_tensor(capsys, ckpt):
    rewrite_header(ckpt / "model.safetensors", lambda h: h.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    expect_error(capsys, ckpt, "'model.layers.1.block_sparse_moe.experts.3.w2.weight' is missing")


def test_wrong_shape(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = expect_error(capsys, ckpt, "has shape")
    assert "model.safetensors" in msg and "experts" in msg


def test_truncated_file(capsys, ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = expect_error(capsys, ckpt, "truncated or corrupt file")
    assert "model.safetensors" in msg and "tensor" in msg


def test_garbage_header(capsys, ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    expect_error(capsys, ckpt, "corrupt safetensors header")


def test_missing_shard(capsys, tiny_dir, tmp_path):
    _, src = tiny_dir("mixtral", shard_mb=1)
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(capsys, dst, f"names shard '{shard.name}', which is missing")


def test_prompt_over_context(capsys, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["max_position_embeddings"] = 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, errors, _ = run_cli(capsys, "generate", "--model", str(ckpt), "--device", "cpu", "--no-progress",
                              "a long prompt that has clearly more than eight tokens in it, surely")
    assert code == 2 and "the context window is 8 tokens" in errors[0]


@pytest.mark.parametrize("flag, value, needle", [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"),
                                                  ("--top-p", "1.5", "top_p"), ("--max-new-tokens", "0", "max_new_tokens"),
                                                  ("--top-k", "-3", "top_k")])
def test_invalid_sampling_values(capsys, ckpt, flag, value, needle):
    expect_error(capsys, ckpt, needle, flag, value)


def test_bad_budget_values(capsys, ckpt):
    expect_error(capsys, ckpt, "malformed memory size", "--gpu-memory", "lots")
    expect_error(capsys, ckpt, "between 0 and 1", "--expert-ratio", "1.5")
    expect_error(capsys, ckpt, "unknown policy", "--policy", "magic")


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "daop.cli", "generate", "--model", str(tmp_path / "missing"), "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"daop: error: model folder not found: {tmp_path / 'missing'}"


def test_hardware_profile_errors(capsys, ckpt, tmp_path):
    from daop.hardware import calibrate

    bad = tmp_path / "corrupt.json"
    bad.write_text("{oops")
    expect_error(capsys, ckpt, "not a valid hardware profile", "--policy", "fiddler", "--expert-ratio", "0.5",
                 "--hardware-profile", str(bad))
    import torch

    other = tmp_path / "other.json"
    calibrate(32, 48, torch.float32, torch.device("cpu"), 1, quick=True).save(other)
    msg = expect_error(capsys, ckpt, "hardware profile is for experts 32x48", "--policy", "fiddler", "--expert-ratio", "0.5",
                       "--hardware-profile", str(other))
    assert "daop calibrate" in msg


def test_routing_stats_of_another_model_is_an_error(capsys, ckpt, tmp_path):
    stats = tmp_path / "routing.json"
    stats.write_text(json.dumps({"decode_counts": [[1, 2], [3, 4]]}))
    expect_error(capsys, ckpt, "decode_counts has shape [2, 2]", "--expert-ratio", "0.5", "--routing-stats", str(stats))
