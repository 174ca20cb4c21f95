"""llama.cpp's vocabulary test files, fetched from the llama.cpp that llama-cpp-python 0.3.36's sdist vendors.

    python tests/llama_cpp_vocab.py          # fetch them unless they are there (scripts/setup.sh runs this); prints
                                             # the directory

`vendor/llama.cpp/models/ggml-vocab-NAME.gguf` holds one vocabulary (tokenizer metadata only, no tensors); for most,
`.gguf.inp` holds test strings separated by SEPARATOR lines and `.gguf.out` one line of llama.cpp's ids per string
(no BOS, no special-token parsing). The files (about 75 MB) are extracted into $REALM_LLAMA_CPP_VOCAB, else
$XDG_CACHE_HOME/realm/llama-cpp-vocab-0.3.36 (~/.cache/realm/...), not kept in the repository. The sdist comes from
PyPI through pip (pip's cache makes a second download cheap); a directory that holds the files downloads nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # the llama-cpp-python the tests compare with (scripts/setup.sh installs it)
ENV = "REALM_LLAMA_CPP_VOCAB"
SEPARATOR = "\n__ggml_vocab_test__\n"
FETCH_HINT = f"fetch them with `python tests/llama_cpp_vocab.py` (scripts/setup.sh does), or point ${ENV} at them"
_DONE = ".complete"  # written last: a directory without it is an interrupted fetch


def vocab_dir() -> Path:
    """$REALM_LLAMA_CPP_VOCAB, else $XDG_CACHE_HOME/realm/llama-cpp-vocab-VERSION (~/.cache/realm/...)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "realm" / f"llama-cpp-vocab-{VERSION}"


def vocab_path(name: str) -> Path:
    """ggml-vocab-NAME.gguf in vocab_dir(); FileNotFoundError saying how to fetch it when it is not there."""
    path = vocab_dir() / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"llama.cpp's vocabulary test file {path} is missing: {FETCH_HINT}")
    return path


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, llama.cpp's ids) for each test string of ggml-vocab-NAME.gguf."""
    path = vocab_path(name)
    inp, out = Path(f"{path}.inp"), Path(f"{path}.out")
    if not (inp.is_file() and out.is_file()):
        raise FileNotFoundError(f"{path.name} has no test strings ({inp.name}, {out.name}) in {path.parent}")
    # as llama.cpp's test-tokenizer-0 reads them: a separator or newline that ends the file starts no new entry
    texts = inp.read_text(encoding="utf-8").split(SEPARATOR)
    ids = out.read_text(encoding="utf-8").split("\n")
    for entries in (texts, ids):
        if entries[-1] == "":
            entries.pop()
    if len(ids) != len(texts):
        raise ValueError(f"{path}: {len(texts)} strings but {len(ids)} id lines")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=True)]


def vocab_names(with_cases: bool = False) -> list[str]:
    """NAME of every ggml-vocab-NAME.gguf fetched (with_cases: those that have .inp/.out test strings)."""
    suffix = ".gguf.inp" if with_cases else ".gguf"
    return sorted(p.name[len("ggml-vocab-") : -len(suffix)] for p in vocab_dir().glob(f"ggml-vocab-*{suffix}"))


def fetch(dest: Path | None = None) -> Path:
    """Extract vendor/llama.cpp/models/ggml-vocab-* of llama-cpp-python VERSION's sdist into dest (vocab_dir())."""
    dest = vocab_dir() if dest is None else dest
    if (dest / _DONE).is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", f"llama-cpp-python=={VERSION}", "--dest", work]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"pip download failed: {' '.join(cmd)}")
        sdist = Path(work) / f"llama_cpp_python-{VERSION}.tar.gz"
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/ggml-vocab-"
        n = 0
        with tarfile.open(sdist) as tar:
            for member in tar:
                if not (member.isfile() and member.name.startswith(prefix) and "/" not in member.name[len(prefix) :]):
                    continue
                name = member.name.rsplit("/", 1)[1]  # a plain file name: nothing lands outside dest
                src = tar.extractfile(member)
                assert src is not None
                with src, open(dest / name, "wb") as f:
                    f.write(src.read())
                n += 1
        if n == 0:
            raise RuntimeError(f"{sdist.name} holds no {prefix}* files")
    (dest / _DONE).write_text(f"llama-cpp-python=={VERSION}: {n} files\n")
    return dest


if __name__ == "__main__":
    print(fetch())
