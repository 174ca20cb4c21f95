"""The adapters that ship with realm (realm/data/lora: trained by scripts/train_demo_adapter.py on SmolLM2-135M):
`--lora pirate` needs no path."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED_DIR = Path(__file__).resolve().parent.parent / "data" / "lora"


def packaged_adapters() -> dict[str, Path]:
    """name -> PEFT directory of each adapter shipped in the package."""
    if not PACKAGED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(PACKAGED_DIR.iterdir()) if (p / "adapter_config.json").is_file()}


def resolve_adapter(source: str | os.PathLike) -> Path:
    """A path as given, or a packaged adapter's directory when source is one's name and no adapter is at that path
    (a file, or a directory with adapter_config.json: an unrelated local directory of that name does not hide it)."""
    path = Path(source)
    is_adapter = path.is_file() or (path / "adapter_config.json").is_file()
    if not is_adapter and isinstance(source, str) and source in packaged_adapters():  # not shadowed by any dir
        return packaged_adapters()[source]
    return path
