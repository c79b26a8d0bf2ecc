#!/usr/bin/env python3
"""The GPU image's package set, read from setup.py (the one place pins live).

Used by the Dockerfile (inside the image, to install exactly setup.py's pins) and by
tools/check_gpu_env.sh (on a CPU machine, to resolve the same set without installing it).
Standard library only: it runs before anything is installed.

    gpu_pins.py requirements        the image's requirement lines: install_requires + IMAGE_EXTRAS
    gpu_pins.py constraints         every exact (==) pin among them, extras stripped (a pip -c file)
    gpu_pins.py pin NAME            one pin, e.g. `pin torch` -> torch==2.14.0
    gpu_pins.py stub NAME==VERSION --out DIR [--cuda-major N] [--index URL]
                                    a metadata-only wheel for a source-only package (see below)
    gpu_pins.py stubs --out DIR --torch-report R.json
                                    stubs for every package the image compiles against torch
                                    (SOURCE_BUILT), versions from setup.py's pins, CUDA major from
                                    the pinned torch's metadata (a pip --report of it)
    gpu_pins.py summary NATIVE.json STRICT.json --stubs DIR
                                    compare two pip --report resolutions and check what the
                                    resolver cannot (see `summary`)

Source-only packages. transformer_engine_torch (pulled by transformer-engine[pytorch]) and sam2
exist on PyPI only as sdists whose build imports torch: they are compiled in the image against
the image's torch with --no-build-isolation, and cannot be resolved as binaries on a CPU machine.
`stub` downloads such an sdist (PEP 691 index JSON, sha256 checked), reads the requirements it
declares (PKG-INFO Requires-Dist, else *.egg-info/requires.txt) plus its build-system requirements
(pyproject.toml: with --no-build-isolation they must hold in the image's own environment), and
writes a py3-none-any wheel that carries only that metadata. The resolver then checks those
constraints (e.g. torch>=2.1, setuptools>=61) against the rest of the set. transformer_engine_torch
computes one requirement at build time, transformer_engine_cu{12,13}==VERSION from the CUDA major
of the torch it is built against (its setup.py): `--cuda-major` substitutes it.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import sys
import tarfile
import tomllib
import types
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP_PY = ROOT / "setup.py"
# The extras the GPU image installs: `pip install -e .[gpu,eval,data,sam2]`.
IMAGE_EXTRAS = ("gpu", "eval", "data", "sam2")
DEFAULT_INDEX = "https://pypi.org/simple"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load_setup(setup_py: Path = SETUP_PY) -> dict:
    """setup.py's keyword arguments, by running it with a setuptools.setup that records them."""
    captured: dict = {}
    fake = types.ModuleType("setuptools")
    fake.setup = lambda **kw: captured.update(kw)
    fake.find_packages = lambda *a, **k: []
    saved = sys.modules.get("setuptools")
    sys.modules["setuptools"] = fake
    try:
        code = compile(setup_py.read_text(), str(setup_py), "exec")
        exec(code, {"__name__": "__main__", "__file__": str(setup_py)})
    finally:
        if saved is None:
            sys.modules.pop("setuptools", None)
        else:
            sys.modules["setuptools"] = saved
    if not captured:
        raise SystemExit(f"{setup_py}: setup() was not called")
    return captured


def image_requirements(setup_py: Path = SETUP_PY, extras=IMAGE_EXTRAS) -> list[str]:
    kw = load_setup(setup_py)
    reqs = list(kw.get("install_requires", []))
    for extra in extras:
        if extra not in kw.get("extras_require", {}):
            raise SystemExit(f"setup.py has no extra {extra!r}")
        reqs += kw["extras_require"][extra]
    return reqs


_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def split_requirement(req: str) -> tuple[str, str, str, str]:
    """(name, extras, specifier, marker) of a PEP 508 line without URLs."""
    m = _REQ.match(req)
    if not m:
        raise SystemExit(f"cannot parse requirement {req!r}")
    name, extras, spec, marker = m.groups()
    return name, (extras or ""), spec.strip(), (marker or "")


def exact_pins(reqs: list[str]) -> dict[str, str]:
    """canonical name -> 'name==version' for every requirement that pins one exact version."""
    pins: dict[str, str] = {}
    for req in reqs:
        name, _extras, spec, marker = split_requirement(req)
        if marker or not re.fullmatch(r"==\s*[^,*]+", spec):
            continue
        line = f"{name}{spec.replace(' ', '')}"
        key = canonical(name)
        if key in pins and pins[key] != line:
            raise SystemExit(f"setup.py pins {name} twice for the image: {pins[key]} and {line}")
        pins[key] = line
    return pins


