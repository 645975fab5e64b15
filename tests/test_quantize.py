"""`daop quantize` and loading its folders: the same model as quantizing at load, bitwise; exact
policies on the folder equal `gpu` on it; the output appears whole or not at all; a folder whose
format or tensors disagree with what is asked or with config.json is one clear error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import daop
import daop.quantize
from daop.cli import main
from daop.engine import Engine
from daop.errors import DaopError
from daop.model.specs import spec_by_name
from daop.quant import ExpertFormat
from daop.quantize import quantize_checkpoint
from daop.sampling import SamplingParams
from daop.weights.lowbit_folder import expert_prefix, stored_names

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 77, 200, 9, 11]
FORMATS = [("int8", None), ("int4", 64)]  # the tiny models' hidden size is 64: int4 groups of 64
SMALL_SHARDS = 300_000  # bytes: several shards and an index for the tiny models


def greedy(engine, n=12):
    engine.eos_ids = frozenset()
    return list(engine.generate_ids(PROMPT, SamplingParams(max_new_tokens=n)))


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    """Factory: (family, kind, group[, dtype]) -> (float folder, quantized folder), written once per
    module (dtype: the folder's dense weights and scales, the checkpoint's by default)."""
    cache: dict = {}

    def make(family, kind, group, dtype=None):
        if (family, kind, group, dtype) not in cache:
            _, src = tiny_dir(family)
            out = tmp_path_factory.mktemp("quantized") / f"{family}-{kind}"
            quantize_checkpoint(src, out, kind, group, dtype=dtype, progress=False, shard_bytes=SMALL_SHARDS)
            cache[family, kind, group, dtype] = (src, out)
        return cache[family, kind, group, dtype]

    return make


def load(path, **options):
    return Engine.from_pretrained(path, device="cpu", progress=False, **options)


def shard_of(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


# ------------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_quantized_folder_equals_quantizing_at_load(quantized, family, kind, group):
    src, out = quantized(family, kind, group)
    at_load = load(src, dtype="fp32", expert_dtype=kind, group_size=group)
    stored = load(out)
    assert stored.expert_format == at_load.expert_format and stored.decoder.dtype == torch.float32
    assert greedy(stored) == greedy(at_load)
    assert torch.equal(stored.logits(PROMPT), at_load.logits(PROMPT))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_checks.py --tests)")
@pytest.mark.parametrize("kind,group", FORMATS)
@pytest.mark.parametrize("policy", ["gpu", "lru"])
def test_quantized_folder_on_cuda_equals_quantizing_at_load_there(quantized, kind, group, policy):
    """A folder read onto a GPU (int4 converted to the CUDA layout through a host buffer) gives the
    tokens and logits of the same model quantized at load onto that GPU."""
    dtype = "bf16" if kind == "int4" else "fp32"  # torch's CUDA int4 kernel takes bf16 activations and scales
    src, out = quantized("mixtral", kind, group, dtype)
    options = {} if policy == "gpu" else {"policy": policy, "expert_ratio": 0.25}
    at_load = Engine.from_pretrained(src, device="cuda", dtype=dtype, progress=False, expert_dtype=kind, group_size=group,
                                     **options)
    stored = Engine.from_pretrained(out, device="cuda", dtype=dtype, progress=False, **options)
    assert stored.expert_format == at_load.expert_format
    assert greedy(stored) == greedy(at_load)
    assert torch.equal(stored.logits(PROMPT), at_load.logits(PROMPT))


@pytest.mark.parametrize("kind,group", FORMATS)
def test_folder_holds_the_host_layout_a_section_and_the_small_files(quantized, tiny_dir, kind, group):
    src, out = quantized("qwen2_moe", kind, group)
    raw = json.loads((out / "config.json").read_text())
    assert raw["daop_quantization"] == {"method": "rtn", "expert_dtype": kind, "bits": int(kind[3:]),
                                        "group_size": group, "scale_dtype": "float32", "layout": "daop-host-v1",
                                        "daop_version": daop.__version__}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 2 * SMALL_SHARDS for p in shards)
    tensors = {k: v for p in shards for k, v in load_file(p).items()}
    spec, fmt = spec_by_name("qwen2_moe"), ExpertFormat(kind, torch.float32, group or 128)
    assert expert_prefix(spec, 0, 3) == "model.layers.0.mlp.experts.3"
    for name, (shape, dtype) in zip(stored_names(spec, 2, 5), fmt.shapes(64, 48)):
        assert tuple(tensors[name].shape) == shape and tensors[name].dtype == dtype
    assert not any(".experts." in n and n.endswith("proj.weight") for n in tensors)  # no float routed experts
    source = load_file(src / "model.safetensors")
    shared = "model.layers.0.mlp.shared_expert.up_proj.weight"  # dense tensors are copied as they are
    assert torch.equal(tensors[shared], source[shared])


def test_an_exact_policy_on_the_folder_equals_gpu_on_it(quantized):
    _, out = quantized("qwen2_moe", "int4", 64)
    reference = load(out)
    engine = load(out, policy="lru", expert_ratio=0.25)
    assert engine.policy == "lru" and engine.expert_format.name == "int4-g64"
    assert greedy(engine) == greedy(reference)
    assert torch.equal(engine.logits(PROMPT), reference.logits(PROMPT))
    assert engine.counters()["copy_calls"] > 0
    # the stored tensors were read straight into the host store: no float expert was staged
    assert engine.decoder.experts.store.host.scratch.buffers == {} and reference.decoder.experts.scratch.buffers == {}


def test_dtype_converts_dense_tensors_and_scales(tiny_dir, tmp_path):
    _, src = tiny_dir("mixtral")
    out = tmp_path / "bf16"
    quantize_checkpoint(src, out, "int8", dtype="bf16", progress=False)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]  # one shard, no index
    assert not (out / "model.safetensors.index.json").exists()
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.block_sparse_moe.experts.0.gate_up.scales"].dtype == torch.bfloat16
    assert torch.equal(load(out).logits(PROMPT), load(src, dtype="bf16", expert_dtype="int8").logits(PROMPT))


# ------------------------------------------------------------------------------------------ writing

def test_an_existing_output_is_refused(tiny_dir, tmp_path):
    _, src = tiny_dir("mixtral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DaopError, match="already exists"):
        quantize_checkpoint(src, out, "int8", progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_no_folder(tiny_dir, tmp_path, monkeypatch, error):
    _, src = tiny_dir("mixtral")
    writes = []

    def failing_save(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:
            raise error
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(daop.quantize, "save_file", failing_save)
    with pytest.raises(type(error)):
        quantize_checkpoint(src, tmp_path / "out", "int4", 64, progress=False, shard_bytes=SMALL_SHARDS)
    assert len(writes) == 2 and list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


def test_an_already_quantized_folder_is_not_quantized_again(quantized, tmp_path):
    _, out = quantized("mixtral", "int8", None)
    with pytest.raises(DaopError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", "int4", 64, progress=False)


# ------------------------------------------------------------------------------------------ bad input

def test_options_asking_for_another_format_are_refused(quantized):
    _, out = quantized("mixtral", "int4", 64)
    with pytest.raises(DaopError, match=r"stored as int4-g64; --expert-dtype int8 asks for another format; use the float"):
        load(out, expert_dtype="int8")
    with pytest.raises(DaopError, match=r"stored as int4-g64; --group-size 128 asks for another format"):
        load(out, group_size=128)
    with pytest.raises(DaopError, match=r"scales are stored in float32; --dtype bfloat16 asks for another"):
        load(out, dtype="bf16")
    assert load(out, expert_dtype="int4", group_size=64, dtype="fp32").expert_format.name == "int4-g64"


def corrupt_copy(folder, tmp_path, name, tensor):
    """A copy of the folder with one tensor replaced."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shard = shard_of(bad, name)
    tensors = load_file(shard)
    tensors[name] = tensor
    save_file(tensors, shard, metadata={"format": "pt"})
    return bad


