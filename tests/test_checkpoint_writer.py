"""The streaming writer: round trips (read back by us and by the safetensors library), misuse, refusing
to overwrite, and every way a write can fail — each leaving the folder exactly as it was."""

from __future__ import annotations

import errno
import gc
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import CheckpointError, CheckpointReader, format_bytes
from engine.checkpoint_writer import CheckpointWriter
from engine.jobs import OutputExistsError
from tests.test_checkpoint import DTYPES, SHAPES, random_tensor, same, sha256


def layout_of(tensors: dict[str, torch.Tensor]) -> dict:
    return {name: (t.dtype, t.shape) for name, t in tensors.items()}


def write_all(target: Path, tensors: dict[str, torch.Tensor], **kwargs) -> Path:
    with CheckpointWriter(target, layout_of(tensors), **kwargs) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        return writer.commit()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    """Every dtype and shape, in a random order that is not name order."""
    items = [(f"{dtype}.{shape}", random_tensor(dtype, shape)) for dtype in DTYPES for shape in SHAPES]
    random.shuffle(items)
    return dict(items)


@pytest.fixture
def folder(tmp_path) -> Path:
    """An output folder with an unrelated file in it, which must survive everything."""
    (tmp_path / "keep.txt").write_text("mine")
    return tmp_path


# --- writing ----------------------------------------------------------------------------------


def test_round_trip_read_back_by_us_and_by_safetensors(folder, tensors):
    target = folder / "out.safetensors"
    metadata = {"tool": "int8-studio", "note": "ü"}
    assert write_all(target, tensors, metadata=metadata) == target
    assert listing(folder) == ["keep.txt", "out.safetensors"]

    with CheckpointReader(target) as reader:
        assert reader.keys() == list(tensors)  # the declared order, not name order
        assert reader.metadata == metadata
        for name, tensor in tensors.items():
            assert same(reader.get(name), tensor), name
    loaded = load_file(str(target))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name

    raw = target.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0  # data starts 8-byte aligned, the header padded with spaces
    assert raw[8 : 8 + header_len].rstrip(b" ").endswith(b"}")
    assert len(raw) == 8 + header_len + sum(t.numel() * t.element_size() for t in tensors.values())


def test_size_is_known_up_front_and_noncontiguous_inputs_are_written(folder):
    base = torch.randn(6, 4, requires_grad=True)
    tensors = {"t": base.t(), "every_other": base[::2].detach()}
    with CheckpointWriter(folder / "o.safetensors", layout_of(tensors)) as writer:
        partial = writer.partial
        assert partial.parent == folder and partial.name.startswith(".o.safetensors.partial-")
        assert listing(folder) == sorted(["keep.txt", partial.name])
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.commit()
    assert (folder / "o.safetensors").stat().st_size == writer.size
    with CheckpointReader(folder / "o.safetensors") as reader:
        assert all(same(reader.get(n), t.detach()) for n, t in tensors.items())


def test_overwrite(folder):
    target = folder / "out.safetensors"
    write_all(target, {"old": torch.randn(3)})
    digest = sha256(target)
    with pytest.raises(OutputExistsError) as e:
        CheckpointWriter(target, {"new": (torch.float32, (2,))})
    assert str(e.value) == f"{target} already exists; choose another name or replace it"
    assert sha256(target) == digest and listing(folder) == ["keep.txt", "out.safetensors"]

    new = {"new": torch.randn(2, 2).bfloat16()}
    write_all(target, new, overwrite=True)
    with CheckpointReader(target) as reader:
        assert reader.keys() == ["new"] and same(reader.get("new"), new["new"])
    assert listing(folder) == ["keep.txt", "out.safetensors"]


def test_target_that_appears_while_writing_is_not_overwritten(folder):
    target = folder / "out.safetensors"
    with CheckpointWriter(target, {"x": (torch.int8, (4,))}) as writer:
        writer.write("x", torch.zeros(4, dtype=torch.int8))
        target.write_text("someone else's")
        with pytest.raises(OutputExistsError) as e:
            writer.commit()
    assert str(e.value) == f"{target} already exists; choose another name or replace it"
    assert target.read_text() == "someone else's" and listing(folder) == ["keep.txt", "out.safetensors"]


