"""The .stcmp container: reading and writing. docs/FORMAT.md is the spec; this file follows it.

Layout (little-endian):
    [0, 16)        preamble: magic b"\\x93STCMP\\r\\n" (8), u32 format version, u32 reserved (0)
    [16, H)        data: independent zstd frames (content checksum on), one per chunk of a tensor part
    [H, H+L)       header: one zstd frame holding UTF-8 JSON
    [end-32, end)  footer: u64 H, u64 L, u32 crc32(header frame), u32 format version, magic b"STCMPEND"

The header is last so a converter can stream tensors out without holding them; a reader reads the 32-byte
footer, checks every number in it against the file size, then reads only the header.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import zstandard

MAGIC = b"\x93STCMP\r\n"
END_MAGIC = b"STCMPEND"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sII")
FOOTER = struct.Struct("<QQII8s")
MAX_HEADER_BYTES = 256 << 20  # compressed header bound, checked before anything is allocated
MAX_HEADER_JSON = 1 << 30  # decompressed header bound
CHUNK_BYTES = 4 << 20  # raw bytes per chunk: small enough to overlap, large enough to compress well
DEFAULT_LEVEL = 3

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


class FormatError(ValueError):
    """A .stcmp file that cannot be read: one sentence naming the file and what is wrong."""


# ------------------------------------------------------------------------------------ byte-plane split

def split_planes(raw: bytes | memoryview, itemsize: int) -> bytes:
    """Element bytes b0 b1 | b0 b1 | ... -> all most-significant bytes first, then the next plane down.

    For bf16 the exponent-heavy high bytes land together and compress; the noisy mantissa bytes follow.
    """
    if itemsize == 1:
        return bytes(raw)
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)
    return a[:, ::-1].T.tobytes()  # little-endian: the last byte of each element is the high byte


def join_planes(planes: bytes, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return np.frombuffer(planes, dtype=np.uint8)
    a = np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1)
    return np.ascontiguousarray(a.T[:, ::-1]).reshape(-1)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


# ------------------------------------------------------------------------------------------------ write

def output_dir(path: str | os.PathLike) -> str:
    """The directory a new file at `path` will go into; FileNotFoundError if it does not exist. Writers call
    it before any long work, so a bad output path fails at once."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory {directory} does not exist")
    return directory


