"""A full jitted train step of a small Flax NNX GPT: which fraction is the optimizer?

The model: token + learned position embeddings, pre-norm blocks (causal multi-head
attention with a fused qkv projection, a 4x GELU MLP), a final norm and an untied head —
the (d, 3d), (d, d), (d, 4d), (4d, d) matrices of the optimizer benchmark. For each batch
size the forward+backward alone and the train step of every optimizer are timed
interleaved; the optimizer fraction is 1 - t(forward+backward) / t(train step).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention and an MLP."""

  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.norm_attn = nnx.LayerNorm(d, rngs=rngs)
    self.attn_qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.attn_out = nnx.Linear(d, d, rngs=rngs)
    self.norm_mlp = nnx.LayerNorm(d, rngs=rngs)
    self.mlp_in = nnx.Linear(d, 4 * d, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    batch, length, d = x.shape
    head_dim = d // self.heads
    qkv = self.attn_qkv(self.norm_attn(x)).reshape(batch, length, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    mixed = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
    x = x + self.attn_out(mixed.reshape(batch, length, d))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm_mlp(x))))


class GPT(nnx.Module):
  """A small decoder-only language model."""

  def __init__(self, vocab: int, length: int, d: int, layers: int, heads: int,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, d)))
    self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[...][None, : tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def make_model(vocab: int, length: int, d: int, layers: int, heads: int, seed: int = 0):
  """(graphdef, params) of a GPT; params is an nnx.State pytree of arrays."""
  model = GPT(vocab, length, d, layers, heads, nnx.Rngs(seed))
  return nnx.split(model, nnx.Param)


def _loss_fn(graphdef):
  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss


class _Runner:
  """Train step (or forward+backward alone when `tx` is None) with the StepRunner interface."""

  def __init__(self, name, tx, graphdef, params, tokens):
    self.name = name
    self.tokens = tokens
    self.count = 0
    loss = _loss_fn(graphdef)
    self.params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    start = time.perf_counter()
    if tx is None:
      self.state = None
      fn = jax.jit(jax.value_and_grad(loss))
      self.compiled = fn.lower(self.params, tokens).compile()
    else:
      self.state = jax.tree.map(lambda x: jnp.array(x, copy=True), tx.init(self.params))

      def train_step(params, opt_state, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

      fn = jax.jit(train_step, donate_argnums=(0, 1))
      self.compiled = fn.lower(self.params, self.state, tokens).compile()
    self.compile_s = time.perf_counter() - start
    self.loss = float("nan")

  def step(self) -> float:
    start = time.perf_counter()
    if self.state is None:
      value, grads = self.compiled(self.params, self.tokens)
      jax.block_until_ready(grads)
    else:
      self.params, self.state, value = self.compiled(self.params, self.state, self.tokens)
      jax.block_until_ready((self.params, self.state))
    elapsed = time.perf_counter() - start
    self.loss = value
    self.count += 1
    return elapsed

  def all_finite(self) -> bool:
    return bool(jnp.isfinite(self.loss))


def train_step_sweep(batch_sizes: Sequence[int], *, vocab: int = 256, length: int = 128,
                     d: int = 128, layers: int = 4, heads: int = 4,
                     optimizers: Sequence[str] = ("adamw", "soap", "ivon", "evon",
                                                  "evon_whiten"),
                     precondition_frequency: int = 10, rounds: int = 5,
                     budget_s: Optional[float] = None) -> dict:
  """Train-step time and optimizer fraction per optimizer and batch size."""
  graphdef, params = make_model(vocab, length + 1, d, layers, heads)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  records = []
  for batch in batch_sizes:
    tokens = jax.random.randint(jax.random.key(batch), (batch, length + 1), 0, vocab)
    runners = [_Runner("forward_backward", None, graphdef, params, tokens)]
    runners += [_Runner(name, common.make_optimizer(
        name, precondition_frequency=precondition_frequency), graphdef, params, tokens)
                for name in optimizers]
    results = common.time_interleaved(
        runners, rounds=rounds, steps_per_round=precondition_frequency, budget_s=budget_s)
    base = results["forward_backward"]["mean_ms"]
    fractions = {name: max(0.0, 1.0 - base / res["mean_ms"])
                 for name, res in results.items() if name != "forward_backward"}
    records.append({"batch": batch, "tokens_per_step": batch * length, "results": results,
                    "optimizer_fraction": fractions,
                    "ratio_vs_adamw": common.ratios(results, "adamw")
                    if "adamw" in results else {}})
  return {"model": {"vocab": vocab, "length": length, "d": d, "layers": layers,
                    "heads": heads, "num_params": num_params}, "records": records}
