"""The examples and the benchmarks' smoke runs (training step, ring, sharded
step) run end to end: each as a subprocess (as a user runs it), with small
settings, judged by its exit code and the lines or JSON it writes. On a CPU
the attention is the plain-JAX reference; most of the time is XLA compiling
(about two minutes for the file on 2 cores)."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

import jax_flash  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A safety net for a hung run: on 2 cores most runs take 10-70 s.
TIMEOUT_S = 300


def run(script, *args):
    """Runs a repository script with this interpreter; returns its stdout."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    # The script's own folder leads its sys.path, so `import jax_flash` finds
    # the installed package; when these tests run on the source tree, give
    # the scripts the source tree too.
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(jax_flash.__file__)))
    if pkg_root == REPO:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, f"{script} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_quickstart_says_which_path_ran_and_compares():
    out = run("examples/quickstart.py")
    info = jax_flash.info()
    first = out.splitlines()[0]
    assert first.startswith(f"path: {info['path']}"), (first, info["path"])
    if info["path"] != "cuda kernels":
        assert "no kernel runs here" in out or info["why"] in first, out
    errs = [float(e) for e in re.findall(r"max \|out - reference\| = ([\d.e+-]+)", out)]
    assert len(errs) == 2 and all(e < 2e-2 for e in errs), out
    assert "vs jax_flash.reference.attention_ref" in out
    assert "vs jax_flash.reference.attention_varlen_ref" in out


def test_train_gpt_tiny_loss_falls(tmp_path):
    out = run("examples/train_gpt.py", "--tiny", "--steps", "40", "--log-every", "10",
              "--eval-every", "40", "--out-dir", str(tmp_path), "--save")
    m = re.search(r"loss: first ([\d.]+) \(step 1\) -> last ([\d.]+)", out)
    assert m, out
    first, last = float(m.group(1)), float(m.group(2))
    # Step 1 is the untrained model, about ln(256) = 5.55 nats per byte; 40
    # steps learn at least the byte frequencies (about 3.3 nats).
    assert 5.0 < first < 6.0 and last < first - 1.5, out
    assert re.search(r"step +40 +validation loss [\d.]+", out), out
    assert re.search(r"[\d,]+ tokens/s", out), out
    assert (tmp_path / "params.npz").stat().st_size > 0
    assert (tmp_path / "loss.png").exists() or "matplotlib is not installed" in out


def test_generate_paged_cache_matches_full_recompute():
    out = run("examples/generate.py", "--tokens", "24")
    assert "prompt lengths [15, 36, 73]" in out, out
    assert "cached decode matches the full recompute: yes" in out, out


def test_long_context_ring_matches_one_device():
    if jax.default_backend() != "cpu" and len(jax.devices()) < 4:
        pytest.skip("needs 4 accelerators (on CPU the example makes 8 host devices)")
    out = run("examples/long_context.py", "--tokens", "1024", "--devices", "4")
    assert "1024 tokens, 256 per device (zigzag layout)" in out, out
    assert "ring attention matches the attention on one device: yes" in out, out
    # The windowed step moves fewer K/V blocks than the causal one.
    permutes = [int(m) for m in re.findall(r"collective-permute x(\d+)", out)]
    assert len(permutes) == 2 and permutes[1] < permutes[0], out


def test_bench_train_step_smoke(tmp_path):
    out = run("benchmarks/bench_train_step.py", "--smoke", "--out", str(tmp_path))
    (path,) = tmp_path.glob("*_train_step_smoke.json")
    result = json.loads(path.read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"jax_flash", "cudnn", "xla"}, rows
    for impl in ("jax_flash", "xla"):
        assert rows[impl]["step_ms"] > 0 and 0 < rows[impl]["attn_share"], rows[impl]
    if jax.default_backend() != "gpu":
        assert rows["cudnn"]["skipped"] and "cuDNN" in rows["cudnn"]["error"], rows["cudnn"]
    assert path.with_suffix(".md").read_text().startswith("Training step"), out