# ---- metadata stubs for source-only packages ----

def _get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


def fetch_sdist(name: str, version: str, index: str = DEFAULT_INDEX) -> tuple[str, bytes]:
    page = json.loads(_get(f"{index.rstrip('/')}/{canonical(name)}/",
                           accept="application/vnd.pypi.simple.v1+json"))
    for f in page.get("files", []):
        fn = f["filename"]
        if not fn.endswith(".tar.gz") or "-" not in fn:
            continue
        fname, fversion = fn[: -len(".tar.gz")].rsplit("-", 1)
        if canonical(fname) == canonical(name) and fversion == version:
            data = _get(f["url"])
            want = f.get("hashes", {}).get("sha256")
            if want and hashlib.sha256(data).hexdigest() != want:
                raise SystemExit(f"{fn}: sha256 mismatch")
            return fn, data
    raise SystemExit(f"no sdist {name}=={version} on {index}")


def sdist_requirements(data: bytes) -> tuple[list[str], list[str], str | None]:
    """(declared requirements, build-system requirements, Requires-Python) of an sdist."""
    reqs: list[str] = []
    egg_reqs: list[str] | None = None
    build: list[str] = []
    requires_python = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name and m.isfile()}
        pkg_info = tar.extractfile(members["PKG-INFO"]).read().decode()
        for line in pkg_info.splitlines():
            if not line.strip():
                break  # headers end at the first blank line
            if line.startswith("Requires-Dist:"):
                reqs.append(line.split(":", 1)[1].strip())
            elif line.startswith("Requires-Python:"):
                requires_python = line.split(":", 1)[1].strip()
        egg = [k for k in members if k.count("/") == 1 and k.endswith(".egg-info/requires.txt")]
        if egg:
            egg_reqs, section = [], None
            for line in tar.extractfile(members[egg[0]]).read().decode().splitlines():
                line = line.strip()
                if not line:
                    continue
                if line.startswith("["):
                    section = line[1:-1]
                    continue
                if section is None:
                    egg_reqs.append(line)
                elif section.startswith(":"):  # [:marker] applies to everyone
                    egg_reqs.append(f"{line}; {section[1:]}")
        if "pyproject.toml" in members:
            pyproject = tomllib.loads(tar.extractfile(members["pyproject.toml"]).read().decode())
            build = list(pyproject.get("build-system", {}).get("requires", []))
    if not reqs and egg_reqs:
        reqs = egg_reqs
    return reqs, build, requires_python


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def write_stub_wheel(name: str, version: str, requires: list[str], requires_python: str | None,
                     out: Path, note: str) -> Path:
    dist = f"{_dist_name(name)}-{version}"
    info = f"{dist}.dist-info"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             f"Summary: METADATA STUB written by docker/gpu_pins.py ({note}); not installable code"]
    if requires_python:
        lines.append(f"Requires-Python: {requires_python}")
    lines += [f"Requires-Dist: {r}" for r in requires]
    files = {
        f"{info}/METADATA": ("\n".join(lines) + "\n").encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: gpu_pins.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, data in files.items():
            zf.writestr(p, data)
    return path


def make_stub(spec: str, out: Path, cuda_major: int | None, index: str) -> None:
    name, _extras, pin, _marker = split_requirement(spec)
    if not pin.startswith("=="):
        raise SystemExit(f"stub needs an exact pin, got {spec!r}")
    version = pin[2:].strip()
    fn, data = fetch_sdist(name, version, index)
    reqs, build, requires_python = sdist_requirements(data)
    if canonical(name) == "transformer-engine-torch":
        # setup.py: te_core = f"transformer_engine_cu{torch CUDA major}=={version}" (PKG-INFO shows
        # whichever CUDA the sdist was made on). Replace it by the image torch's CUDA major.
        if cuda_major is None:
            raise SystemExit("transformer_engine_torch needs --cuda-major (the image torch's CUDA major)")
        reqs = [r for r in reqs if not canonical(split_requirement(r)[0]).startswith("transformer-engine-cu")]
        reqs.append(f"transformer_engine_cu{cuda_major}=={version}")
    # Built with --no-build-isolation: its build requirements must hold in the image's environment,
    # so the stub declares them too and the resolver checks them against the rest of the set.
    path = write_stub_wheel(name, version, reqs + build, requires_python, out, f"from {fn}")
    print(f"{path.name}: from {fn}")
    print(f"  declared requirements: {', '.join(reqs) or '-'}")
    print(f"  build requirements (must hold in the image with --no-build-isolation): {', '.join(build) or '-'}")


# Packages the image compiles against its own torch (sdist only on PyPI; their build imports torch):
# canonical name -> (the setup.py pin that fixes its version, how the Dockerfile builds it).
SOURCE_BUILT = {
    "transformer-engine-torch": ("transformer-engine", "NVTE_PYTORCH_FORCE_BUILD=TRUE pip install --no-build-isolation"),
    "sam2": ("sam2", "SAM2_BUILD_CUDA=0 pip install --no-build-isolation"),
}
# What the resolver cannot see: megatron-core declares its Transformer Engine range only in extras.
EXTRA_EXPECTATIONS = [("megatron-core", "dev", "transformer-engine")]
KEY_PACKAGES = ("torch", "torchvision", "torchaudio", "triton", "vllm", "flashinfer-python", "transformer-engine",
                "transformer-engine-cu13", "transformer-engine-cu12", "transformer-engine-torch", "megatron-core",
                "nvidia-modelopt", "transformers", "numpy", "sam2", "setuptools", "nvidia-cudnn-cu13",
                "nvidia-nccl-cu13", "cuda-toolkit")


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip's vendored copy: the check's venv always has pip
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def read_report(path: Path) -> dict[str, dict]:
    """canonical name -> {version, url, sdist, requires} of a `pip install --report` file."""
    out = {}
    for item in json.loads(Path(path).read_text())["install"]:
        meta = item["metadata"]
        url = item.get("download_info", {}).get("url", "")
        out[canonical(meta["name"])] = {
            "name": meta["name"], "version": meta["version"], "url": url,
            "sdist": url.endswith((".tar.gz", ".zip", ".tar.bz2")),
            "requires": meta.get("requires_dist", []) or [],
        }
    return out


def torch_cuda_major(report: Path) -> int:
    """CUDA major of the torch in a --report: from its cuda-toolkit==X / nvidia-*-cuXX requirements."""
    torch = read_report(report).get("torch")
    if torch is None:
        raise SystemExit(f"{report}: no torch")
    majors = set()
    for req in torch["requires"]:
        name, _e, spec, _m = split_requirement(req)
        if canonical(name) == "cuda-toolkit" and (m := re.match(r"==\s*(\d+)\.", spec)):
            majors.add(int(m.group(1)))
        elif m := re.match(r"nvidia-.*-cu(\d+)$", canonical(name)):
            majors.add(int(m.group(1)))
    if len(majors) != 1:
        raise SystemExit(f"torch {torch['version']}: cannot tell its CUDA major from {torch['requires']}")
    return majors.pop()


def make_stubs(out: Path, torch_report: Path, setup_py: Path, index: str) -> None:
    pins = exact_pins(image_requirements(setup_py))
    major = torch_cuda_major(torch_report)
    print(f"torch's CUDA major (from its metadata): {major}")
    for name, (pinned_by, how) in SOURCE_BUILT.items():
        if pinned_by not in pins:
            raise SystemExit(f"setup.py must pin {pinned_by} exactly: the image builds {name} from its sdist")
        version = pins[pinned_by].split("==", 1)[1]
        print(f"[{name}: the image builds it with `{how}`]")
        make_stub(f"{name}=={version}", out, major if name == "transformer-engine-torch" else None, index)


def summary(native: Path, strict: Path, stubs: Path, setup_py: Path) -> int:
    """Print the resolved set; return 1 on anything a resolver alone would not flag."""
    Requirement, Version = _packaging()
    a, b = read_report(native), read_report(strict)
    problems = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, {}).get("version"), b.get(key, {}).get("version")
        if va != vb:
            problems.append(f"native and manylinux resolutions differ: {key} {va} vs {vb}")
    for key, line in exact_pins(image_requirements(setup_py)).items():
        want = line.split("==", 1)[1]
        if b.get(key, {}).get("version") != want:
            problems.append(f"setup.py pins {line}, resolved {b.get(key, {}).get('version')}")
    stub_names = {canonical(w.name.split("-", 1)[0]) for w in stubs.glob("*.whl")}
    print(f"resolved {len(b)} distributions for CPython 3.12 / manylinux x86_64 (binary wheels only)")
    print("key versions: " + ", ".join(f"{b[k]['name']}=={b[k]['version']}" for k in KEY_PACKAGES if k in b))
    pure = sorted(f"{v['name']}=={v['version']}" for k, v in a.items() if v["sdist"] and k not in stub_names)
    print("pure-Python sdists (built to py3-none-any wheels here, by pip in the image): " + (", ".join(pure) or "none"))
    for key in sorted(stub_names):
        if key not in b:
            problems.append(f"{key}: stub made but not part of the resolution")
            continue
        checks = []
        for req in b[key]["requires"]:
            r = Requirement(req)
            got = b.get(canonical(r.name), {}).get("version")
            ok = got is not None and r.specifier.contains(Version(got), prereleases=True)
            checks.append(f"{r.name}{r.specifier or ''} -> {got or 'MISSING'}{'' if ok else '  <-- VIOLATED'}")
            if not ok and (r.marker is None or r.marker.evaluate()):
                problems.append(f"{key} {b[key]['version']} needs {req}, resolved {got}")
        print(f"source-built {b[key]['name']} {b[key]['version']} (declared + build requirements, checked "
              f"against the set): " + "; ".join(checks))
    for pkg, extra, dep in EXTRA_EXPECTATIONS:
        if pkg not in b or canonical(dep) not in b:
            continue
        for req in b[pkg]["requires"]:
            r = Requirement(req)
            if canonical(r.name) == canonical(dep) and r.marker is not None and \
                    r.marker.evaluate({"extra": extra}) and not r.marker.evaluate({"extra": ""}):
                got = b[canonical(dep)]["version"]
                ok = r.specifier.contains(Version(got), prereleases=True)
                print(f"{b[pkg]['name']} {b[pkg]['version']} [{extra}] expects {r.name}{r.specifier}: "
                      f"{got} {'ok' if ok else 'VIOLATED'}")
                if not ok:
                    problems.append(f"{pkg}[{extra}] expects {r.name}{r.specifier}, resolved {got}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup-py", type=Path, default=SETUP_PY, help="setup.py to read (default: the repo's)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("requirements", help="the image's requirement lines")
    sub.add_parser("constraints", help="exact pins, extras stripped: a pip constraints file")
    p = sub.add_parser("pin", help="one package's exact pin")
    p.add_argument("name")
    s = sub.add_parser("stub", help="metadata-only wheel for a source-only package")
    s.add_argument("spec", help="NAME==VERSION")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--cuda-major", type=int, default=None)
    s.add_argument("--index", default=DEFAULT_INDEX, help=f"PEP 691 simple index (default {DEFAULT_INDEX})")
    ss = sub.add_parser("stubs", help="stubs for every SOURCE_BUILT package")
    ss.add_argument("--out", type=Path, required=True)
    ss.add_argument("--torch-report", type=Path, required=True, help="pip --report of the pinned torch")
    ss.add_argument("--index", default=DEFAULT_INDEX)
    sm = sub.add_parser("summary", help="compare the two resolutions and check what pip cannot")
    sm.add_argument("native", type=Path)
    sm.add_argument("strict", type=Path)
    sm.add_argument("--stubs", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "stub":
        make_stub(args.spec, args.out, args.cuda_major, args.index)
        return 0
    if args.cmd == "stubs":
        make_stubs(args.out, args.torch_report, args.setup_py, args.index)
        return 0
    if args.cmd == "summary":
        return summary(args.native, args.strict, args.stubs, args.setup_py)
    reqs = image_requirements(args.setup_py)
    if args.cmd == "requirements":
        print("\n".join(reqs))
    elif args.cmd == "constraints":
        print(f"# generated from {args.setup_py.name} by docker/gpu_pins.py: the exact pins of the GPU image")
        print("\n".join(sorted(exact_pins(reqs).values(), key=str.lower)))
    elif args.cmd == "pin":
        pins = exact_pins(reqs)
        key = canonical(args.name)
        if key not in pins:
            print(f"setup.py does not pin {args.name} exactly for the GPU image", file=sys.stderr)
            return 1
        print(pins[key])
    return 0


if __name__ == "__main__":
    sys.exit(main())
