"""Train a small byte-level GPT built from `jax_flash.flax.MultiHeadAttention`.

The model: byte embeddings (vocabulary 256, so any text works), pre-norm
blocks (RMSNorm -> causal self-attention with rotary -> residual, RMSNorm ->
GELU MLP -> residual), a final RMSNorm and an untied output projection.
Parameters and the residual stream are float32; matmuls and attention run in
bfloat16 (the kernels' dtype). Trained with optax AdamW (warmup + cosine decay, global-norm clipping)
on `examples/data/coriolanus.txt`: the opening of Shakespeare's Coriolanus
(public domain; the first 48 KB of the tiny-shakespeare text), 90% for
training and the last 10% for validation.

`--attention` picks what computes the attention, in the same model with the
same parameters (a checkpoint of one loads into the others):

  jax_flash  `jax_flash.flax.MultiHeadAttention` itself: our FlashAttention-2
             kernels on an NVIDIA GPU, the plain-JAX reference elsewhere.
  cudnn      the same layer with `jax.nn.dot_product_attention(
             implementation="cudnn")`; needs an NVIDIA GPU.
  xla        the same with `implementation="xla"` (runs anywhere).

Usage (from the repository root):

  python examples/train_gpt.py --tiny             # CPU demo, about a minute
  python examples/train_gpt.py                    # default config, one GPU
  python examples/train_gpt.py --attention cudnn  # same model on cuDNN
  python examples/train_gpt.py --tiny --save      # + params.npz for generate.py

It prints the path jax_flash runs on, the parameter count, then every
`--log-every` steps the step, the training loss, the learning rate and the
throughput (tokens/s over the interval, compile excluded), the validation loss
every `--eval-every` steps, and at the end `loss: first A -> last B`. Into
`--out-dir` (default: <tmp>/jax_flash_gpt) it writes `loss.png` (training and
validation loss) and, with `--save`, `params.npz` (the float32 parameters,
flattened by path, and the model config as JSON under `__config__`), which
`examples/generate.py --params` loads.

Measured on a 2-core CPU (no GPU, jax 0.10.2, reference attention), `--tiny`
(0.43 M parameters: 2 layers, d_model 128, 4 heads / 2 KV heads; 16 x 128
tokens per step, 300 steps): 52-76 s wall for the whole command (the slower
runs with other jobs sharing the cores; the first step, mostly compiling,
4-10 s), loss first 5.578 (step 1, about ln 256) -> last 1.773 (mean of steps
276-300), validation 1.908.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jax_flash
from jax_flash.flax import MultiHeadAttention, apply_rope

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "coriolanus.txt")
ATTENTIONS = ("jax_flash", "cudnn", "xla")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The model's shape; saved with the parameters."""

    vocab_size: int = 256  # bytes
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 6
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    dropout: float = 0.0  # on the residual branches (not attention: see Block)


class DotProductAttention(MultiHeadAttention):
    """`MultiHeadAttention` with the same parameters whose training forward
    runs `jax.nn.dot_product_attention(implementation=...)` ("cudnn" or "xla")
    instead of the FlashAttention-2 kernels.

    The layer has no hook for another attention function, so the forward is
    restated here: the fused qkv projection (q heads, then k heads, then v
    heads), rotary on q and k at positions 0..seqlen-1 (the layer's own
    `apply_rope`), causal attention, the output projection. Decoding
    (decode=True) is the parent's, through the KV cache.
    """

    def __init__(self, *args, implementation: str, **kwargs):
        super().__init__(*args, **kwargs)
        if implementation not in ("cudnn", "xla"):
            raise ValueError(f"implementation must be 'cudnn' or 'xla', got {implementation!r}")
        self.implementation = implementation

    def __call__(self, x, *, decode: bool = False, deterministic: bool | None = None,
                 lengths=None):
        if decode:
            return super().__call__(x, decode=True, lengths=lengths)
        batch, seqlen, _ = x.shape
        H, K = self.num_heads, self.num_kv_heads
        y = self.qkv(x)  # (batch, seqlen, H + 2K, head_dim)
        pos = jnp.broadcast_to(jnp.arange(seqlen, dtype=jnp.int32), (batch, seqlen))
        qk = apply_rope(y[:, :, :H + K], pos, self.rope_theta)
        o = jax.nn.dot_product_attention(
            qk[:, :, :H], qk[:, :, H:], y[:, :, H + K:], scale=self.softmax_scale,
            is_causal=True, implementation=self.implementation)
        return self.out(o)


