#!/usr/bin/env bash
# Resolve the GPU image's Python package set on a CPU machine, without installing it; fail on any
# conflict. See usage() for what it does and what it costs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: tools/check_gpu_env.sh [--setup-py PATH] [--python PYTHON3.12] [--work DIR] [--full-downloads]
                              [-h|--help]

Resolves the GPU image's package set (setup.py's install_requires + extras gpu,eval,data,sam2, read by
docker/gpu_pins.py, exactly as the Dockerfile reads them) for CPython 3.12 on manylinux x86_64,
with pip's resolver in dry-run mode. Installs nothing outside a throwaway work directory; exits 0
only if the whole set resolves, both resolutions agree, and the checks below pass.

Steps
  1. A throwaway venv (from --python, a CPython 3.12; default python3.12) with a current pip.
  2. torch's metadata (pip --report of the pinned torch) -> its CUDA major.
  3. Packages the image COMPILES against its torch exist on PyPI only as sdists whose build imports
     torch (transformer_engine_torch, sam2): binary resolution cannot see them. Their sdists are
     downloaded (sha256-checked), and a metadata-only stub wheel is made from the requirements they
     declare + their build-system requirements (the image builds them with --no-build-isolation,
     so both must hold in the image's environment). transformer_engine_torch's one build-time
     requirement, transformer_engine_cu<CUDA major>, is filled in from step 2.
  4. Native resolution on this interpreter (sdists allowed; the stubs stand in for the sdists
     above). Every other sdist it needs must build to a py3-none-any wheel (pure Python): each is
     built here, in an isolated build env, and checked.
  5. Strict resolution: --python-version 3.12 --implementation cp --abi cp312, every
     manylinux_2_39 .. manylinux1 x86_64 tag (Ubuntu 24.04 = glibc 2.39; pip does not expand
     manylinux_2_x tags itself), --only-binary=:all:, stubs and pure-Python wheels via --find-links.
  6. Summary: both resolutions must pick the same versions; every setup.py pin must be what was
     resolved; each stub's requirements are printed against the versions chosen (e.g.
     transformer_engine_torch's torch>=2.1 -> 2.14.0); megatron-core's declared Transformer Engine
     range (its `dev` extra, which pip never evaluates here) must contain the pinned version.

pip configuration: runs with PIP_CONFIG_FILE=/dev/null (no pip.conf of any level is read: a
machine-wide file can add local indexes or cap versions, e.g. torch<=2.14.1 on the dev machines)
and --isolated (no PIP_* variables, no user config): it always asks https://pypi.org/simple.

Cost: network, no GPU, nothing installed outside the work directory. pip needs each candidate's
METADATA. pypi.org serves it as separate files (PEP 658) but not every route to it does (the dev
machines' does not), and then a plain dry run DOWNLOADS EVERY WHEEL: about 9 GB for the two
resolutions (torch alone is 555 MB). So by default pip runs with --use-feature=fast-deps (pip's
experimental lazy wheels: HTTP range requests for the METADATA inside each wheel; same result,
checked: the 240 versions were identical). Other downloads: pip itself, the two torch-built sdists
(~0.5 MB), the pure-Python sdists and setuptools for their builds (~2 MB). Measured on a dev
machine (2 cores, fast link): about 2.5 minutes with fast-deps (each resolution ~1 minute), about
3 minutes with --full-downloads there; on a slower link full downloads take far longer.

Options
  --setup-py PATH   read the pins from this setup.py instead of the repository's (used to check
                    that an inconsistent pin fails)
  --python PY       CPython 3.12 interpreter for the venv (default: python3.12)
  --work DIR        keep the venv, stubs, reports and pip logs in DIR (default: a temp dir,
                    removed at exit)
  --full-downloads  no fast-deps: let pip download whole wheels where no metadata file exists
  -h, --help        this text

Exit status: 0 the set resolves; 1 a conflict or failed check (pip's own message is printed);
2 usage or environment error.
EOF
}

SETUP_PY=$ROOT/setup.py
PYTHON=python3.12
WORK=
FAST_DEPS=(--use-feature=fast-deps)
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --setup-py) SETUP_PY=$(realpath "${2:?--setup-py needs a path}"); shift 2 ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
    --work) WORK=${2:?--work needs a directory}; shift 2 ;;
    --full-downloads) FAST_DEPS=(); shift ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "check_gpu_env: $*" >&2; exit 2; }
[[ -f $SETUP_PY ]] || die "no setup.py at $SETUP_PY"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (--python: a CPython 3.12)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
  || die "$PYTHON is not a working CPython 3.12 (the image's Python; the native resolution needs one): pass --python"

if [[ -z $WORK ]]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/check_gpu_env.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
STUBS=$WORK/stubs
PUREWHL=$WORK/pure-wheels
rm -rf "$STUBS" "$PUREWHL"
mkdir -p "$STUBS" "$PUREWHL"

export PIP_CONFIG_FILE=/dev/null
PIPFLAGS=(--isolated --disable-pip-version-check --no-input)
start=$SECONDS
rx_bytes() { awk -F'[: ]+' 'NR > 2 && $2 != "lo" { s += $3 } END { printf "%.0f", s }' /proc/net/dev 2>/dev/null || echo 0; }
rx0=$(rx_bytes)