def publish(tmp: str, path: str | os.PathLike) -> None:
    """Give a finished temporary file a normal file's mode (mkstemp made it 0600) and rename it into place:
    readers see the old file or the whole new one, never a partial one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


class Writer:
    """Streams tensor parts into a temporary file next to `path`; `close()` renames it into place.

    Use as a context manager: an exception (or Ctrl-C) inside the block deletes the temporary file, so a
    failed convert never leaves a partial output and never touches an existing file at `path`.
    """

    def __init__(self, path: str | os.PathLike, level: int = DEFAULT_LEVEL, threads: int | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        self.path = os.fspath(path)
        directory = output_dir(self.path)
        if not -7 <= level <= 22:
            raise ValueError(f"zstd level must be in [-7, 22], not {level}")
        fd, self._tmp = tempfile.mkstemp(prefix=".stcmp-", suffix=".tmp", dir=directory)
        self._f = os.fdopen(fd, "wb")
        self._f.write(PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0))
        self._pos = PREAMBLE.size
        self.level, self.chunk_bytes = level, chunk_bytes
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self._threads)
        self._local = threading.local()
        self.tensors: list[dict[str, Any]] = []
        self._closed = False

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                                         write_content_size=True)
        return c

    def write_part(self, t: torch.Tensor, planes: bool | None = None) -> dict[str, Any]:
        """Compress one array in chunks (in parallel) and append it. Returns its index entry."""
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"dtype {t.dtype} cannot be stored")
        raw = _tensor_bytes(t)
        itemsize = t.element_size()
        planes = (dtype in FLOAT_DTYPES) if planes is None else planes
        step = max(itemsize, self.chunk_bytes // itemsize * itemsize)
        pieces = [raw[i:i + step] for i in range(0, len(raw), step)] or [raw[0:0]]

        def comp(piece):
            data = split_planes(piece, itemsize) if planes else bytes(piece)
            return self._cctx().compress(data), len(piece)

        chunks = []
        for frame, nraw in self._pool.map(comp, pieces):
            self._f.write(frame)
            chunks.append([self._pos, len(frame), nraw])
            self._pos += len(frame)
        return {"dtype": dtype, "shape": list(t.shape), "byteplanes": planes, "chunks": chunks}

    def add(self, name: str, parts: dict[str, torch.Tensor], encoding: str, shape: list[int],
            orig_dtype: str, **meta: Any) -> dict[str, Any]:
        """Append one logical tensor made of named parts ("data" for lossless, "qweight"/"scales"/... for
        quantized) and record in the index how it is stored."""
        entry = {"name": name, "shape": list(shape), "dtype": orig_dtype, "encoding": encoding, **meta,
                 "parts": {k: self.write_part(v) for k, v in parts.items()}}
        self.tensors.append(entry)
        return entry

    def close(self, header: dict[str, Any]) -> None:
        """Write the header and footer, fsync, and atomically rename into place."""
        body = dict(header)
        body["format_version"] = FORMAT_VERSION
        body["tensors"] = self.tensors
        blob = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(
            json.dumps(body, ensure_ascii=False).encode())
        self._f.write(blob)
        self._f.write(FOOTER.pack(self._pos, len(blob), zlib.crc32(blob), FORMAT_VERSION, END_MAGIC))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._pool.shutdown()
        publish(self._tmp, self.path)
        self._closed = True

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(cancel_futures=True)
        try:
            self._f.close()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


# ------------------------------------------------------------------------------------------------- read

def entry_bytes(entry: dict[str, Any]) -> tuple[int, int]:
    """(raw, stored) bytes of one tensor index entry, summed over its parts' chunks."""
    chunks = [c for p in entry["parts"].values() for c in p["chunks"]]
    return sum(c[2] for c in chunks), sum(c[1] for c in chunks)


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    encoding: str
    entry: dict[str, Any]

    @property
    def stored_bytes(self) -> int:
        return entry_bytes(self.entry)[1]

    @property
    def raw_bytes(self) -> int:
        return entry_bytes(self.entry)[0]


