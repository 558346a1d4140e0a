"""`jax_flash.info()`: what this install is and whether its kernels will run
here, for users and bug reports (`python -m jax_flash` prints it).

Cheap and never raising: every optional part is wrapped, and a part that fails
reads "unavailable (...)" instead of hiding the rest. The decision itself is
the pure function `kernel_status`, so it can be tested without a GPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform as _platform
from typing import Any, Sequence

KERNEL_PATH = "cuda kernels"
REFERENCE_PATH = "reference (plain JAX)"
# On a GPU the public functions always take the CUDA backend (never a silent
# fallback to the reference, see _src/backend.py); when the kernels cannot run
# there, calls raise instead.
FAILING_PATH = "none: calls raise on this GPU (see why)"

# Environment variables read at run time that change which kernels run
# (jax_flash/_src/cuda_kvcache.py, csrc/host/plan.cc); reported when set.
RUNTIME_VARIABLES = ("JAX_FLASH_KVCACHE_KERNELS", "JAX_FLASH_KVCACHE_APPEND",
                     "JAX_FLASH_KVCACHE_FOLD", "JAX_FLASH_DECODE_COPY",
                     "JAX_FLASH_FORCE_VARIANT")
# pip distributions whose version tells which CUDA JAX itself runs on.
_JAX_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")


def parse_compute_capability(cc: Any) -> int | None:
    """"9.0" -> 90, "8.6" -> 86, "12.0" -> 120; None if not of that form."""
    try:
        major, minor = str(cc).strip().split(".")
        return int(major) * 10 + int(minor)
    except (TypeError, ValueError):
        return None


def cuda_version_string(version: int) -> str:
    """CUDART_VERSION to "major.minor": 13000 -> "13.0", 12080 -> "12.8"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def kernel_status(
    backend: str,
    has_extension: bool,
    import_error: str | None,
    archs: Sequence[int] | None,
    compute_capability: str | None,
) -> tuple[bool, str]:
    """(kernels_will_run, why), from JAX's default backend, whether the
    extension loaded (and its import error if not), the compiled CUDA
    architectures (None: the extension does not say) and the first GPU's
    compute capability ("9.0"). Kernels built for sm_N run on sm_N and later
    (PTX is embedded), so the device needs at least the smallest compiled arch.
    """
    if backend == "unknown":
        return False, "JAX's default backend could not be determined (see `backend`)"
    if backend != "gpu":
        return False, (
            f"JAX runs on {backend}: jax_flash runs its plain-JAX reference there; "
            "install jax[cuda13] on an NVIDIA GPU machine to use the kernels")
    if not has_extension:
        return False, (
            "the package was installed without the CUDA extension "
            f"(import error: {import_error or 'unknown'}); reinstall with "
            "JAX_FLASH_BUILD_CUDA=ON on a machine with nvcc")
    cc = parse_compute_capability(compute_capability)
    if cc is None:
        return False, (
            f"JAX does not report a CUDA compute capability for this GPU "
            f"(got {compute_capability!r}); the kernels need an NVIDIA GPU of "
            "compute capability 8.0 or newer")
    if archs is None:
        return True, (
            f"JAX runs on a GPU of compute capability {compute_capability} and the "
            "CUDA extension is present (it does not report its architectures: not checked)")
    archs = sorted(int(a) for a in archs)
    if not archs:
        return False, "the CUDA extension was built for no CUDA architecture; reinstall it"
    if cc < archs[0]:
        return False, (
            f"GPU compute capability {compute_capability} is below the compiled "
            f"architectures {archs}; use a newer GPU (sm{archs[0]} or later)")
    return True, (
        f"JAX runs on a GPU of compute capability {compute_capability}, and the "
        f"extension is compiled for {archs}")


def path_for(backend: str, will_run: bool) -> str:
    """The path the public functions take on this backend."""
    if backend != "gpu":
        return REFERENCE_PATH
    return KERNEL_PATH if will_run else FAILING_PATH


def _unavailable(e: BaseException) -> str:
    return f"unavailable ({type(e).__name__}: {e})"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except Exception:
        return None


def _jaxlib_version() -> str:
    try:
        import jaxlib.version

        return jaxlib.version.__version__
    except Exception:
        pass
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        pass
    return _dist_version("jaxlib") or "unavailable"


