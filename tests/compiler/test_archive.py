"""Saved programs: folder and .kf round trips, and rejection of every kind of damaged file
(corrupted byte, truncation, missing member, wrong format version, edited weights) with an
error naming the member and what was expected."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from kernforge.errors import ShapeError
from kernforge.runtime import archive
from kernforge.runtime.archive import FORMAT, ProgramFormatError, load, read, save, summary

from .standin import StandInProgram, random_weights, tiny_graph


def make_program() -> StandInProgram:
    g = tiny_graph()
    return StandInProgram(g, random_weights(g), {"source": "tests", "dtype": "float32"})


def check_same(a, b) -> None:
    assert b.graph.to_json() == a.graph.to_json()
    assert b.meta == a.meta
    assert set(b.weights) == set(a.weights)
    for k, t in a.weights.items():
        assert b.weights[k].dtype == t.dtype and torch.equal(b.weights[k], t), k


@pytest.mark.parametrize("suffix", [".kf", "_dir"])
def test_round_trip(tmp_path, suffix):
    prog = make_program()
    path = save(prog, tmp_path / f"prog{suffix}")
    assert path.is_file() if suffix == ".kf" else (path / "program.json").is_file()
    back = load(path, program_cls=StandInProgram)
    check_same(prog, back)
    saved = read(path)
    assert saved.doc["format"] == FORMAT and saved.doc["versions"]["torch"] == torch.__version__
    assert saved.kernel_sources == prog.kernel_sources()
    assert saved.doc["buffer_plan"] == prog.buffer_plan.to_json()
    assert saved.doc["weights"]["scale"] == {"shape": [5], "dtype": "bfloat16"}
    text = summary(path)
    assert "inputs: float32[3,8]" in text and "3 weights" in text and "arena" in text
    if suffix == ".kf":
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            assert [i.filename for i in infos] == ["program.json", "weights.safetensors"]
            assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
            assert b"pickle" not in zf.read("weights.safetensors")[:200]


def test_tied_weights_and_overwrite(tmp_path):
    prog = make_program()
    prog.weights["fc.bias"] = prog.weights["fc.weight"][0]  # a view into another weight
    save(prog, tmp_path / "p.kf")
    prog.weights["fc.bias"] = torch.randn(5)
    save(prog, tmp_path / "p.kf")  # replaces the file
    check_same(prog, load(tmp_path / "p.kf", program_cls=StandInProgram))
    assert [p.name for p in tmp_path.iterdir()] == ["p.kf"]  # no temporary files left


def test_kernel_source_change_warns_or_raises(tmp_path):
    path = save(make_program(), tmp_path / "p.kf")

    class Changed(StandInProgram):
        def kernel_sources(self):
            return {k: v + "# new codegen\n" for k, v in super().kernel_sources().items()}

    with pytest.warns(UserWarning, match="differ from the saved sources"):
        load(path, program_cls=Changed)
    with pytest.raises(ProgramFormatError, match="differ from the saved sources"):
        load(path, program_cls=Changed, strict=True)


def test_meta_must_be_json(tmp_path):
    prog = make_program()
    prog.meta["bad"] = object()
    with pytest.raises(ProgramFormatError, match="JSON-able"):
        save(prog, tmp_path / "p.kf")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_corrupted_byte_in_weights(tmp_path):
    path = save(make_program(), tmp_path / "p.kf")
    data = path.read_bytes()
    raw = zipfile.ZipFile(path).read("weights.safetensors")
    at = data.index(raw) + len(raw) - 3  # inside the tensor bytes
    path.write_bytes(_flip(data, at))
    with pytest.raises(ProgramFormatError, match="'weights.safetensors' is corrupted"):
        read(path)
    folder = save(make_program(), tmp_path / "dir")
    w = folder / "weights.safetensors"
    w.write_bytes(_flip(w.read_bytes(), w.stat().st_size - 3))
    with pytest.raises(ProgramFormatError, match="'weights.safetensors' has sha256 .*corrupted"):
        read(folder)


def test_corrupted_byte_in_program_json(tmp_path):
    folder = save(make_program(), tmp_path / "dir")
    p = folder / "program.json"
    text = p.read_text()
    # a change that keeps the JSON valid: only the digest can tell
    assert '"float32"' in text
    p.write_text(text.replace('"float32"', '"float16"', 1))
    with pytest.raises(ProgramFormatError, match="program.json was changed after it was saved"):
        read(folder)
    p.write_text(text[:-40])
    with pytest.raises(ProgramFormatError, match="not valid JSON"):
        read(folder)


@pytest.mark.parametrize("keep", [0.2, 0.6, 0.99])
def test_truncated_file(tmp_path, keep):
    path = save(make_program(), tmp_path / "p.kf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ProgramFormatError, match="truncated"):
        read(path)
    folder = save(make_program(), tmp_path / "dir")
    w = folder / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: int(w.stat().st_size * keep)])
    with pytest.raises(ProgramFormatError, match=r"'weights.safetensors' has \d+ bytes.*truncated"):
        read(folder)


def test_missing_member(tmp_path):
    folder = save(make_program(), tmp_path / "dir")
    (folder / "weights.safetensors").unlink()
    with pytest.raises(ProgramFormatError, match="member 'weights.safetensors' is missing"):
        read(folder)
    (folder / "program.json").unlink()
    with pytest.raises(ProgramFormatError, match="member 'program.json' is missing"):
        read(folder)
    path = save(make_program(), tmp_path / "p.kf")
    with zipfile.ZipFile(path) as zf:
        text = zf.read("program.json")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("program.json", text)
    with pytest.raises(ProgramFormatError, match="member 'weights.safetensors' is missing"):
        read(path)
    with pytest.raises(ProgramFormatError, match="no saved program"):
        read(tmp_path / "nothing.kf")


def _rewrite(folder: Path, edit_doc=None, weights: dict | None = None) -> None:
    """Edit a saved folder and make its hashes consistent again (a deliberate edit, not
    damage): only the checks on content can catch it."""
    doc = json.loads((folder / "program.json").read_text())
    if weights is not None:
        data = st_save(weights)
        (folder / "weights.safetensors").write_bytes(data)
        doc["members"]["weights.safetensors"] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    if edit_doc is not None:
        edit_doc(doc)
    doc["digest"] = archive._digest(doc)
    (folder / "program.json").write_text(json.dumps(doc))


def test_wrong_format_version(tmp_path):
    folder = save(make_program(), tmp_path / "dir")
    _rewrite(folder, lambda d: d.update(format="kernforge.program/2"))
    with pytest.raises(
        ProgramFormatError, match=r"format 'kernforge.program/2'.*another kernforge"
    ):
        read(folder)
    _rewrite(folder, lambda d: d.update(format="something/1"))
    with pytest.raises(ProgramFormatError, match="this kernforge reads 'kernforge.program/1'"):
        read(folder)


def test_weight_shape_dtype_and_name_mismatch(tmp_path):
    prog = make_program()
    folder = save(prog, tmp_path / "dir")
    w = dict(prog.weights)
    _rewrite(folder, weights={**w, "fc.weight": torch.randn(5, 9)})
    with pytest.raises(
        ProgramFormatError, match=r"'fc.weight' is float32\[5, 9\].*float32\[5, 8\]"
    ):
        read(folder)
    _rewrite(folder, weights={**w, "scale": w["scale"].float()})
    with pytest.raises(ProgramFormatError, match=r"'scale' is float32\[5\].*bfloat16\[5\]"):
        read(folder)
    _rewrite(folder, weights={k: v for k, v in w.items() if k != "fc.bias"})
    with pytest.raises(ProgramFormatError, match="has no tensor 'fc.bias'"):
        read(folder)
    _rewrite(folder, weights={**w, "extra": torch.randn(2)})
    with pytest.raises(ProgramFormatError, match="does not use: extra"):
        read(folder)
    _rewrite(folder, weights=w)
    check_same(prog, load(folder, program_cls=StandInProgram))  # consistent again: loads


def test_graph_that_does_not_verify(tmp_path):
    folder = save(make_program(), tmp_path / "dir")

    def edit(d):
        d["graph"]["nodes"][3]["output"]["shape"] = [3, 6]  # linear's output shape

    _rewrite(folder, edit)
    with pytest.raises(ProgramFormatError, match=r"node 3 \(linear\) records float32\[3, 6\]"):
        read(folder)

    def edit2(d):
        d["graph"]["nodes"][0]["attrs"]["shape"] = [5, 9]  # fc.weight: linear no longer fits

    _rewrite(folder, edit2)
    with pytest.raises(ProgramFormatError, match="graph in program.json does not verify"):
        read(folder)


def test_real_program_round_trip(tmp_path):
    model = pytest.importorskip("kernforge.runtime.model")
    g = tiny_graph()
    prog = model.Program(g, random_weights(g), {"note": "hand-built"})
    x = torch.randn(3, 8)
    want = prog.run(x, mode="interpret")
    path = prog.save(tmp_path / "tiny.kf")
    saved = read(path)
    assert saved.kernel_sources and all(k.startswith("interpret/") for k in saved.kernel_sources)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same kernforge: the same kernel sources, no warning
        back = model.Program.load(path, strict=True)
    check_same(prog, back)
    for a, b in zip(back.run(x, mode="interpret"), want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back.buffer_plan == prog.buffer_plan
    with pytest.raises(ShapeError, match="expects float32\\[5\\]"):
        back.set_weights({"fc.bias": torch.randn(6)})
