"""jax_flash.info() / `python -m jax_flash`: the self-report, on this machine
and with a faked extension and GPU (the decision is `kernel_status`)."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

import jax_flash
from jax_flash._src import extension
from jax_flash._src import info as info_lib

REQUIRED_KEYS = {"jax_flash", "python", "jax", "jaxlib", "backend", "device", "device_count",
                 "extension", "kernels_will_run", "why", "path"}


# ---- On this machine ----------------------------------------------------------


def test_info_on_this_machine():
    d = jax_flash.info()
    assert REQUIRED_KEYS <= d.keys(), REQUIRED_KEYS - d.keys()
    assert d["jax_flash"] == jax_flash.__version__
    assert d["jax"] == jax.__version__
    assert d["backend"] == jax.default_backend()
    assert d["device_count"] == len(jax.devices())
    assert d["device"] == jax.devices()[0].device_kind
    assert d["extension"] is (extension._C is not None)
    assert ("extension_error" in d) is (extension._C is None)
    if jax.default_backend() != "gpu":
        assert d["kernels_will_run"] is False
        assert f"JAX runs on {jax.default_backend()}" in d["why"]
        assert d["path"] == "reference (plain JAX)"
    else:
        assert d["path"] == ("cuda kernels" if d["kernels_will_run"] else info_lib.FAILING_PATH)
        assert "compute_capability" in d


def test_info_reports_the_kvcache_path_and_runtime_settings(monkeypatch):
    monkeypatch.setenv("JAX_FLASH_KVCACHE_KERNELS", "0")
    monkeypatch.delenv("JAX_FLASH_FORCE_VARIANT", raising=False)
    monkeypatch.delenv("JAX_FLASH_KVCACHE_APPEND", raising=False)
    monkeypatch.delenv("JAX_FLASH_KVCACHE_FOLD", raising=False)
    monkeypatch.delenv("JAX_FLASH_DECODE_COPY", raising=False)
    d = jax_flash.info()
    assert d["kvcache_path"] == info_lib.REFERENCE_PATH
    assert d["settings"] == ["JAX_FLASH_KVCACHE_KERNELS=0"]
    monkeypatch.setenv("JAX_FLASH_KVCACHE_KERNELS", "1")
    d = jax_flash.info()
    assert d["kvcache_path"] == d["path"]
    monkeypatch.setenv("JAX_FLASH_KVCACHE_APPEND", "1")
    assert jax_flash.info()["settings"] == ["JAX_FLASH_KVCACHE_KERNELS=1",
                                            "JAX_FLASH_KVCACHE_APPEND=1"]
    monkeypatch.setenv("JAX_FLASH_KVCACHE_FOLD", "1")
    assert jax_flash.info()["settings"][-1] == "JAX_FLASH_KVCACHE_FOLD=1"
    monkeypatch.setenv("JAX_FLASH_DECODE_COPY", "cp_async")
    assert jax_flash.info()["settings"][-1] == "JAX_FLASH_DECODE_COPY=cp_async"
    monkeypatch.delenv("JAX_FLASH_DECODE_COPY")
    monkeypatch.delenv("JAX_FLASH_KVCACHE_FOLD")
    monkeypatch.delenv("JAX_FLASH_KVCACHE_APPEND")
    monkeypatch.delenv("JAX_FLASH_KVCACHE_KERNELS")
    assert "settings" not in jax_flash.info()


@pytest.mark.parametrize("name", ["JAX_FLASH_KVCACHE_KERNELS", "JAX_FLASH_KVCACHE_APPEND",
                                  "JAX_FLASH_KVCACHE_FOLD"])
def test_info_reports_a_switch_it_cannot_read(monkeypatch, name):
    monkeypatch.setenv(name, "yes")
    d = jax_flash.info()
    assert d["kvcache_path"] == (f"unavailable (ValueError: environment variable {name}: "
                                 "expected '1', '0' or unset, got 'yes')"), d
    assert f"{name}=yes" in d["settings"]


def test_info_is_exported():
    assert "info" in jax_flash.__all__
    assert jax_flash.info is info_lib.info


@pytest.mark.skipif(extension._C is not None, reason="the extension is present")
def test_missing_extension_error_is_not_misleading():
    # `from jax_flash import _C` would report a "circular import"; the kept
    # error must name the missing module instead.
    assert "jax_flash._C" in extension.import_error()
    assert "circular" not in extension.import_error()
    assert jax_flash.info()["extension_error"].startswith(extension.import_error())


def test_python_m_jax_flash():
    root = str(Path(jax_flash.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "jax_flash"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(rf"jax_flash:\s+{re.escape(jax_flash.__version__)}", lines[0]), lines[0]
    assert any(re.fullmatch(rf"backend:\s+{jax.default_backend()}", line) for line in lines)
    assert any(re.fullmatch(r"kernels_will_run:\s+(True|False)", line) for line in lines)
    # Aligned: every value starts in the same column.
    starts = {len(m.group(1)) for m in (re.match(r"(\S+:\s+)\S", line) for line in lines)}
    assert len(starts) == 1, lines


# ---- The decision, as a pure function -----------------------------------------


def test_kernel_status_not_gpu():
    ok, why = info_lib.kernel_status("cpu", True, None, [80, 90], None)
    assert ok is False
    assert "JAX runs on cpu" in why and "jax[cuda13]" in why
    ok, why = info_lib.kernel_status("tpu", False, "No module named 'jax_flash._C'", None, None)
    assert ok is False and "JAX runs on tpu" in why


def test_kernel_status_gpu_without_extension():
    ok, why = info_lib.kernel_status("gpu", False, "No module named 'jax_flash._C'", None, "9.0")
    assert ok is False
    assert "without the CUDA extension" in why
    assert "No module named 'jax_flash._C'" in why
    assert "JAX_FLASH_BUILD_CUDA=ON" in why


@pytest.mark.parametrize("cc, archs, expected", [
    ("7.5", [80, 90], False),
    ("8.0", [80, 90], True),   # the smallest compiled arch itself
    ("8.6", [90, 80], True),   # order of archs does not matter
    ("9.0", [80, 90], True),
    ("8.9", [90], False),
    ("12.0", [80, 90], True),  # PTX runs on later GPUs: 120 >= 80
])
def test_kernel_status_compute_capability(cc, archs, expected):
    ok, why = info_lib.kernel_status("gpu", True, None, archs, cc)
    assert ok is expected, why
    assert cc in why
    if not expected:
        assert f"{sorted(archs)}" in why and "below" in why


def test_kernel_status_unknown_capability_or_archs():
    ok, why = info_lib.kernel_status("gpu", True, None, [80, 90], None)
    assert ok is False and "compute capability" in why
    ok, why = info_lib.kernel_status("gpu", True, None, [80, 90], "gfx90a")
    assert ok is False and "gfx90a" in why
    ok, why = info_lib.kernel_status("gpu", True, None, None, "9.0")
    assert ok is True and "not checked" in why
    ok, why = info_lib.kernel_status("gpu", True, None, [], "9.0")
    assert ok is False


def test_helpers():
    assert info_lib.parse_compute_capability("9.0") == 90
    assert info_lib.parse_compute_capability("12.1") == 121
    assert info_lib.parse_compute_capability(None) is None
    assert info_lib.parse_compute_capability("sm_90") is None
    assert info_lib.cuda_version_string(13000) == "13.0"
    assert info_lib.cuda_version_string(12080) == "12.8"
    assert info_lib.path_for("cpu", False) == "reference (plain JAX)"
    assert info_lib.path_for("gpu", True) == "cuda kernels"
    assert info_lib.path_for("gpu", False) == info_lib.FAILING_PATH


def test_format_info_aligns_and_renders_lists():
    text = info_lib.format_info({"a": 1, "long_key": [80, 90], "flag": False})
    assert text.splitlines() == ["a:        1", "long_key: [80, 90]", "flag:     False"]


# ---- info() with a faked extension and GPU ------------------------------------


class _FakeGpu:
    platform = "gpu"
    device_kind = "NVIDIA Fake"

    def __init__(self, compute_capability):
        self.compute_capability = compute_capability


def _fake_extension(build_info=None):
    def _build_info():
        if build_info is None:
            raise RuntimeError("boom")
        return build_info
    return types.SimpleNamespace(build_info=_build_info)


BUILD = {"cuda_archs": [80, 90], "head_dims": [64, 128], "variants": ["fwd", "bwd"],
         "families": ("sm80",), "cuda_version": 13000}


def _fake_gpu(monkeypatch, cc, ext):
    monkeypatch.setattr(extension, "_C", ext)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [_FakeGpu(cc), _FakeGpu(cc)])


def test_info_fake_gpu_below_compiled_archs(monkeypatch):
    _fake_gpu(monkeypatch, "7.5", _fake_extension(BUILD))
    d = jax_flash.info()
    assert d["backend"] == "gpu" and d["device"] == "NVIDIA Fake" and d["device_count"] == 2
    assert d["compute_capability"] == "7.5"
    assert d["extension"] is True and "extension_error" not in d
    assert d["kernels_will_run"] is False
    assert "7.5" in d["why"] and "[80, 90]" in d["why"]
    assert d["path"] == info_lib.FAILING_PATH


def test_info_fake_gpu_runs_kernels(monkeypatch):
    _fake_gpu(monkeypatch, "9.0", _fake_extension(BUILD))
    d = jax_flash.info()
    assert d["kernels_will_run"] is True, d["why"]
    assert d["path"] == "cuda kernels"
    assert d["build_cuda_archs"] == [80, 90]
    assert d["build_head_dims"] == [64, 128]
    assert d["build_variants"] == ["fwd", "bwd"]
    assert d["build_families"] == ["sm80"]
    assert d["build_cuda_version"] == "13.0"
    assert "build_cuda_archs: [80, 90]" in info_lib.format_info(d).replace("  ", "")


def test_info_fake_gpu_without_extension(monkeypatch):
    _fake_gpu(monkeypatch, "9.0", None)
    monkeypatch.setattr(extension, "_IMPORT_ERROR", ImportError("libcudart.so.13: not found"))
    d = jax_flash.info()
    assert d["extension"] is False
    assert d["extension_error"].startswith("libcudart.so.13: not found")
    assert d["kernels_will_run"] is False
    assert "libcudart.so.13: not found" in d["why"] and "JAX_FLASH_BUILD_CUDA=ON" in d["why"]


def test_info_never_raises(monkeypatch):
    # A build_info that raises, and devices() that raises: info() still answers.
    _fake_gpu(monkeypatch, "9.0", _fake_extension(None))
    d = jax_flash.info()
    assert d["build_info"].startswith("unavailable (RuntimeError: boom")
    assert "build_cuda_archs" not in d

    def broken():
        raise RuntimeError("no backend")
    monkeypatch.setattr(jax, "devices", broken)
    d = jax_flash.info()
    assert d["backend"] == "gpu" and "no backend" in d["device"]
    assert d["kernels_will_run"] is False and "compute capability" in d["why"]
    assert REQUIRED_KEYS - {"device_count"} <= d.keys()
    monkeypatch.setattr(jax, "default_backend", broken)
    d = jax_flash.info()
    assert d["backend"].startswith("unavailable (RuntimeError: no backend")
    assert d["kernels_will_run"] is False and "could not be determined" in d["why"]


def test_build_decision_is_read_from_the_installed_build_json(tmp_path):
    from jax_flash._src import info as info_lib
    package = tmp_path / "jax_flash"
    package.mkdir()
    (package / "__init__.py").write_text("")
    assert info_lib._build_decision(str(package / "__init__.py")) is None
    (package / "_build.json").write_text(
        '{"build_cuda": false, "reason": "nvcc found, but nvidia-smi shows no NVIDIA GPU", '
        '"cuda_archs": [], "head_dims": [64]}')
    decision = info_lib._build_decision(str(package / "__init__.py"))
    assert decision == ("CPU-only, no CUDA kernels (nvcc found, but nvidia-smi shows no "
                        "NVIDIA GPU)")


def test_source_tree_is_recognised(tmp_path):
    from jax_flash._src import info as info_lib
    package = tmp_path / "jax_flash"
    package.mkdir()
    assert not info_lib._in_source_tree(str(package / "__init__.py"))
    (tmp_path / "CMakeLists.txt").write_text("")
    assert info_lib._in_source_tree(str(package / "__init__.py"))
