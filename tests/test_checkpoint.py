"""The safetensors reader: round trips, lazy reads, sharded diffusers checkpoints, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointError, CheckpointReader, format_bytes

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
    torch.float8_e5m2,
]  # fmt: skip
SHAPES = [(), (0,), (3, 0), (1,), (5, 7), (2, 3, 4)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Fresh random bytes of ``dtype``: every bit pattern, NaNs included, must survive a round trip."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN == NaN), for any dtype."""
    flat = lambda t: t.contiguous().reshape(-1).view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_file(path: Path, header: dict | bytes | str, data: bytes = b"", length: int | None = None) -> Path:
    """A hand-made safetensors file: 8-byte length, header, data (for files the library won't write)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(path)
    return str(e.value)


# --- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    tensors = {f"t{i}": random_tensor(dtype, shape) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "ü"})
    with CheckpointReader(path) as reader:
        assert reader.keys() == list(tensors)  # save_file writes in name order; t0..t5 sort the same
        assert reader.metadata == {"format": "pt", "note": "ü"}
        assert reader.files == [path] and reader.config is None
        assert reader.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert len(reader) == len(tensors) and "t1" in reader and "nope" not in reader
        for name, tensor in tensors.items():
            info = reader.tensors[name]
            assert (info.torch_dtype, info.shape) == (dtype, tensor.shape)
            assert same(reader.get(name), tensor), name


def test_tensors_are_listed_in_file_order(tmp_path):
    # Offsets deliberately not in name order: the reader lists the data order.
    header = {"b": entry("U8", [2], 0, 2), "a": entry("U8", [1], 3, 4), "c": entry("U8", [1], 2, 3)}
    path = raw_file(tmp_path / "m.safetensors", header, bytes([1, 2, 3, 4]))
    with CheckpointReader(path) as reader:
        assert reader.keys() == ["b", "c", "a"]
        assert reader.get("a").tolist() == [4] and reader.get("b").tolist() == [1, 2]
        data_start = 8 + len(json.dumps(header))
        assert [(t.offset, t.nbytes) for t in reader.tensors.values()] == [
            (data_start, 2), (data_start + 2, 1), (data_start + 3, 1),
        ]  # fmt: skip


def test_get_reads_only_that_tensor(tmp_path):
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("needs Linux's per-process I/O counters")
    small, big = torch.randn(4), torch.randn(4 << 20)  # 16 bytes and 16 MB
    path = tmp_path / "m.safetensors"
    save_file({"big": big, "small": small}, str(path))

    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in io.read_text().splitlines())["rchar"])

    with CheckpointReader(path) as reader:
        before = bytes_read()
        assert same(reader.get("small"), small)
        assert bytes_read() - before < 64 << 10
        assert same(reader.get("big"), big)
        assert bytes_read() - before > 16 << 20


def test_tensors_are_writable_copies_and_the_file_is_untouched(tmp_path):
    tensors = {"w": torch.randn(8, 8), "s": torch.randn(())}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    digest = sha256(path)
    with CheckpointReader(path) as reader:
        w = reader.get("w")
        w.zero_()
        assert same(reader.get("w"), tensors["w"])
    assert sha256(path) == digest


def test_header_length_that_looks_like_a_pickle_is_read(tmp_path):
    # A header of 0x0280 bytes starts with 0x80 0x02, the magic of a protocol-2 pickle.
    header = json.dumps({"x": entry("U8", [3], 0, 3)})
    path = raw_file(tmp_path / "m.safetensors", header.ljust(0x280), b"abc")
    assert path.read_bytes()[:2] == b"\x80\x02"
    with CheckpointReader(path) as reader:
        assert bytes(reader.get("x").tolist()) == b"abc"


# --- sharded diffusers checkpoints --------------------------------------------------------------


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """``folder/transformer/`` in the diffusers layout: config, shards, index."""
    transformer = folder / "transformer"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel", "x": 1}))
    weight_map = {}
    names = list(tensors)
    for k in range(shards):
        file = f"diffusion_pytorch_model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(
            {n: tensors[n] for n in names[k::shards]}, str(transformer / file), metadata={"shard": str(k)}
        )
        weight_map |= {n: file for n in names[k::shards]}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return transformer


@pytest.fixture
def sharded(tmp_path):
    tensors = {f"blocks.{i}.weight": random_tensor(torch.bfloat16, (i + 1, 3)) for i in range(7)}
    return tmp_path / "model", write_sharded(tmp_path / "model", tensors), tensors


def test_sharded_checkpoint_opens_from_every_entry_point(sharded):
    model, transformer, tensors = sharded
    index = transformer / "diffusion_pytorch_model.safetensors.index.json"
    for path in (model, transformer, index):
        with CheckpointReader(path) as reader:
            assert reader.path == path
            assert [f.name for f in reader.files] == [
                f"diffusion_pytorch_model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)
            ]
            assert sorted(reader.keys()) == sorted(tensors)
            assert reader.metadata == {"shard": "0"}
            assert reader.config == {"_class_name": "Flux2Transformer2DModel", "x": 1}
            for name, tensor in tensors.items():
                assert same(reader.get(name), tensor)


def test_folder_with_one_safetensors_file(tmp_path):
    tensors = {"w": torch.randn(3, 2)}
    (tmp_path / "transformer").mkdir()
    save_file(tensors, str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file(tensors, str(tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors"))
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with CheckpointReader(tmp_path) as reader:
        assert reader.files == [tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"]
        assert reader.config == {}
        assert same(reader.get("w"), tensors["w"])


def test_bad_sharded_checkpoints(sharded):
    _, transformer, _ = sharded
    index_path = transformer / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard1, shard2 = (
        "diffusion_pytorch_model-00001-of-00003.safetensors",
        "diffusion_pytorch_model-00002-of-00003.safetensors",
    )

    def with_map(weight_map) -> str:
        index_path.write_text(json.dumps({**index, "weight_map": weight_map}))
        return error(transformer)

    missing = {**index["weight_map"], "blocks.0.weight": "gone.safetensors"}
    assert (
        with_map(missing) == f"{index_path} lists shard gone.safetensors, which is missing; download it again"
    )
    moved = {**index["weight_map"], "blocks.0.weight": shard2}
    assert (
        with_map(moved) == f"{index_path} lists tensor 'blocks.0.weight' in {shard2}, but it is in {shard1}"
    )
    ghost = {**index["weight_map"], "ghost": shard1}
    assert with_map(ghost) == f"{index_path} lists tensor 'ghost' in {shard1}, which does not have it"
    unlisted = {n: f for n, f in index["weight_map"].items() if n != "blocks.3.weight"}
    assert with_map(unlisted) == f"{index_path} does not list tensor 'blocks.3.weight' of {shard1}"
    escape = {**index["weight_map"], "blocks.0.weight": "../x.safetensors"}
    assert (
        with_map(escape)
        == f"{index_path} is not a valid safetensors index (its weight_map is not name → shard file)"
    )
    index_path.write_text("{")
    assert error(transformer).startswith(f"{index_path} is not a valid safetensors index (")

    index_path.write_text(json.dumps(index))
    save_file({"blocks.0.weight": torch.zeros(1)}, str(transformer / shard2))  # now in two shards
    assert error(transformer) == (
        f"{transformer / shard2}: tensor 'blocks.0.weight' is also in {shard1}; the shards overlap"
    )


def test_bad_config(sharded):
    model, transformer, _ = sharded
    (transformer / "config.json").write_text("[1]")
    assert error(model) == f"{transformer / 'config.json'} is not a JSON object"
    (transformer / "config.json").write_text("{,")
    assert error(model).startswith(f"{transformer / 'config.json'} is not valid JSON (")


# --- bad inputs -------------------------------------------------------------------------------


def test_missing_empty_and_tiny_files(tmp_path):
    assert error(tmp_path / "nope.safetensors") == f"{tmp_path / 'nope.safetensors'} does not exist"
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert error(empty) == f"{empty} is empty (0 bytes); download or export it again"
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x05\x00\x00")
    assert error(short) == f"{short} is not a safetensors file: it has only 3 bytes"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickles_are_refused_by_name(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    digest = sha256(path)
    assert error(path) == (
        f"{path} is a pickle (PyTorch .pt/.ckpt) file; INT8 Studio reads only .safetensors — "
        "convert it to safetensors first"
    )
    assert sha256(path) == digest


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_renamed_pickles_are_refused_by_content(tmp_path, zip_format):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=zip_format)
    assert error(path) == (
        f"{path} is a pickle (PyTorch .pt/.ckpt) file; INT8 Studio reads only .safetensors — "
        "convert it to safetensors first"
    )


def test_gguf_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    assert (
        error(path)
        == f"{path} is a GGUF file; INT8 Studio reads only .safetensors — use the safetensors original"
    )


def test_folders_without_one_model(tmp_path):
    assert error(tmp_path) == (
        f"{tmp_path} is a folder with no safetensors model in it "
        "(expected a .safetensors file, a *.safetensors.index.json or a transformer/ folder)"
    )
    torch.save({}, tmp_path / "diffusion_pytorch_model.bin")
    assert error(tmp_path).startswith(f"{tmp_path / 'diffusion_pytorch_model.bin'} is a pickle")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    assert (
        error(tmp_path)
        == f"{tmp_path} has several checkpoints (a.safetensors, b.safetensors); open the one you mean"
    )


def test_oversized_and_truncated_headers(tmp_path):
    huge = raw_file(tmp_path / "huge.safetensors", b"{}", length=200_000_000)
    assert error(huge) == (
        f"{huge} is not a safetensors file or is corrupt: its header length (200.0 MB) is over the 100.0 MB limit"
    )
    cut = raw_file(tmp_path / "cut.safetensors", b'{"a": ', length=5000)
    assert error(cut) == (
        f"{cut} is truncated: the header says the header ends at 5.0 KB, the file has 14 bytes; "
        "download or export it again"
    )


def test_truncated_data(tmp_path):
    header = {"a": entry("F32", [1000], 0, 4000), "b": entry("F32", [2], 4000, 4008)}
    header_bytes = json.dumps(header).encode()
    path = raw_file(tmp_path / "m.safetensors", header_bytes, bytes(1500))
    data_end, size = 8 + len(header_bytes) + 4008, 8 + len(header_bytes) + 1500
    assert error(path) == (
        f"{path} is truncated: the header says the data ends at {format_bytes(data_end)}, "
        f"the file has {format_bytes(size)}; download or export it again"
    )


CORRUPT = {
    "not_utf8": (b"{\xff}", None),
    "not_json": ('{"a": ', None),
    "list": ("[1, 2]", "it holds a list, not a list of tensors"),
    "null": ("null", "it holds null, not a list of tensors"),
    "number": ("42", "it holds a number, not a list of tensors"),
    "text": ('"weights"', "it holds a text, not a list of tensors"),
    "empty": ("   ", "it is empty"),
    "nested": ("[" * 100_000 + "]" * 100_000, "it is nested too deeply to be a list of tensors"),
    "nested_object": ('{"a": ' * 50_000 + "{}" + "}" * 50_000, "it is nested too deeply to be a list of tensors"),
    "duplicate": ('{"a": {}, "a": {}}', "the name 'a' appears twice"),
    "metadata": ({"__metadata__": {"k": 3}}, "__metadata__ must map strings to strings"),
    "entry": ({"a": [1]}, "the entry of tensor 'a' is not an object"),
    "no_dtype": ({"a": {"shape": [1], "data_offsets": [0, 1]}}, "tensor 'a' has no dtype"),
    "negative_shape": (
        {"a": entry("U8", [-1], 0, 1)},
        "tensor 'a' has shape [-1], not a list of non-negative integers",
    ),
    "float_shape": (
        {"a": entry("U8", [1.0], 0, 1)},
        "tensor 'a' has shape [1.0], not a list of non-negative integers",
    ),
    "bool_shape": (
        {"a": entry("U8", [True], 0, 1)},
        "tensor 'a' has shape [True], not a list of non-negative integers",
    ),
    "offsets": ({"a": entry("U8", [1], 1, 0)}, "tensor 'a' has data_offsets [1, 0], not [begin, end]"),
    "three_offsets": (
        {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}},
        "tensor 'a' has data_offsets [0, 1, 2], not [begin, end]",
    ),
    "byte_length": (
        {"a": entry("F16", [2, 3], 0, 10)},
        "tensor 'a' has 10 bytes, but shape [2, 3] of F16 needs 12",
    ),
    "overlap": (
        {"a": entry("U8", [16], 0, 16), "b": entry("U8", [16], 8, 24)},
        "tensors 'a' and 'b' overlap",
    ),
    "overlap_past_empty": (  # an empty tensor between them must not hide the overlap
        {"a": entry("U8", [16], 0, 16), "e": entry("U8", [0], 4, 4), "b": entry("U8", [16], 8, 24)},
        "tensors 'a' and 'b' overlap",
    ),
    "inside": (
        {"a": entry("U8", [16], 0, 16), "b": entry("U8", [2], 4, 6), "c": entry("U8", [4], 16, 20)},
        "tensors 'a' and 'b' overlap",
    ),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_headers(tmp_path, case):
    header, what = CORRUPT[case]
    path = raw_file(tmp_path / "m.safetensors", header, bytes(32))
    digest = sha256(path)
    message = error(path)
    prefix = f"{path} has a corrupt header: "
    suffix = "; download or export it again"
    if what is None:  # the JSON parser's own words in the middle
        assert message.startswith(prefix + "not valid JSON (") and message.endswith(")" + suffix)
    else:
        assert message == prefix + what + suffix
    assert sha256(path) == digest


def test_a_few_missing_bytes_are_counted_exactly(tmp_path):
    """Sizes that round to the same text are given in bytes, so the message shows the difference."""
    header = json.dumps({"a": entry("U8", [100_000], 0, 100_000)}).encode()
    path = raw_file(tmp_path / "m.safetensors", header, bytes(99_997))
    data_end = 8 + len(header) + 100_000
    assert error(path) == (
        f"{path} is truncated: the header says the data ends at {data_end:,} bytes, "
        f"the file has {data_end - 3:,} bytes; download or export it again"
    )


def test_long_names_are_cut_in_messages(tmp_path):
    name = "x" * 5000 + "END"
    path = raw_file(tmp_path / "m.safetensors", {name: entry("F16", [2, 3], 0, 10)}, bytes(32))
    message = error(path)
    assert len(message) < len(str(path)) + 200 and "…" in message and "END'" in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    assert error(fifo) == f"{fifo} is not a regular file; give a .safetensors file or a model folder"


def test_a_tensor_larger_than_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    """A header may declare any size over a sparse file: reading checks free memory first."""
    path = tmp_path / "sparse.safetensors"
    header = json.dumps({"big": entry("U8", [1 << 20], 0, 1 << 20)}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + (1 << 20))  # a hole, not written bytes
    free = 1 << 19
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=free))
    with CheckpointReader(path) as reader, pytest.raises(CheckpointError) as e:
        reader.get("big")
    assert str(e.value) == (
        f"tensor 'big' of {path} needs {format_bytes(1 << 20)} of memory, {format_bytes(free)} is free: "
        "the file is damaged, or too large for this computer"
    )


def test_unknown_dtype(tmp_path):
    path = raw_file(tmp_path / "m.safetensors", {"x": entry("F7", [1], 0, 1)}, bytes(1))
    assert error(path) == f"{path}: tensor 'x' has unknown dtype 'F7'; INT8 Studio cannot read it"


def test_gaps_and_empty_tensors_are_fine(tmp_path):
    header = {
        "a": entry("U8", [2], 0, 2),
        "e": entry("F32", [0, 4], 1, 1),  # empty, inside a: occupies nothing
        "b": entry("U8", [2], 4, 6),  # a gap of 2 bytes before it
        "__metadata__": {},
    }
    path = raw_file(tmp_path / "m.safetensors", header, bytes([1, 2, 0, 0, 3, 4, 9]))
    with CheckpointReader(path) as reader:
        assert reader.get("b").tolist() == [3, 4]
        assert reader.get("e").shape == (0, 4) and reader.get("e").dtype == torch.float32


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 999, 1000, 1536, 999_949, 999_960, 9.2e9, 4_100_000_000, 3e15)] == [
        "0 bytes", "999 bytes", "1.0 KB", "1.5 KB", "999.9 KB", "1.0 MB", "9.2 GB", "4.1 GB", "3000.0 TB",
    ]  # fmt: skip
