"""qrun convert / quantize / compress / decompress / inspect on tiny Hugging Face checkpoints."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qrun.quant import dequantize_parts
from qrun.runtime.stcmp import Reader


def test_convert_defaults(tiny_qwen2_dir, tmp_path, run_cli):
    """The measured defaults (docs/QUALITY.md): INT4 g128 asym by data-free GPTQ, int8 embeddings."""
    out = tmp_path / "m.stcmp"
    rc, _, err = run_cli("convert", tiny_qwen2_dir, "-o", out, "-q")
    assert rc == 0, err
    r = Reader(out)
    assert r.header["quantization"] == {**r.header["quantization"], "bits": 4, "scheme": "asym", "block_size": 128,
                                        "embeddings": "int8", "method": "gptq"}
    assert r.header["quantization"]["calibration"]["text"].startswith("random token ids")
    assert r.info("model.layers.0.mlp.up_proj.weight").encoding == "int4_asym"
    assert r.info("model.embed_tokens.weight").encoding == "int8_sym"
    assert r.info("model.norm.weight").encoding == "bf16"


def test_convert_int4_policy_and_header(tiny_qwen2_dir, tmp_path, run_cli):
    out = tmp_path / "m.stcmp"
    rc, _, err = run_cli("convert", tiny_qwen2_dir, "-o", out, "-q", "--scheme", "sym", "--method", "rtn",
                         "--embeddings", "keep")
    assert rc == 0, err
    assert "bits/param" in err  # the size table
    r = Reader(out)
    h = r.header
    assert h["config"]["model_type"] == "qwen2"
    assert h["files"]["tokenizer.json"] == open(os.path.join(tiny_qwen2_dir, "tokenizer.json")).read()
    assert "<|im_start|>" in h["files"]["chat_template"]
    assert h["quantization"]["bits"] == 4 and h["quantization"]["block_size"] == 128
    enc = {n: t.encoding for n, t in r.tensors.items()}
    assert enc["model.layers.0.self_attn.q_proj.weight"] == "int4_sym"
    assert enc["model.layers.0.mlp.down_proj.weight"] == "int4_sym"
    assert enc["model.layers.0.self_attn.q_proj.bias"] == "bf16"  # biases kept
    assert enc["model.layers.0.input_layernorm.weight"] == "bf16"  # norms kept
    assert enc["model.embed_tokens.weight"] == "bf16"  # embeddings kept by default
    # the stored weight dequantizes to within half a step of the original
    src = load_file(os.path.join(tiny_qwen2_dir, "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    info = r.info(name)
    d = dequantize_parts("int4_sym", r.read_parts(name), tuple(info.shape), 128)
    s = r.read_part(name, "scales").float().repeat_interleave(128, 1)[:, : info.shape[1]]
    assert ((d - src[name].float()).abs() <= s / 2 + 1e-4).all()


@pytest.mark.parametrize("args,encoding", [
    (["--bits", "8"], "int8_sym"), (["--scheme", "sym"], "int4_sym"), (["--scheme", "nf4", "--block-size", "64"], "nf4"),
    (["--bits", "16"], "bf16"), (["--double-quant", "--block-size", "32", "--method", "rtn"], "int4_asym")])
def test_convert_options(tiny_qwen2_dir, tmp_path, run_cli, args, encoding):
    out = tmp_path / "m.stcmp"
    rc, _, err = run_cli("convert", tiny_qwen2_dir, "-o", out, "-q", *args)
    assert rc == 0, err
    t = Reader(out).info("model.layers.0.mlp.gate_proj.weight")
    assert t.encoding == encoding
    if "--double-quant" in args:
        assert set(t.entry["parts"]) == {"qweight", "scales_q", "scales_meta", "zeros"}


def test_embeddings_flag(tiny_qwen2_dir, tmp_path, run_cli):
    out = tmp_path / "m.stcmp"
    assert run_cli("convert", tiny_qwen2_dir, "-o", out, "-q", "--embeddings", "keep", "--method", "rtn")[0] == 0
    assert Reader(out).info("model.embed_tokens.weight").encoding == "bf16"


def test_lossless_convert_is_exact(tiny_qwen2_dir, tmp_path, run_cli):
    out = tmp_path / "m.stcmp"
    assert run_cli("convert", tiny_qwen2_dir, "-o", out, "-q", "--bits", "16")[0] == 0
    r = Reader(out)
    src = load_file(os.path.join(tiny_qwen2_dir, "model.safetensors"))
    for name, t in src.items():
        got = r.read_part(name, "data")
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_sharded_checkpoint(tiny_qwen2_dir, tmp_path, run_cli):
    d = tmp_path / "sharded"
    shutil.copytree(tiny_qwen2_dir, d)
    src = load_file(d / "model.safetensors")
    os.remove(d / "model.safetensors")
    names = sorted(src)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ns in shards.items():
        save_file({n: src[n] for n in ns}, d / f)
    json.dump({"weight_map": {n: f for f, ns in shards.items() for n in ns}}, open(d / "model.safetensors.index.json", "w"))
    out = tmp_path / "m.stcmp"
    assert run_cli("convert", d, "-o", out, "-q", "--bits", "16")[0] == 0
    assert set(Reader(out).tensors) == set(names)


def test_quantize_compress_decompress_roundtrip(tiny_qwen2_dir, tmp_path, run_cli):
    st = os.path.join(tiny_qwen2_dir, "model.safetensors")
    q = tmp_path / "q.safetensors"
    rc, _, err = run_cli("quantize", st, q, "--bits", "4", "--block-size", "64")
    assert rc == 0, err
    with safe_open(q, "pt") as h:
        meta = json.loads(h.metadata()["qrun.quant"])
        keys = set(h.keys())
    name = "model.layers.0.self_attn.o_proj.weight"
    assert meta[name]["encoding"] == "int4_sym" and meta[name]["block_size"] == 64
    assert f"{name}.scales" in keys
    c, back = tmp_path / "q.stcmp", tmp_path / "back.safetensors"
    assert run_cli("compress", q, c, "-q")[0] == 0
    assert run_cli("decompress", c, back)[0] == 0
    a, b = load_file(q), load_file(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
    with safe_open(back, "pt") as h:
        assert json.loads(h.metadata()["qrun.quant"]) == meta
    # the compressed quantized file is what convert stores for the same tensor
    assert Reader(c).info(name).encoding == "int4_sym"


def test_lossless_compress_decompress_identical(tiny_qwen2_dir, tmp_path, run_cli):
    st = os.path.join(tiny_qwen2_dir, "model.safetensors")
    c, back = tmp_path / "x.stcmp", tmp_path / "x.safetensors"
    assert run_cli("compress", st, c, "-q")[0] == 0
    assert run_cli("decompress", c, back)[0] == 0
    a, b = load_file(st), load_file(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_inspect_json(tiny_qwen2_dir, tmp_path, run_cli):
    out = tmp_path / "m.stcmp"
    run_cli("convert", tiny_qwen2_dir, "-o", out, "-q", "--method", "rtn")
    rc, stdout, _ = run_cli("inspect", out, "--json")
    assert rc == 0
    info = json.loads(stdout)
    rows = {t["name"]: t for t in info["tensors"]}
    assert rows["model.layers.0.mlp.up_proj.weight"]["encoding"].startswith("int4")
    total = sum(t["stored_bytes"] for t in info["tensors"])
    assert 0 < total < os.path.getsize(out)
    rc, stdout, _ = run_cli("inspect", out, "--tensors")
    assert rc == 0 and "model.norm.weight" in stdout


def one_line_error(res):
    rc, out, err = res
    assert rc != 0
    assert err.startswith("qrun: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("missing,message", [("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"),
                                             ("model.safetensors", "safetensors")])
def test_bad_hf_dirs(tiny_qwen2_dir, tmp_path, run_cli, missing, message):
    d = tmp_path / "hf"
    shutil.copytree(tiny_qwen2_dir, d)
    os.remove(d / missing)
    out = tmp_path / "m.stcmp"
    assert message in one_line_error(run_cli("convert", d, "-o", out))
    assert not out.exists() and [f for f in os.listdir(tmp_path) if f.startswith(".stcmp")] == []


def test_unsupported_dtype(tiny_qwen2_dir, tmp_path, run_cli):
    d = tmp_path / "hf"
    shutil.copytree(tiny_qwen2_dir, d)
    t = load_file(d / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
    save_file(t, d / "model.safetensors")
    assert "model.norm.weight" in one_line_error(run_cli("convert", d, "-o", tmp_path / "m.stcmp"))
    assert not (tmp_path / "m.stcmp").exists()


def test_nan_weight_leaves_no_output_and_keeps_old_file(tiny_qwen2_dir, tmp_path, run_cli):
    d = tmp_path / "hf"
    shutil.copytree(tiny_qwen2_dir, d)
    t = load_file(d / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(t, d / "model.safetensors")
    out = tmp_path / "m.stcmp"
    out.write_bytes(b"old model")
    assert "model.layers.1.mlp.down_proj.weight" in one_line_error(run_cli("convert", d, "-o", out, "-q"))
    assert out.read_bytes() == b"old model"
    assert sorted(os.listdir(tmp_path)) == ["hf", "m.stcmp"]


def test_output_dir_missing_and_bad_input(tiny_qwen2_dir, tmp_path, run_cli):
    assert "does not exist" in one_line_error(run_cli("convert", tiny_qwen2_dir, "-o", tmp_path / "no" / "m.stcmp"))
    one_line_error(run_cli("convert", tmp_path / "nothing", "-o", tmp_path / "m.stcmp"))
    one_line_error(run_cli("compress", tmp_path / "nothing.safetensors", tmp_path / "m.stcmp"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    one_line_error(run_cli("compress", tmp_path / "junk.safetensors", tmp_path / "m.stcmp"))
    assert not (tmp_path / "m.stcmp").exists()