class Block(nnx.Module):
    """Pre-norm transformer block. Dropout (if any) is on the residual
    branches only: `jax.nn.dot_product_attention` has no attention dropout, so
    leaving it out keeps the three --attention choices the same model."""

    def __init__(self, cfg: GPTConfig, attention: str, *, rngs: nnx.Rngs):
        d, std = cfg.d_model, 0.02
        # GPT-2's scaled init of the projections that write into the residual.
        out_std = std / math.sqrt(2 * cfg.num_layers)
        attn_args = dict(num_kv_heads=cfg.num_kv_heads, causal=True, rope_theta=cfg.rope_theta,
                         use_bias=False, dtype=jnp.bfloat16,
                         kernel_init=nnx.initializers.normal(std), rngs=rngs)
        if attention == "jax_flash":
            self.attn = MultiHeadAttention(cfg.num_heads, d, **attn_args)
        else:
            self.attn = DotProductAttention(cfg.num_heads, d, implementation=attention,
                                            **attn_args)
        self.attn.out.kernel[...] = self.attn.out.kernel[...] * (out_std / std)
        self.norm1 = nnx.RMSNorm(d, dtype=jnp.bfloat16, rngs=rngs)
        self.norm2 = nnx.RMSNorm(d, dtype=jnp.bfloat16, rngs=rngs)
        hidden = cfg.mlp_ratio * d
        self.mlp_in = nnx.Linear(d, hidden, use_bias=False, dtype=jnp.bfloat16,
                                 kernel_init=nnx.initializers.normal(std), rngs=rngs)
        self.mlp_out = nnx.Linear(hidden, d, use_bias=False, dtype=jnp.bfloat16,
                                  kernel_init=nnx.initializers.normal(out_std), rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x, *, decode: bool = False, deterministic: bool = False, lengths=None):
        h = self.attn(self.norm1(x), decode=decode, deterministic=True, lengths=lengths)
        x = x + self.dropout(h, deterministic=deterministic)
        h = self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))
        return x + self.dropout(h, deterministic=deterministic)