def test_a_stored_tensor_of_the_wrong_shape_or_dtype_is_named(quantized, tmp_path):
    _, out = quantized("mixtral", "int4", 64)
    name = "model.layers.1.block_sparse_moe.experts.2.down.qweight"
    bad = corrupt_copy(out, tmp_path, name, torch.zeros(64, 32, dtype=torch.uint8))
    with pytest.raises(DaopError, match=rf"{name}' has shape \[64, 32\], but config.json implies \[64, 64\]"):
        load(bad)
    shutil.rmtree(bad)
    bad = corrupt_copy(out, tmp_path, name, torch.zeros(64, 64, dtype=torch.int8))
    with pytest.raises(DaopError, match=rf"{name}' has dtype torch.int8, but config.json's daop_quantization implies torch.uint8"):
        load(bad)


def test_a_folder_of_another_model_or_an_unknown_layout_is_refused(quantized, tmp_path):
    _, out = quantized("mixtral", "int8", None)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(raw, intermediate_size=128)))
    with pytest.raises(DaopError, match=r"experts.0.gate_up.qweight' has shape \[192, 64\], but config.json implies \[256, 64\]"):
        load(other)
    for field, value, message in (("layout", "daop-host-v9", "unknown layout 'daop-host-v9'"),
                                  ("method", "gptq", "unknown method 'gptq'"),
                                  ("expert_dtype", "int3", "unsupported expert_dtype 'int3'")):
        section = dict(raw["daop_quantization"], **{field: value})
        (other / "config.json").write_text(json.dumps(dict(raw, daop_quantization=section)))
        with pytest.raises(DaopError, match=rf"config.json: daop_quantization: {message}"):
            load(other)