def test_bad_targets(folder):
    with pytest.raises(CheckpointError) as e:
        CheckpointWriter(folder, {}, overwrite=True)
    assert str(e.value) == f"output {folder} is a folder; give a file name"
    with pytest.raises(CheckpointError) as e:
        CheckpointWriter(folder / "no" / "out.safetensors", {})
    assert str(e.value) == f"output folder {folder / 'no'} does not exist; create it or choose another"
    assert listing(folder) == ["keep.txt"]


# --- misuse is a programming error, and still leaves nothing --------------------------------------


LAYOUT = {"a": (torch.int8, (2, 3)), "b": (torch.float32, ()), "c": (torch.bfloat16, (4,))}


@pytest.mark.parametrize(
    "writes,message",
    [
        ([("b", torch.zeros(()))], "write('b') out of order: the layout's next tensor is 'a'"),
        ([("a", torch.zeros(2, 3))], "tensor 'a' is torch.float32 [2, 3], the layout says torch.int8 [2, 3]"),
        (
            [("a", torch.zeros(3, 2, dtype=torch.int8))],
            "tensor 'a' is torch.int8 [3, 2], the layout says torch.int8 [2, 3]",
        ),
        (
            [("a", torch.zeros(2, 3, dtype=torch.int8)), ("b", torch.zeros(1))],
            "tensor 'b' is torch.float32 [1], the layout says torch.float32 []",
        ),
        (
            [
                ("a", torch.zeros(2, 3, dtype=torch.int8)),
                ("b", torch.zeros(())),
                ("c", torch.zeros(4).bfloat16()),
            ]
            + [("d", torch.zeros(1))],
            "write('d') out of order: the layout's next tensor is None",
        ),
    ],
)
def test_wrong_writes(folder, writes, message):
    with pytest.raises(ValueError) as e, CheckpointWriter(folder / "o.safetensors", LAYOUT) as writer:
        for name, tensor in writes:
            writer.write(name, tensor)
    assert str(e.value) == message
    assert listing(folder) == ["keep.txt"]
    with pytest.raises(ValueError, match=r"after the writer was committed or aborted"):
        writer.write("a", torch.zeros(2, 3, dtype=torch.int8))


def test_commit_before_every_tensor_is_written(folder):
    writer = CheckpointWriter(folder / "o.safetensors", LAYOUT)
    writer.write("a", torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError) as e:
        writer.commit()
    assert str(e.value) == "commit() before every tensor was written: 'b' is next"
    assert listing(folder) == ["keep.txt"]
    with pytest.raises(ValueError, match=r"^commit\(\) after the writer was committed or aborted$"):
        writer.commit()


@pytest.mark.parametrize(
    "layout,metadata,message",
    [
        ({"a": (torch.complex128, (1,))}, None, "tensor 'a': safetensors cannot store torch.complex128"),
        (
            {"a": (torch.int8, (2, -1))},
            None,
            "tensor 'a': shape (2, -1) is not a list of non-negative integers",
        ),
        ({"__metadata__": (torch.int8, (1,))}, None, "invalid tensor name '__metadata__'"),
        ({"a": (torch.int8, (1,))}, {"version": 1}, "metadata must map strings to strings"),
    ],
)
def test_bad_layouts(folder, layout, metadata, message):
    with pytest.raises(ValueError) as e:
        CheckpointWriter(folder / "o.safetensors", layout, metadata)
    assert str(e.value) == message
    assert listing(folder) == ["keep.txt"]


# --- failures leave nothing behind ------------------------------------------------------------


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_exception_in_the_with_block_removes_the_file(folder, exception):
    with pytest.raises(exception), CheckpointWriter(folder / "o.safetensors", LAYOUT) as writer:
        writer.write("a", torch.ones(2, 3, dtype=torch.int8))
        raise exception()
    assert listing(folder) == ["keep.txt"]


