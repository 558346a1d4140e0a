"""Where the benchmarks write their results, and the fields every file starts with.

A result is <out>/<gpu>_<YYYY-MM-DD>[_<part>...].json, some with a Markdown
table (.md) beside it. results_table.py, compare_results.py and the files
already in benchmarks/results/ rely on these names and header keys.
"""

import datetime
import json
import os

import jax


def gpu_name():
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return dev.device_kind.strip().replace(" ", "_").lower()


def header():
    """{"gpu", "jax_version", "date", "settings", "xla_flags"}: what ran the
    benchmark, and when; settings are the run-time variables that change
    which kernels run (e.g. JAX_FLASH_KVCACHE_APPEND=1), as `jax_flash.info()`
    lists them; XLA_FLAGS as set (e.g. autotuning off slows XLA's GEMMs)."""
    from jax_flash._src.info import RUNTIME_VARIABLES

    return {"gpu": gpu_name(), "jax_version": jax.__version__,
            "date": datetime.date.today().isoformat(),
            "settings": [f"{n}={os.environ[n]}" for n in RUNTIME_VARIABLES if n in os.environ],
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def result_stem(out_dir, *parts):
    """<out_dir>/<gpu>_<date>_<part>_..., no extension, empty parts left out
    (an unset --tag adds nothing); creates out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    name = "_".join([gpu_name(), datetime.date.today().isoformat(), *filter(None, parts)])
    return os.path.join(out_dir, name)


def save_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
