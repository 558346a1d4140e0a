"""The build's AUTO decision, through CMake's configure step: compile the CUDA
kernels only where they can run (nvcc found and an NVIDIA GPU visible), for
the visible GPUs' architectures; otherwise a CPU-only package whose
_build.json says why. GPUs are faked with an nvidia-smi script on PATH.
JAX_FLASH_VARIANTS picks the kernels (configure prints their count)."""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None
    or shutil.which("c++") is None,
    reason="needs cmake, ninja and a C++ compiler (pip install -r tests/requirements.txt brings the first two)")


def _configure(tmp_path, *defines, gpu_caps=None, env=None):
    """Runs cmake's configure step; returns (output, _build.json or None)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # A fake nvidia-smi, first on PATH, answers for the GPUs we pretend to have
    # (none: it fails as nvidia-smi does without a driver). The rest of PATH is
    # kept whole: the real nvidia-smi may share a folder with the linker.
    smi = bindir / "nvidia-smi"
    if gpu_caps is None:
        smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    else:
        smi.write_text("#!/bin/sh\n" + "".join(f"echo {c}\n" for c in gpu_caps))
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    path = os.pathsep.join([str(bindir), os.environ.get("PATH", "")])
    run_env = {**os.environ, "PATH": path, **(env or {})}
    build = tmp_path / "build"
    # The CUTLASS dir is left unfound on purpose: configure stops right after
    # the decision when it builds CUDA, which keeps the test fast.
    proc = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), "-G", "Ninja",
         "-DJAX_FLASH_CUTLASS_DIR=/nonexistent", *defines],
        env=run_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    info = build / "_build.json"
    return out, (json.loads(info.read_text()) if info.exists() else None)


def test_no_gpu_gives_a_cpu_only_install_and_says_why(tmp_path):
    out, info = _configure(tmp_path)
    assert info is not None and info["build_cuda"] is False, out
    assert "no CUDA kernels" in out and "JAX_FLASH_BUILD_CUDA=ON" in out
    if shutil.which("nvcc"):
        assert info["reason"] == "nvcc found, but nvidia-smi shows no NVIDIA GPU"


def test_no_compiler_gives_a_cpu_only_install(tmp_path):
    out, info = _configure(tmp_path, gpu_caps=["9.0"], env={"CUDACXX": "/bin/false"})
    assert info["build_cuda"] is False, out
    assert info["reason"] == "no CUDA compiler (nvcc) found"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_visible_gpus_choose_the_architectures(tmp_path):
    out, info = _configure(tmp_path, gpu_caps=["9.0", "8.0", "9.0"])
    assert info["build_cuda"] is True, out
    assert info["cuda_archs"] == [90, 80]
    assert "CUDA kernels for architectures 90;80" in out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_explicit_architectures_win(tmp_path):
    _, info = _configure(tmp_path, "-DJAX_FLASH_CUDA_ARCHS=80", gpu_caps=["9.0"])
    assert info["build_cuda"] is True and info["cuda_archs"] == [80]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_on_without_a_gpu_builds_the_default_architectures(tmp_path):
    out, info = _configure(tmp_path, "-DJAX_FLASH_BUILD_CUDA=ON")
    assert info["build_cuda"] is True, out
    assert info["cuda_archs"] == [80, 90]


def test_off_wins_over_a_visible_gpu(tmp_path):
    _, info = _configure(tmp_path, "-DJAX_FLASH_BUILD_CUDA=OFF", gpu_caps=["9.0"])
    assert info["build_cuda"] is False and info["reason"] == "JAX_FLASH_BUILD_CUDA=OFF"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("variants,expected,kernels", [
    ("all", ["full", "local", "segs", "mods", "dropout"], 22),
    # the variant that covers every feature is always added
    ("local", ["local", "dropout"], 10),
    ("mods;full", ["mods", "full", "dropout"], 14),
])
def test_variants_choose_the_kernels(tmp_path, variants, expected, kernels):
    # Head dim 64: 2 passes x 2 dtypes per variant, plus the 2 decode
    # kernels, in 6 files (one per pass and dtype holds every variant).
    out, info = _configure(tmp_path, "-DJAX_FLASH_BUILD_CUDA=ON", "-DJAX_FLASH_CUDA_ARCHS=80",
                           "-DJAX_FLASH_HEADDIMS=64", f"-DJAX_FLASH_VARIANTS={variants}")
    assert info["variants"] == expected, out
    assert (f"jax_flash: {kernels} kernels in 6 files (head dims 64; "
            f"variants {';'.join(expected)})") in out


def test_unknown_variant_is_an_error(tmp_path):
    out, info = _configure(tmp_path, "-DJAX_FLASH_VARIANTS=full;fast")
    assert info is None
    assert "unknown kernel variant 'fast' in JAX_FLASH_VARIANTS" in out, out


def _fake_cutlass(tmp_path):
    """The two CUTLASS headers configure reads (the kernel inputs hash version.h)."""
    root = tmp_path / "cutlass_include"
    (root / "cute").mkdir(parents=True)
    (root / "cutlass").mkdir()
    (root / "cute" / "tensor.hpp").write_text("// CuTe\n")
    (root / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4\n")
    return root


def _configure_kernels(tmp_path, *defines):
    """Like _configure with the kernels on; CMake's line wrapping undone."""
    cutlass = _fake_cutlass(tmp_path)
    out, info = _configure(tmp_path, "-DJAX_FLASH_BUILD_CUDA=ON", "-DJAX_FLASH_CUDA_ARCHS=80",
                      "-DJAX_FLASH_HEADDIMS=64", f"-DJAX_FLASH_CUTLASS_DIR={cutlass}",
                      f"-DPython_EXECUTABLE={sys.executable}", *defines)
    return " ".join(out.split()), info


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@needs_nvcc
def test_configure_lists_what_the_kernels_are_built_from(tmp_path):
    out, _ = _configure_kernels(tmp_path)
    lines = (tmp_path / "build" / "kernel_inputs.txt").read_text().splitlines()
    assert lines[0].startswith("nvcc ") and "archs 80" in lines, out
    assert any(line.startswith("csrc/instantiations/fwd_hdim64_bf16.cu ") for line in lines)
    assert any(line.startswith("csrc/sm80/bwd_kernel.h ") for line in lines)
    assert any(line.startswith("cutlass/version.h ") for line in lines)
    assert not any("hdim128" in line for line in lines)  # head dims not compiled


