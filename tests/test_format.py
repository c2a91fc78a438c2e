"""The .stcmp container: round trips, random access, threads, and every kind of damaged file."""
import os
import struct

import pytest
import torch

from qrun.quant import quantize
from qrun.runtime.stcmp import FOOTER, FormatError, Reader, Writer, join_planes, split_planes


def write(path, tensors, chunk_bytes=1 << 12, header=None):
    with Writer(path, chunk_bytes=chunk_bytes) as w:
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor):
                w.add(name, {"data": t}, "bf16", list(t.shape), "bfloat16")
            else:
                w.add(name, t.parts, t.encoding, list(t.shape), "bfloat16", block_size=t.block_size)
        w.close(header or {"config": {"model_type": "qwen2"}, "files": {}})
    return path


@pytest.fixture
def sample(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(64, 100).bfloat16(), "b": quantize(torch.randn(48, 256), "int4_asym", 64),
               "c": torch.randn(7).float(), "d": torch.randn(3, 5).half()}
    with Writer(tmp_path / "m.stcmp", chunk_bytes=1 << 12) as w:
        w.add("a", {"data": tensors["a"]}, "bf16", [64, 100], "bfloat16")
        w.add("b", tensors["b"].parts, "int4_asym", [48, 256], "bfloat16", block_size=64)
        w.add("c", {"data": tensors["c"]}, "fp32", [7], "float32")
        w.add("d", {"data": tensors["d"]}, "fp16", [3, 5], "float16")
        w.close({"config": {"x": 1}, "files": {"tokenizer.json": "{}"}})
    return str(tmp_path / "m.stcmp"), tensors


def test_roundtrip_and_random_access(sample):
    path, t = sample
    r = Reader(path)
    assert r.config == {"x": 1} and list(r.tensors) == ["a", "b", "c", "d"]
    assert len(r.info("a").entry["parts"]["data"]["chunks"]) > 1  # chunked
    # one tensor alone, without touching the others
    assert torch.equal(r.read_part("d", "data"), t["d"])
    assert torch.equal(r.read_part("c", "data"), t["c"])
    for part, v in t["b"].parts.items():
        assert torch.equal(r.read_part("b", part), v)
    # several threads give the same bytes as one
    assert torch.equal(r.read_part("a", "data", threads=4), r.read_part("a", "data", threads=1))
    assert torch.equal(r.read_part("a", "data", threads=4), t["a"])


def test_byteplanes_roundtrip():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(1001).to(dtype)
        raw = x.view(torch.uint8).numpy().tobytes()
        planes = split_planes(raw, x.element_size())
        assert planes != raw
        assert join_planes(planes, x.element_size()).tobytes() == raw
    # the high byte of each bf16 element comes first
    x = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    hi = [b for b in x.view(torch.uint8).numpy().tobytes()[1::2]]
    assert list(split_planes(x.view(torch.uint8).numpy().tobytes(), 2)[:2]) == hi


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "x.stcmp"
    out.write_bytes(b"precious")
    with pytest.raises(RuntimeError):
        with Writer(out) as w:
            w.add("a", {"data": torch.ones(10)}, "fp32", [10], "float32")
            raise RuntimeError("boom")
    assert out.read_bytes() == b"precious"  # the user's file is untouched
    assert sorted(os.listdir(tmp_path)) == ["x.stcmp"]  # no temporary left behind


def test_missing_output_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        Writer(tmp_path / "nope" / "x.stcmp")


def corrupt(path, fn):
    data = bytearray(open(path, "rb").read())
    data = fn(data)
    open(path, "wb").write(bytes(data))


def flip(off):
    def f(d):
        d[off] ^= 0x40
        return d
    return f


def header_offset(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(size - FOOTER.size)
        h_off, h_len, *_ = FOOTER.unpack(f.read(FOOTER.size))
    return h_off, h_len


@pytest.mark.parametrize("case,damage,message", [
    ("empty", lambda d, h: bytearray(), "empty"),
    ("magic", lambda d, h: bytearray(b"GGUF") + d[4:], "wrong magic"),
    ("text", lambda d, h: bytearray(b"hello, I am not a model at all, really") * 4, "wrong magic"),
    ("trunc_header", lambda d, h: d[: h[0] + h[1] // 2], "truncated"),
    ("trunc_data", lambda d, h: d[: h[0] // 2], "truncated"),
    ("trunc_tiny", lambda d, h: d[:20], "truncated"),
    ("flip_header", lambda d, h: flip(h[0] + h[1] // 2)(d), "checksum"),
    ("newer", lambda d, h: d[:8] + struct.pack("<I", 99) + d[12:], "newer qrun"),
    ("claims_more", lambda d, h: d[:-32] + struct.pack("<QQ", h[0], h[1] + 10**9) + d[-16:], "do not hold"),
])
def test_damaged_files_are_one_clear_error(sample, case, damage, message):
    path, _ = sample
    h = header_offset(path)
    corrupt(path, lambda d: damage(d, h))
    with pytest.raises(FormatError, match=message):
        r = Reader(path)
        r.verify()


def test_flipped_data_byte_names_the_tensor(sample):
    path, _ = sample
    r = Reader(path)
    off = r.info("b").entry["parts"]["qweight"]["chunks"][0][0]
    corrupt(path, flip(off + 20))
    r = Reader(path)  # the header is fine
    with pytest.raises(FormatError, match="tensor 'b'"):
        r.verify()
    assert torch.equal(r.read_part("a", "data"), sample[1]["a"])  # other tensors still read


def test_cli_bad_files(tmp_path, run_cli, sample):
    path, _ = sample
    cases = {"empty": b"", "magic": b"NOTSTCMP" + bytes(64), "truncated": open(path, "rb").read()[:-100]}
    for name, data in cases.items():
        p = tmp_path / f"{name}.stcmp"
        p.write_bytes(data)
        rc, out, err = run_cli("inspect", p)
        assert rc != 0
        assert err.startswith("qrun: error:") and err.count("\n") == 1 and "Traceback" not in err
    rc, out, err = run_cli("inspect", tmp_path / "missing.stcmp")
    assert rc != 0 and "no such file" in err