def _smoke_json(script, tmp_path, stem):
    if jax.default_backend() != "cpu":
        pytest.skip("the smoke run makes 8 CPU host devices")
    out = run(script, "--smoke", "--out", str(tmp_path))
    (path,) = tmp_path.glob(f"*_{stem}_smoke.json")
    return json.loads(path.read_text()), out


def test_bench_ring_smoke(tmp_path):
    result, out = _smoke_json("benchmarks/bench_ring.py", tmp_path, "ring")
    assert result["check"]["pass"], result["check"]  # every variant by the FA rule
    rows = [r for r in result["rows"] if r["n"] == 8]
    assert {r["impl"] for r in rows} == {"ring", "allgather", "allgather_varlen"}, out
    for r in rows:
        kinds = set(r["collectives"])
        if r["impl"] == "ring":  # K/V travel by permutes only: nothing is gathered
            assert kinds == {"collective-permute"}, r
        else:
            assert "all-gather" in kinds and "collective-permute" not in kinds, r
        assert r["temp_bytes_per_device"] > 0, r


def test_bench_sharded_step_smoke(tmp_path):
    result, out = _smoke_json("benchmarks/bench_sharded_step.py", tmp_path, "sharded_step")
    rows = result["rows"]
    assert {r["split"] for r in rows} == {"batch", "heads"}, out
    assert max(r["devices"] for r in rows) == 8, out
    for r in rows:  # the partitioning rules: no collective for either split
        assert r["collectives"] == [] and r["ms"] > 0, r


def test_bench_decode_page_orders():
    # --page-order: every page once either way; "sequential" keeps each
    # sequence's pages in order, after the previous sequence's.
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import numpy as np; "
            "import bench_decode as b\n"
            "for order in ('random', 'sequential'):\n"
            "    print(np.asarray(b.page_table(np.random.RandomState(0), 3, 5, order)).tolist())")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    shuffled, in_order = (json.loads(line) for line in res.stdout.splitlines()[-2:])
    assert in_order == np.arange(15).reshape(3, 5).tolist()
    assert sorted(sum(shuffled, [])) == list(range(15)) and shuffled != in_order


def test_bench_decode_smoke(tmp_path):
    out = run("benchmarks/bench_decode.py", "--smoke", "--kinds", "decode,paged,append",
              "--num-splits", "2", "--out", str(tmp_path))
    (path,) = tmp_path.glob("*_decode.json")
    result = json.loads(path.read_text())
    assert result["num_splits"] == 2, result
    rows = result["rows"]
    assert {(r["kind"], r["impl"]) for r in rows} == {
        ("decode", "jax_flash"), ("decode", "jax_flash_ref"), ("decode", "xla"),
        ("paged", "jax_flash"), ("append", "jax_flash_append_rotary")}, out
    for r in rows:
        assert r["ms"] and r["gbps"] > 0, r
        if r["impl"] == "jax_flash_ref":  # one call per dispatch
            assert "chain" not in r, r
        else:  # 8 chained steps over 8 copies of the smoke run's 128-256 KB of K/V
            assert (r["chain"], r["kv_copies"]) == (8, 8), r
    # The Markdown table of the same JSON: one line per (d, context, batch),
    # a GB/s column per (kind, implementation, page size), no cuDNN ratio.
    table = run("benchmarks/results_table.py", str(path)).splitlines()
    assert table[0] == ("| d | context | batch | decode jax_flash GB/s | decode jax_flash_ref GB/s"
                        " | decode xla GB/s | paged jax_flash 16 GB/s"
                        " | append jax_flash_append_rotary 1 GB/s | jax_flash / cudnn |"), table
    assert [line.split(" | ")[:3] for line in table[2:]] == [["| 64", "256", "1"],
                                                             ["| 64", "256", "2"]], table
    assert all(line.endswith("| - |") for line in table[2:]), table
