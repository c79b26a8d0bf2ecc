"""runtime.torchvision_shim: vLLM's Qwen2-VL code imports where torchvision cannot, the hook is active
from interpreter start, and the shim is inert where a torchvision is installed.

Each check runs in a fresh interpreter (what vLLM's model inspection does), never in this one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from visurf_megatron.runtime import torchvision_shim


def _python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_cpu_environment_has_no_torchvision_and_the_hook_is_installed():
    assert not torchvision_shim.torchvision_installed(), "the CPU set-up removes PyPI's CUDA torchvision"
    assert torchvision_shim.pth_installed(), "run the Makefile set-up (python -m visurf_megatron.runtime.torchvision_shim)"


def test_a_fresh_interpreter_imports_vllms_qwen2_5_vl_model():
    """vLLM's registry inspects the model class in `python -m vllm...registry`: that import chain
    reaches transformers' torchvision image-processor module."""
    done = _python("""
        import sys
        from visurf_megatron.runtime import torchvision_shim
        assert torchvision_shim.active(), "the .pth hook did not run at start-up"
        import vllm.model_executor.models.qwen2_5_vl as m
        from transformers.models.qwen2_vl import image_processing_qwen2_vl as tv, image_processing_pil_qwen2_vl as pil
        assert tv.smart_resize is pil.smart_resize and tv.Qwen2VLImageProcessor is pil.Qwen2VLImageProcessorPil
        assert tv.smart_resize(100, 200, factor=28) == (112, 196)
        print(m.Qwen2_5_VLForConditionalGeneration.__name__)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("Qwen2_5_VLForConditionalGeneration")


def test_without_the_shim_the_import_fails():
    """The failure the shim exists for (so the test above can fail): -S skips site's .pth hooks."""
    bare = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[:0] = %r; "
                           "import transformers.models.qwen2_vl.image_processing_qwen2_vl" % [p for p in sys.path if p]],
                          capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "torchvision" in bare.stderr


def test_inert_where_a_torchvision_is_installed(tmp_path):
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text("# stands for an installed torchvision\n")
    done = _python("""
        import sys
        from visurf_megatron.runtime import torchvision_shim
        assert torchvision_shim.torchvision_installed()
        assert not torchvision_shim.active() and not torchvision_shim.install()
        assert not torchvision_shim.install_video_placeholder()
        print("inert")
    """, {"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "inert"


def test_video_placeholder_refuses_videos_and_the_hook_file(tmp_path):
    assert torchvision_shim.install_video_placeholder()
    placeholder = torchvision_shim.video_placeholder_class()()
    with pytest.raises(RuntimeError, match="torchvision"):
        placeholder(videos=[])
    path = torchvision_shim.write_pth(str(tmp_path))
    assert open(path).read() == "import visurf_megatron.runtime.torchvision_shim\n"