# ------------------------------------------------------------------------------------------ command line

def test_cli_quantizes_then_generates_from_the_folder(tiny_dir, tmp_path, capsys):
    _, src = tiny_dir("mixtral")
    out = tmp_path / "mixtral-int4"
    args = ["quantize", "--model", str(src), "--output", str(out), "--expert-dtype", "int4", "--group-size", "64", "--no-progress"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: experts int4-g64, weights ") and " -> " in line and len(line.splitlines()) == 1
    assert (out / "model.safetensors").is_file()
    assert main(["generate", "--model", str(out), "--device", "cpu", "-n", "3", "--no-progress", "hello"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", "--model", str(out), "--device", "cpu", "-n", "3", "--no-progress", "--expert-dtype", "int8",
                 "hello"]) == 2
    assert "stored as int4-g64; --expert-dtype int8 asks for another format" in capsys.readouterr().err
    assert main(["quantize", "--model", str(src), "--output", str(tmp_path / "g"), "--expert-dtype", "int4", "--no-progress"]) == 2
    assert "not a multiple of --group-size 128" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_stored_int4_bound_for_cuda_goes_through_a_host_buffer():
    """CUDA slots hold int4 weights in the CUDA kernel's layout: the loader reads those into a host
    buffer (converted on commit), and the scales, whose layout is the host's, straight into the slot."""
    from daop.quant import slot_shapes
    from daop.weights.expert_views import SlotCopy, stored_views

    fmt, D, I = ExpertFormat("int4", torch.bfloat16, 64), 128, 176
    slots = tuple(torch.empty(shape, dtype=dtype, device="meta")
                  for shape, dtype in slot_shapes(fmt, D, I, torch.device("cuda")))
    scratch: dict = {}
    views = stored_views(fmt, slots, scratch, D, I)
    assert [type(v) for v in views] == [SlotCopy, torch.Tensor, SlotCopy, torch.Tensor]
    assert views[1] is slots[1] and views[3] is slots[3]
    assert [tuple(v.shape) for v in views] == [shape for shape, _ in fmt.shapes(D, I)]
    assert stored_views(fmt, slots, scratch, D, I)[0].buffer is views[0].buffer  # one buffer per shape, reused