class Reader:
    """Random access to the tensors of a .stcmp file. Thread-safe: each read opens its own position."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.size = os.path.getsize(self.path)
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a directory, not a .stcmp file") from None
        self.header = self._read_header()
        self.tensors: dict[str, TensorInfo] = {}
        for e in self.header.get("tensors", []):
            self.tensors[e["name"]] = TensorInfo(e["name"], e["shape"], e["dtype"], e["encoding"], e)
        self._local = threading.local()

    def _err(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}")

    def _read_header(self) -> dict[str, Any]:
        if self.size < PREAMBLE.size + FOOTER.size:
            if self.size == 0:
                raise self._err("file is empty")
            head = self._pread(0, min(self.size, 8))
            if not MAGIC.startswith(head[:8]):
                raise self._err("not a .stcmp file (wrong magic)")
            raise self._err("file is truncated")
        magic, version, _ = PREAMBLE.unpack(self._pread(0, PREAMBLE.size))
        if magic != MAGIC:
            raise self._err("not a .stcmp file (wrong magic)")
        if version > FORMAT_VERSION:
            raise self._err(f"written by a newer qrun (format version {version}; this qrun reads up to "
                            f"{FORMAT_VERSION}): upgrade qrun")
        if version < 1:
            raise self._err(f"bad format version {version}")
        h_off, h_len, crc, fver, end = FOOTER.unpack(self._pread(self.size - FOOTER.size, FOOTER.size))
        if end != END_MAGIC or fver != version:
            raise self._err("file is truncated or its footer is corrupt")
        if h_len > MAX_HEADER_BYTES or h_off < PREAMBLE.size or h_off + h_len != self.size - FOOTER.size:
            raise self._err(f"header claims {h_len} bytes at offset {h_off}, which the file's "
                            f"{self.size} bytes do not hold (truncated or corrupt)")
        blob = self._pread(h_off, h_len)
        if zlib.crc32(blob) != crc:
            raise self._err("header checksum mismatch (the file is corrupt)")
        try:
            raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_HEADER_JSON)
            header = json.loads(raw)
        except (zstandard.ZstdError, ValueError) as e:
            raise self._err(f"header cannot be decoded ({e})") from None
        if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
            raise self._err("header has no tensor index")
        for e in header["tensors"]:
            for p in e.get("parts", {}).values():
                for off, clen, _ in p["chunks"]:
                    if off < PREAMBLE.size or off + clen > h_off:
                        raise self._err(f"tensor {e.get('name')!r} points outside the data section")
        return header

    def _pread(self, off: int, n: int) -> bytes:
        return os.pread(self._f.fileno(), n, off)

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    # ------------------------------------------------------------------------------------ accessors
    @property
    def config(self) -> dict[str, Any] | None:
        return self.header.get("config")

    def files(self) -> dict[str, Any]:
        return self.header.get("files", {})

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._err(f"has no tensor {name!r}") from None

    def read_chunk(self, name: str, part: str, i: int) -> np.ndarray:
        """Decompress and verify chunk i of one part; returns its raw bytes as uint8."""
        p = self.info(name).entry["parts"][part]
        off, clen, nraw = p["chunks"][i]
        frame = self._pread(off, clen)
        if len(frame) != clen:
            raise self._err(f"tensor {name!r} is truncated")
        try:
            data = self._dctx().decompress(frame, max_output_size=nraw)
        except zstandard.ZstdError as e:
            raise self._err(f"tensor {name!r} is corrupt (chunk {i}: {e})") from None
        if len(data) != nraw:
            raise self._err(f"tensor {name!r} is corrupt (chunk {i} has {len(data)} bytes, expected {nraw})")
        itemsize = torch.empty(0, dtype=DTYPES[p["dtype"]]).element_size()
        return join_planes(data, itemsize) if p["byteplanes"] else np.frombuffer(data, dtype=np.uint8)

    def read_part(self, name: str, part: str, threads: int = 1,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """One part as a CPU tensor, chunks decompressed on `threads` threads into one buffer."""
        p = self.info(name).entry["parts"][part]
        dtype = DTYPES[p["dtype"]]
        total = sum(c[2] for c in p["chunks"])
        if out is None:
            out = torch.empty(total, dtype=torch.uint8)
        flat = out.reshape(-1).view(torch.uint8)
        starts = np.cumsum([0] + [c[2] for c in p["chunks"]])

        view = flat.numpy()

        def fill(i):
            view[starts[i]:starts[i + 1]] = self.read_chunk(name, part, i)  # numpy copies into `out`

        if threads > 1 and len(p["chunks"]) > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fill, range(len(p["chunks"]))))
        else:
            for i in range(len(p["chunks"])):
                fill(i)
        return flat.view(dtype).reshape(p["shape"])

    def read_parts(self, name: str, threads: int = 1) -> dict[str, torch.Tensor]:
        return {k: self.read_part(name, k, threads) for k in self.info(name).entry["parts"]}

    def iter_chunks(self) -> Iterator[tuple[str, str, int]]:
        """(tensor, part, chunk index) for every chunk, in file order."""
        for name, t in self.tensors.items():
            for part, p in t.entry["parts"].items():
                for i in range(len(p["chunks"])):
                    yield name, part, i

    def verify(self, threads: int = 4, progress: Callable[[int], None] | None = None) -> None:
        """Decompress every chunk and check its checksum; raises FormatError naming the first bad tensor."""
        with ThreadPoolExecutor(threads) as pool:
            for n in pool.map(lambda c: len(self.read_chunk(*c)), self.iter_chunks()):
                if progress:
                    progress(n)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