def _build_info(ext) -> dict[str, Any]:
    """The extension's build_info(), as plain lists/str (prefixed keys)."""
    raw = dict(ext.build_info())
    out: dict[str, Any] = {}
    for key in ("cuda_archs", "head_dims"):
        if key in raw:
            out[f"build_{key}"] = [int(x) for x in raw[key]]
    for key in ("variants", "families"):
        if key in raw:
            out[f"build_{key}"] = [str(x) for x in raw[key]]
    if "cuda_version" in raw:
        out["build_cuda_version"] = cuda_version_string(int(raw["cuda_version"]))
    return out


def _in_source_tree(package_file: str) -> bool:
    """Whether the package was imported from a source checkout (e.g.
    `python -m jax_flash` run in the repository root)."""
    return (pathlib.Path(package_file).resolve().parents[1] / "CMakeLists.txt").exists()


def _build_decision(package_file: str) -> str | None:
    """What the build decided (the _build.json CMake installs beside the
    package: whether it compiled the kernels, and why), or None when the
    package runs from a source tree."""
    try:
        path = pathlib.Path(package_file).parent / "_build.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        what = "CUDA kernels" if raw.get("build_cuda") else "CPU-only, no CUDA kernels"
        return f"{what} ({raw.get('reason', 'no reason recorded')})"
    except Exception as e:
        return _unavailable(e)


def info() -> dict[str, Any]:
    """What this jax_flash install is and whether its CUDA kernels run here.

    A plain dict (str keys; str/int/bool/list values), safe to call anywhere:
    it never raises. `python -m jax_flash` prints it, one `key: value` a line.
    """
    import jax_flash
    from jax_flash._src import extension

    d: dict[str, Any] = {}
    d["jax_flash"] = getattr(jax_flash, "__version__", "unknown")
    d["python"] = _platform.python_version()
    d["os"] = _platform.platform()
    try:
        import jax

        d["jax"] = jax.__version__
    except Exception as e:  # pragma: no cover - jax_flash imports jax
        d["jax"] = _unavailable(e)
        jax = None
    d["jaxlib"] = _jaxlib_version()
    for plugin in _JAX_CUDA_PLUGINS:
        version = _dist_version(plugin)
        if version is not None:
            d["jax_cuda_plugin"] = f"{plugin} {version}"
            break

    backend = "unknown"
    compute_capability = None
    try:
        backend = jax.default_backend()
        d["backend"] = backend
    except Exception as e:
        d["backend"] = _unavailable(e)
    try:
        devices = jax.devices()
        d["device"] = devices[0].device_kind if devices else "none"
        d["device_count"] = len(devices)
        if backend == "gpu" and devices:
            compute_capability = getattr(devices[0], "compute_capability", None)
            d["compute_capability"] = compute_capability
    except Exception as e:
        d["device"] = _unavailable(e)

    has_extension = extension._C is not None
    import_error = None if has_extension else (extension.import_error() or "unknown")
    if not has_extension and _in_source_tree(jax_flash.__file__):
        import_error += (" (this jax_flash is the source tree, which has no compiled "
                         "extension; run from outside the repository root to use the "
                         "installed package)")
    d["extension"] = has_extension
    if not has_extension:
        d["extension_error"] = import_error
    decision = _build_decision(jax_flash.__file__)
    if decision is not None:
        d["build"] = decision

    archs = None
    if has_extension:
        try:
            build = _build_info(extension._C)
            d.update(build)
            archs = build.get("build_cuda_archs")
        except Exception as e:
            d["build_info"] = _unavailable(e)

    try:
        will_run, why = kernel_status(backend, has_extension, import_error, archs,
                                      compute_capability)
    except Exception as e:  # pragma: no cover - kernel_status is total
        will_run, why = False, _unavailable(e)
    d["kernels_will_run"] = will_run
    d["why"] = why
    d["path"] = path_for(backend, will_run)
    from jax_flash._src import cuda_kvcache

    try:
        cuda_kvcache.switches()  # every switch: a misspelt one fails each call
        d["kvcache_path"] = (path_for(backend, will_run) if cuda_kvcache.enabled() else
                             REFERENCE_PATH)
    except ValueError as e:  # a switch set to a value it does not take
        d["kvcache_path"] = _unavailable(e)
    settings = [f"{name}={os.environ[name]}" for name in RUNTIME_VARIABLES if name in os.environ]
    if settings:
        d["settings"] = settings
    return d


def _render(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(x) for x in value) + "]"
    return str(value)


def format_info(d: dict[str, Any]) -> str:
    """`key: value` lines, values aligned (what `python -m jax_flash` prints)."""
    width = max((len(k) for k in d), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {_render(v)}" for k, v in d.items())