def test_abort_leaving_without_commit_and_garbage_collection_remove_the_file(folder):
    writer = CheckpointWriter(folder / "o.safetensors", LAYOUT)
    writer.write("a", torch.ones(2, 3, dtype=torch.int8))
    writer.abort()
    writer.abort()
    assert listing(folder) == ["keep.txt"]

    with CheckpointWriter(folder / "o.safetensors", LAYOUT):
        pass
    assert listing(folder) == ["keep.txt"]

    writer = CheckpointWriter(folder / "o.safetensors", LAYOUT)
    assert len(listing(folder)) == 2
    del writer
    gc.collect()
    assert listing(folder) == ["keep.txt"]


def fake_disk_usage(free: int):
    def disk_usage(path):
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)

    return disk_usage


def test_not_enough_space_up_front(folder, tensors, monkeypatch):
    writer = CheckpointWriter(folder / "o.safetensors", layout_of(tensors))
    need = writer.size
    writer.abort()
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(need - 1))
    with pytest.raises(CheckpointError) as e:
        CheckpointWriter(folder / "o.safetensors", layout_of(tensors))
    assert str(e.value) == (
        f"not enough free space on {folder}: need {format_bytes(need)}, {format_bytes(need - 1)} free"
    )
    assert listing(folder) == ["keep.txt"]
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(need))  # exactly enough is enough
    write_all(folder / "o.safetensors", tensors)


def failing_os_write(monkeypatch, budget: int, code: int) -> None:
    """Fault injection at the OS boundary: ``os.write`` writes ``budget`` bytes, then fails with ``code``."""
    real_write = os.write
    left = budget

    def write(fd, data):
        nonlocal left
        if left <= 0:
            raise OSError(code, os.strerror(code))
        n = real_write(fd, memoryview(data)[:left])
        left -= n
        return n

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("where", ["first byte", "in the header", "last byte"])
def test_disk_full_while_writing(folder, tensors, monkeypatch, where):
    with CheckpointWriter(folder / "o.safetensors", layout_of(tensors)) as probe:
        need = probe.size
    failing_os_write(
        monkeypatch, {"first byte": 0, "in the header": 10, "last byte": need - 1}[where], errno.ENOSPC
    )
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(4096))
    with pytest.raises(CheckpointError) as e:
        write_all(folder / "o.safetensors", tensors)
    assert str(e.value) == f"not enough free space on {folder}: need {format_bytes(need)}, 4.1 KB free"
    assert listing(folder) == ["keep.txt"]


def test_io_error_while_writing(folder, tensors, monkeypatch):
    writer = CheckpointWriter(folder / "o.safetensors", layout_of(tensors))
    failing_os_write(monkeypatch, 0, errno.EIO)
    with pytest.raises(CheckpointError) as e:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert str(e.value) == f"cannot write {folder / 'o.safetensors'}: Input/output error"
    assert listing(folder) == ["keep.txt"]


def append_byte(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\0")


def corrupt_dtype(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"I8"')
    raw[at : at + 4] = b'"U8"'
    path.write_bytes(raw)


@pytest.mark.parametrize(
    "damage,problem",
    [
        (corrupt_dtype, "its header differs"),
        (lambda p: os.truncate(p, p.stat().st_size - 1), None),
        (append_byte, "it has {size} bytes, not {expected}"),
    ],
    ids=["dtype", "truncated", "longer"],
)
def test_verification_failure(folder, damage, problem):
    target = folder / "o.safetensors"
    writer = CheckpointWriter(target, LAYOUT)
    writer.write("a", torch.ones(2, 3, dtype=torch.int8))
    writer.write("b", torch.randn(()))
    writer.write("c", torch.randn(4).bfloat16())
    damage(writer.partial)
    size = writer.partial.stat().st_size
    with pytest.raises(CheckpointError) as e:
        writer.commit()
    if problem is None:  # the reader's own message, naming the temporary file
        problem = (
            f"{writer.partial} is truncated: the header says the data ends at {format_bytes(writer.size)}, "
        )
        problem += f"the file has {format_bytes(size)}; download or export it again"
    problem = problem.format(size=size, expected=writer.size)
    assert str(e.value) == (
        f"writing {target} failed: the file did not read back as written ({problem}); "
        "nothing was saved — check the disk and try again"
    )
    assert listing(folder) == ["keep.txt"]