class GPT(nnx.Module):
    """Decoder-only byte-level language model.

    Call: tokens int (batch, seqlen) -> float32 logits (batch, seqlen,
    vocab_size). With decode=True the tokens are appended to each layer's KV
    cache (`init_cache` first) and attend to everything cached before them;
    `lengths` (batch,) then gives the real rows of right-padded prompts
    (`MultiHeadAttention`'s varlen prefill).
    """

    def __init__(self, cfg: GPTConfig, attention: str = "jax_flash", *, rngs: nnx.Rngs):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([Block(cfg, attention, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, dtype=jnp.bfloat16, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=jnp.bfloat16,
                               kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def init_cache(self, batch: int, max_len: int, page_size: int | None = None):
        """Empty KV caches in every layer (`MultiHeadAttention.init_cache`)."""
        for block in self.blocks:
            block.attn.init_cache(batch, max_len, page_size)

    def __call__(self, tokens, *, decode: bool = False, deterministic: bool = False,
                 lengths=None):
        x = self.embed(tokens)  # the residual stream stays float32; the blocks compute in bf16
        for block in self.blocks:
            x = block(x, decode=decode, deterministic=deterministic, lengths=lengths)
        return self.head(self.norm(x)).astype(jnp.float32)


def count_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------
# Parameters on disk: one .npz, keys = parameter paths
# ----------------------------------------------------------------------------

def _flat_params(model):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
    return [jax.tree_util.keystr(path) for path, _ in leaves], [x for _, x in leaves], treedef


def save_params(model, path: str) -> None:
    names, values, _ = _flat_params(model)
    arrays = {name: np.asarray(v) for name, v in zip(names, values)}
    arrays["__config__"] = np.array(json.dumps(dataclasses.asdict(model.config)))
    np.savez(path, **arrays)


def load_model(path: str, attention: str = "jax_flash"):
    """Builds the saved model (config from the file) and loads its parameters."""
    with np.load(path) as f:
        cfg = GPTConfig(**json.loads(str(f["__config__"])))
        model = GPT(cfg, attention, rngs=nnx.Rngs(0))
        names, values, treedef = _flat_params(model)
        missing = [n for n in names if n not in f.files]
        if missing:
            raise ValueError(f"{path}: parameters missing for this model: {missing[:5]}")
        for name, v in zip(names, values):
            if f[name].shape != v.shape:
                raise ValueError(f"{path}: {name} has shape {f[name].shape}, the model "
                                 f"expects {v.shape}")
        loaded = [jnp.asarray(f[name], v.dtype) for name, v in zip(names, values)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, loaded))
    return model


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def load_bytes(path: str, val_fraction: float = 0.1):
    data = np.frombuffer(open(path, "rb").read(), np.uint8)
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def batch_at(data, starts, seq_len):
    """Inputs and next-byte targets (batch, seq_len) int32 from start offsets."""
    idx = starts[:, None] + np.arange(seq_len + 1)
    chunk = data[idx].astype(np.int32)
    return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def loss_fn(model, x, y, deterministic):
    logits = model(x, deterministic=deterministic)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps(model, optimizer):
    """Jitted train and eval steps on the split (model, optimizer) state.

    Functional nnx: split once, merge inside jit, return the new state; the
    state is donated, so the update happens in place.
    """
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y, False)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    def eval_step(state, x, y):
        model, _ = nnx.merge(graphdef, state)
        return loss_fn(model, x, y, True)

    return graphdef, state, jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def plot_losses(path, train, val, title) -> bool:
    """Writes the loss curves to path (PNG); False if matplotlib is missing.
    train: every step's loss; val: (step, loss) pairs."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, len(train) + 1)
    ax.plot(steps, train, label="train (each step)", lw=0.6, alpha=0.4)
    k = max(1, len(train) // 50)  # moving average over ~2% of the run
    smooth = np.convolve(train, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, label=f"train ({k}-step mean)", lw=1.5)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


TINY = dict(d_model=128, layers=2, heads=4, kv_heads=2, seq_len=128, batch=16, steps=300,
            lr=3e-3, warmup=20, eval_every=100, log_every=25, dropout=0.0)
DEFAULT = dict(d_model=384, layers=6, heads=6, kv_heads=6, seq_len=256, batch=64, steps=2000,
               lr=1e-3, warmup=100, eval_every=250, log_every=50, dropout=0.2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small CPU config (about a minute)")
    p.add_argument("--attention", default="jax_flash", choices=ATTENTIONS)
    p.add_argument("--data", default=DATA, help="any text file (bytes are the tokens)")
    for name in ("d_model", "layers", "heads", "kv_heads", "seq_len", "batch", "steps",
                 "warmup", "eval_every", "log_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(tempfile.gettempdir(), "jax_flash_gpt"))
    p.add_argument("--save", action="store_true", help="write params.npz for generate.py")
    a = p.parse_args(argv)
    for name, default in (TINY if a.tiny else DEFAULT).items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    return a


def check_attention(attention: str) -> None:
    """Fails early, with the reason, where the chosen attention cannot run."""
    if attention == "cudnn" and jax.default_backend() != "gpu":
        sys.exit(f"--attention cudnn: cuDNN attention needs an NVIDIA GPU, but JAX runs on "
                 f"'{jax.default_backend()}' here; use --attention xla or jax_flash")
    info = jax_flash.info()
    if attention == "jax_flash":
        where = info["path"] + ("" if info["path"] == "cuda kernels" else f" ({info['why']})")
        print(f"jax_flash path: {where}")


def main(argv=None):
    a = parse_args(argv)
    check_attention(a.attention)
    train, val = load_bytes(a.data)
    if min(len(train), len(val)) <= a.seq_len + 1:
        sys.exit(f"--data {a.data}: too short for --seq-len {a.seq_len} "
                 f"({len(train)} training and {len(val)} validation bytes)")
    cfg = GPTConfig(d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                    num_kv_heads=a.kv_heads, dropout=a.dropout)
    model = GPT(cfg, a.attention, rngs=nnx.Rngs(params=a.seed, dropout=a.seed + 1))
    warmup = min(a.warmup, a.steps // 2)  # short runs (tests) still decay
    schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, warmup, a.steps, a.lr / 10)
    # Weight decay on the matrices only, not on the norms' scales.
    decay = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=a.weight_decay,
                                 mask=decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state, train_step, eval_step = make_steps(model, optimizer)
    n_params = count_params(model)

    rng = np.random.default_rng(a.seed)
    tokens_per_step = a.batch * a.seq_len
    # A fixed validation set: 8 batches at evenly spaced offsets.
    val_starts = np.linspace(0, len(val) - a.seq_len - 2, 8 * a.batch).astype(np.int64)
    val_batches = [batch_at(val, s, a.seq_len) for s in np.split(val_starts, 8)]
    print(f"model: {n_params / 1e6:.2f} M parameters, {cfg}")
    print(f"data: {a.data}: {len(train)} training / {len(val)} validation bytes; "
          f"{a.batch} x {a.seq_len} = {tokens_per_step} tokens per step, {a.steps} steps, "
          f"attention {a.attention}, backend {jax.default_backend()}")

    def evaluate(state):
        return float(np.mean([eval_step(state, x, y) for x, y in val_batches]))

    losses, val_curve = [], []  # losses: one device scalar per step, read when logging
    t_start = time.perf_counter()
    t_mark, logged = t_start, 0
    for step in range(1, a.steps + 1):
        starts = rng.integers(0, len(train) - a.seq_len - 1, a.batch)
        x, y = batch_at(train, starts, a.seq_len)
        try:
            loss, state = train_step(state, x, y)
        except Exception as e:  # noqa: BLE001 - name the attention that failed
            if step == 1:
                sys.exit(f"--attention {a.attention}: the first step failed: "
                         f"{type(e).__name__}: {e}")
            raise
        losses.append(loss)
        if step == 1 or step % a.log_every == 0 or step == a.steps:
            window = [float(v) for v in losses[logged:]]  # waits for the step
            now = time.perf_counter()
            if step == 1:
                rate = f"compile + first step {now - t_start:.1f} s"
            else:
                rate = f"{len(window) * tokens_per_step / (now - t_mark):,.0f} tokens/s"
            print(f"step {step:5d}  loss {np.mean(window):.4f}  "
                  f"lr {float(schedule(step - 1)):.2e}  {rate}", flush=True)
            if step % a.eval_every == 0 or step == a.steps:
                val_curve.append((step, evaluate(state)))
                print(f"step {step:5d}  validation loss {val_curve[-1][1]:.4f}", flush=True)
            t_mark, logged = time.perf_counter(), step
    wall = time.perf_counter() - t_start

    losses = [float(v) for v in losses]
    last = losses[-a.log_every:]
    print(f"loss: first {losses[0]:.4f} (step 1) -> last {np.mean(last):.4f} (mean of steps "
          f"{a.steps - len(last) + 1}-{a.steps}), validation {val_curve[-1][1]:.4f}; "
          f"{a.steps} steps in {wall:.1f} s wall")
    model, _ = nnx.merge(graphdef, state)  # the trained model (the old arrays were donated)
    os.makedirs(a.out_dir, exist_ok=True)
    png = os.path.join(a.out_dir, "loss.png")
    title = f"byte-level GPT, {n_params / 1e6:.2f} M params, attention={a.attention}"
    if plot_losses(png, losses, val_curve, title):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: no loss plot")
    if a.save:
        path = os.path.join(a.out_dir, "params.npz")
        save_params(model, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