def _archive(tmp_path, lines):
    archive = tmp_path / "prebuilt" / "libjax_flash_kernels.a"
    archive.parent.mkdir()
    archive.write_bytes(b"!<arch>\n")
    (tmp_path / "prebuilt" / "libjax_flash_kernels.a.inputs.txt").write_text("\n".join(lines) + "\n")
    return archive


def _tree_inputs(tmp_path):
    """The kernel inputs list of this tree, from a configure of its own."""
    first = tmp_path / "first"
    first.mkdir()
    _configure_kernels(first)
    return (first / "build" / "kernel_inputs.txt").read_text().splitlines()


@needs_nvcc
def test_a_matching_kernel_archive_is_linked(tmp_path):
    lines = _tree_inputs(tmp_path)
    archive = _archive(tmp_path, lines)
    out, _ = _configure_kernels(tmp_path, f"-DJAX_FLASH_KERNEL_ARCHIVE={archive}")
    assert f"linking the prebuilt kernels in {archive}" in out, out


@needs_nvcc
def test_a_stale_kernel_archive_is_an_error_naming_the_difference(tmp_path):
    lines = _tree_inputs(tmp_path)
    changed = [line if not line.startswith("csrc/sm80/fwd_kernel.h ") else
               "csrc/sm80/fwd_kernel.h 0000" for line in lines]
    archive = _archive(tmp_path, changed)
    out, _ = _configure_kernels(tmp_path, f"-DJAX_FLASH_KERNEL_ARCHIVE={archive}")
    assert "built from other sources or settings than this tree's" in out, out
    assert "archive: csrc/sm80/fwd_kernel.h 0000" in out
    assert "this tree: csrc/sm80/fwd_kernel.h " in out
    assert "linking the prebuilt kernels" not in out


@needs_nvcc
def test_a_missing_kernel_archive_is_an_error(tmp_path):
    out, _ = _configure_kernels(tmp_path, f"-DJAX_FLASH_KERNEL_ARCHIVE={tmp_path}/none.a")
    assert f"expected '{tmp_path}/none.a'" in out and "got no such file" in out, out