step() { printf '\n== %s\n' "$*"; }

step "venv ($("$PYTHON" -V 2>&1)) and pip"
[[ -x $WORK/venv/bin/python ]] || "$PYTHON" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install "${PIPFLAGS[@]}" -q --upgrade 'pip>=25.1' > "$WORK/pip-upgrade.log" 2>&1 \
  || { cat "$WORK/pip-upgrade.log"; die "cannot upgrade pip in the work venv (network?)"; }
"$VPY" -m pip --version

PINS=("$VPY" "$ROOT/docker/gpu_pins.py" --setup-py "$SETUP_PY")
"${PINS[@]}" requirements > "$WORK/requirements.txt"
"${PINS[@]}" constraints > "$WORK/constraints.txt"
TORCH_PIN=$("${PINS[@]}" pin torch) || die "setup.py's gpu extra must pin torch exactly"
# `wheel`: transformer_engine_torch's setup.py imports it but does not declare it; the image installs it.
BUILD_TOOLS=(wheel)

PLATFORMS=()
for minor in $(seq 39 -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64
            --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 "${PLATFORMS[@]}" --only-binary=:all:)

step "torch's metadata ($TORCH_PIN)"
"$VPY" -m pip install "${PIPFLAGS[@]}" "${FAST_DEPS[@]}" -q --dry-run --ignore-installed --no-deps "${TARGET[@]}" \
  --report "$WORK/torch.json" "$TORCH_PIN" > "$WORK/pip-torch.log" 2>&1 \
  || { cat "$WORK/pip-torch.log"; echo "FAIL: $TORCH_PIN has no CPython 3.12 manylinux x86_64 wheel"; exit 1; }

step "stubs for the packages the image compiles against torch"
"${PINS[@]}" stubs --out "$STUBS" --torch-report "$WORK/torch.json"

resolve() {  # resolve NAME REPORT EXTRA_PIP_ARGS...
  local name=$1 report=$2; shift 2
  if ! "$VPY" -m pip install "${PIPFLAGS[@]}" "${FAST_DEPS[@]}" --dry-run --ignore-installed --report "$report" \
      --find-links "$STUBS" --find-links "$PUREWHL" "$@" \
      -r "$WORK/requirements.txt" -c "$WORK/constraints.txt" "${BUILD_TOOLS[@]}" > "$WORK/pip-$name.log" 2>&1; then
    sed -n '/^ERROR\|conflict\|requested\|depends on\|Additionally\|^    /p' "$WORK/pip-$name.log" | head -40
    echo "FAIL: the GPU package set does not resolve ($name resolution; full log: $WORK/pip-$name.log)"
    exit 1
  fi
}

step "native resolution (CPython 3.12 on this machine; sdists allowed)"
resolve native "$WORK/native.json"
mapfile -t SDISTS < <("$VPY" - "$WORK/native.json" "$STUBS" <<'PY'
import json, pathlib, re, sys
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
stubs = {canon(w.name.split("-", 1)[0]) for w in pathlib.Path(sys.argv[2]).glob("*.whl")}
for item in json.loads(pathlib.Path(sys.argv[1]).read_text())["install"]:
    url, meta = item.get("download_info", {}).get("url", ""), item["metadata"]
    if not url.endswith(".whl") and canon(meta["name"]) not in stubs:
        print(f"{meta['name']}=={meta['version']}")
PY
)
for sdist in "${SDISTS[@]}"; do
  "$VPY" -m pip wheel "${PIPFLAGS[@]}" -q --no-deps --no-binary=:all: -w "$PUREWHL" "$sdist" \
    > "$WORK/pip-wheel.log" 2>&1 || { cat "$WORK/pip-wheel.log"; echo "FAIL: cannot build $sdist"; exit 1; }
done
for whl in "$PUREWHL"/*.whl; do
  [[ -e $whl ]] || continue
  case $(basename "$whl") in
    *-py3-none-any.whl|*-py2.py3-none-any.whl) echo "pure Python: $(basename "$whl")" ;;
    *) echo "FAIL: $(basename "$whl") is compiled code with no manylinux wheel on PyPI; the image would" \
            "build it from source: add it to SOURCE_BUILT in docker/gpu_pins.py deliberately, or pin a version with a wheel"
       exit 1 ;;
  esac
done

step "strict resolution (CPython 3.12, manylinux x86_64 wheels only)"
resolve strict "$WORK/strict.json" "${TARGET[@]}"

step "summary"
status=0
"${PINS[@]}" summary "$WORK/native.json" "$WORK/strict.json" --stubs "$STUBS" || status=1
rx=$(( ($(rx_bytes) - rx0) / 1048576 ))
echo "wall time $((SECONDS - start)) s; this machine received ${rx} MiB meanwhile (all processes; /proc/net/dev)"
if [[ $status == 0 ]]; then echo "OK: the GPU image's package set resolves"; else echo "FAIL: see PROBLEM lines"; fi
exit $status
