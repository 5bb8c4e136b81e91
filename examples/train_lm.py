"""Character-level language model: AdamW, SOAP, IVON and EVON on the same small GPT.

Run ``python examples/train_lm.py --optimizer evon --steps 1000 --out lm_evon.json`` (needs
flax; tqdm for a progress bar: the ``examples`` extra). No network access: the corpus ships
with Python.

**Corpus** ("python-docs+stdlib", 1.12 M characters on Python 3.11): the 79 help topics of
``pydoc_data.topics`` (the text of ``help('assert')`` etc.: the language reference in plain
English with code snippets, ~465 k chars), in sorted key order, followed by the source files
of ten pure-Python standard-library modules (argparse, dataclasses, difflib, enum, functools,
inspect, pprint, string, textwrap, typing; ~659 k chars), read as UTF-8. The exact text
depends on the Python version; its SHA-256 goes into the JSON. Vocabulary: the sorted set of
characters of the whole corpus (106 symbols on 3.11; no unknowns). Train/val: 1 011 712 /
112 576 characters.

**Split**: every document (topic or module) contributes its first 90 % to the training text
and its last 10 % to the validation text, so both sets have the same mix of prose and code and
no validation character is ever trained on. Training batches are random windows of the
concatenated training text; the validation loss is the mean next-character cross entropy
(nats) over all non-overlapping ``seq_len`` windows of the validation text (every position,
contexts shorter than ``seq_len`` at window starts).

**Model**: a GPT: token + learned position embeddings, ``--layers`` pre-norm blocks (RMSNorm,
causal multi-head self-attention, RMSNorm, GELU MLP with 4x width; no biases), a final RMSNorm
and an untied output head (``--tied`` reuses the embedding). Defaults: d_model 128, 2 layers,
4 heads, seq_len 64, batch 32 (429 k parameters), 1000 steps: a few minutes on 2 CPU cores.

**Optimizers** (a warmup + cosine-decay schedule for every one):

* ``adamw``: ``optax.adamw`` on everything (weight decay on matrices only);
* ``soap``, ``ivon``, ``evon``: the block matrices (attention and MLP kernels) go to
  ``evon_jax.soap`` / ``ivon`` / ``evon``; embeddings, the head and the 1-D RMSNorm scales go
  to AdamW (AdamW's settings, lr ``--aux-lr``) via ``optax.partition``, as in the
  SOAP-Bubbles paper. ``--partition all`` gives every parameter to the named optimizer instead.

IVON and EVON run in drop-in mode: the parameters the loop holds are posterior samples (the
training-loss curve is at samples), the mean is read with ``evon_jax.posterior.mean`` (found
inside the partition state), and AdamW's leaves are point estimates in either case.
``ess`` defaults to the number of training characters (the loss is a mean over tokens).

**Evaluation**: ``val_loss_mean`` at the posterior mean (at the final parameters for
AdamW/SOAP); ``val_loss_bma`` is the posterior predictive, ``-log(1/S Σ_s p(x | W_s))`` with
``S = --bma-samples`` weight samples from ``evon_jax.predictive.sample_predictive`` (the same
samples for every validation window); for AdamW/SOAP it equals ``val_loss_mean``.
The tuned settings and results: ``examples/results/lm_settings.md`` and ``lm_summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import evon_jax
from evon_jax import predictive

CORPUS_NAME = "python-docs+stdlib"
STDLIB_MODULES = ("argparse", "dataclasses", "difflib", "enum", "functools", "inspect",
                  "pprint", "string", "textwrap", "typing")
VAL_FRACTION = 0.1
OPTIMIZERS = ("adamw", "soap", "ivon", "evon")

# Final settings, chosen by the short sweep recorded in examples/results/lm_settings.md
# (same budget for every optimizer).
DEFAULT_LR = {"adamw": 5e-3, "soap": 1e-2, "ivon": 3.0, "evon": 0.05}
DEFAULT_HESS_INIT = {"ivon": 0.1, "evon": 0.1}
# AdamW on the embeddings, head and norms when SOAP/IVON/EVON train the block matrices (the
# sweep ran with it; AdamW alone: 3e-3 and 5e-3 are within 0.02 nats).
AUX_ADAMW_LR = 3e-3
ADAMW_B2 = 0.99
ADAMW_WEIGHT_DECAY = 0.1


# ----------------------------------------------------------------------------- data


class Corpus(NamedTuple):
  """Train/validation token arrays and the vocabulary."""
  train: np.ndarray  # int32 tokens
  val: np.ndarray
  vocab: str
  sha256: str
  num_chars: int


def corpus_documents() -> list[str]:
  """The documents of the corpus, in order: pydoc help topics, then stdlib sources."""
  from pydoc_data.topics import topics

  docs = [topics[name] for name in sorted(topics)]
  for name in STDLIB_MODULES:
    with open(importlib.util.find_spec(name).origin, encoding="utf-8") as f:
      docs.append(f.read())
  return docs


def load_corpus(max_chars: int | None = None) -> Corpus:
  """Tokenised corpus, split per document (first 90 % train, last 10 % validation).

  ``max_chars`` truncates the whole text first (for quick tests); the split stays per document.
  """
  docs = corpus_documents()
  vocab = "".join(sorted(set("".join(docs))))  # of the whole corpus, also when truncated
  if max_chars is not None:
    kept, total = [], 0
    for doc in docs:
      if total >= max_chars:
        break
      kept.append(doc[:max_chars - total])
      total += len(kept[-1])
    docs = kept
  text = "\n\n".join(docs)
  lookup = np.zeros(max(map(ord, vocab)) + 1, np.int32)
  lookup[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.int32)

  def encode(s: str) -> np.ndarray:
    return lookup[np.frombuffer(s.encode("utf-32-le"), np.uint32)]

  train, val = [], []
  for doc in docs:
    cut = int(round(len(doc) * (1.0 - VAL_FRACTION)))
    train.append(doc[:cut] + "\n\n")
    val.append(doc[cut:] + "\n\n")
  return Corpus(encode("".join(train)), encode("".join(val)), vocab,
                hashlib.sha256(text.encode("utf-8")).hexdigest(), len(text))


# ----------------------------------------------------------------------------- model


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with a fused q/k/v projection."""

  def __init__(self, d_model: int, num_heads: int, num_layers: int, *, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    self.num_heads = num_heads
    init = nnx.initializers.normal(0.02)
    self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, kernel_init=init, rngs=rngs)
    # GPT-2's residual scaling: output projections start smaller in deeper models.
    self.proj = nnx.Linear(d_model, d_model, use_bias=False,
                           kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * num_layers)),
                           rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, d_model = x.shape
    head_dim = d_model // self.num_heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    q, k, v = (jnp.reshape(t, (batch, length, self.num_heads, head_dim)) for t in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return self.proj(jnp.reshape(out, (batch, length, d_model)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, d_model: int, num_heads: int, num_layers: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.norm1 = nnx.RMSNorm(d_model, rngs=rngs)
    self.attn = CausalSelfAttention(d_model, num_heads, num_layers, rngs=rngs)
    self.norm2 = nnx.RMSNorm(d_model, rngs=rngs)
    self.fc1 = nnx.Linear(d_model, 4 * d_model, use_bias=False, kernel_init=init, rngs=rngs)
    self.fc2 = nnx.Linear(4 * d_model, d_model, use_bias=False,
                          kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * num_layers)),
                          rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class GPT(nnx.Module):
  """A small decoder-only transformer returning next-token logits (batch, length, vocab)."""

  def __init__(self, vocab_size: int, seq_len: int, d_model: int, num_layers: int,
               num_heads: int, tied: bool, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
    self.blocks = nnx.List([Block(d_model, num_heads, num_layers, rngs=rngs)
                            for _ in range(num_layers)])
    self.norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.tied = tied
    self.head = None if tied else nnx.Linear(
        d_model, vocab_size, use_bias=False, kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos_embed[None, :tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return self.embed.attend(x) if self.tied else self.head(x)


def make_model(args: argparse.Namespace, vocab_size: int):
  """``(apply_fn, params)``: ``apply_fn(params, tokens) -> logits`` (functional NNX)."""
  model = GPT(vocab_size, args.seq_len, args.d_model, args.layers, args.heads, args.tied,
              rngs=nnx.Rngs(args.seed))
  graphdef, params = nnx.split(model, nnx.Param)

  def apply_fn(params, tokens):
    return nnx.merge(graphdef, params)(tokens)

  return apply_fn, params


def _path_name(path) -> str:
  """'blocks/0/attn/kernel' (an nnx Variable's trailing 'value' entry dropped)."""
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  return name[:-len("/value")] if name.endswith("/value") else name


def is_block_matrix(name: str, leaf) -> bool:
  """Attention and MLP kernels: the leaves SOAP/IVON/EVON train under --partition hidden."""
  return name.startswith("blocks/") and leaf.ndim == 2


def param_labels(params, partition: str):
  """'main' (the named optimizer) or 'adamw' per leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: "main" if partition == "all" or is_block_matrix(_path_name(path), leaf)
      else "adamw", params)


# ----------------------------------------------------------------------------- optimizers


def schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
  """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to zero."""
  return optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)),
                                            max(steps, 2), end_value=0.0)


def _matrix_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_adamw(lr: float, steps: int, args: argparse.Namespace):
  return optax.adamw(schedule(lr, steps, args.warmup), b1=0.9, b2=args.adamw_b2,
                     weight_decay=args.adamw_weight_decay, mask=_matrix_mask)


def make_optimizer(args: argparse.Namespace, num_train_tokens: int):
  """The optax transformation and a JSON-able record of its settings.

  The EVON/IVON schedule is evaluated at the real-step index; EVON's first call only
  initialises its factors, so its schedule runs over ``steps - 1`` real steps.
  """
  name = args.optimizer
  lr = args.lr if args.lr is not None else DEFAULT_LR[name]
  aux_lr = args.aux_lr if args.aux_lr is not None else AUX_ADAMW_LR
  settings: dict[str, Any] = {"optimizer": name, "lr": lr, "warmup": args.warmup,
                              "schedule": "linear warmup + cosine decay to 0"}
  adamw_settings = {"b1": 0.9, "b2": args.adamw_b2, "weight_decay": args.adamw_weight_decay,
                    "weight_decay_on": "matrices (ndim >= 2)"}
  if name == "adamw":
    settings.update(adamw_settings)
    settings["partition"] = "none: AdamW on every parameter"
    return make_adamw(lr, args.steps, args), settings

  if name == "soap":
    main = evon_jax.soap(schedule(lr, args.steps, args.warmup), b1=0.95, b2=0.95,
                         weight_decay=args.soap_weight_decay,
                         precondition_frequency=args.precondition_frequency)
    settings.update(b1=0.95, b2=0.95, weight_decay=args.soap_weight_decay,
                    precondition_frequency=args.precondition_frequency)
  else:
    ess = args.ess if args.ess is not None else float(num_train_tokens)
    hess_init = args.hess_init if args.hess_init is not None else DEFAULT_HESS_INIT[name]
    real_steps = args.steps - 1 if name == "evon" else args.steps
    common = dict(ess=ess, hess_init=hess_init, weight_decay=args.weight_decay, key=args.seed)
    if name == "ivon":
      main = evon_jax.ivon(schedule(lr, real_steps, args.warmup), b2=args.b2, **common)
      settings.update(b1=0.9, rescale_lr=True)
    else:
      main = evon_jax.evon(schedule(lr, real_steps, args.warmup), b2=args.b2,
                           shampoo_b=args.shampoo_b, hess_clip_ratio=args.hess_clip_ratio,
                           precondition_frequency=args.precondition_frequency, whiten=True,
                           **common)
      settings.update(b1=0.95, shampoo_b=args.shampoo_b, hess_clip_ratio=args.hess_clip_ratio,
                      precondition_frequency=args.precondition_frequency, whiten=True)
    settings.update(common, b2=args.b2, mc_samples=1, drop_in=True,
                    ess_convention="number of training characters (tokens)"
                    if args.ess is None else "given")
  if args.partition == "all":
    settings["partition"] = f"{name} on every parameter"
    return main, settings
  settings["partition"] = (f"{name} on the attention/MLP kernels; AdamW (lr {aux_lr}) on "
                           "embeddings, head and RMSNorm scales")
  settings["aux_adamw"] = {"lr": aux_lr, **adamw_settings}
  tx = optax.partition({"main": main, "adamw": make_adamw(aux_lr, args.steps, args)},
                       lambda p: param_labels(p, args.partition))
  return tx, settings


# ----------------------------------------------------------------------------- posterior


def is_bayesian(name: str) -> bool:
  return name in ("ivon", "evon")


def posterior_mean(name: str, params, opt_state):
  """Parameters at the posterior mean (the final parameters for AdamW/SOAP)."""
  if not is_bayesian(name):
    return params
  return evon_jax.posterior.mean(opt_state, params)  # AdamW's leaves taken from params


# ----------------------------------------------------------------------------- training


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping (inputs + next) windows of seq_len + 1 tokens, (n, seq_len + 1)."""
  n = (len(tokens) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return tokens[idx]


def _progress(steps: int, enabled: bool, name: str):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=steps, desc=name, mininterval=1.0, file=sys.stderr)


def train(args: argparse.Namespace, tx, apply_fn: Callable, params, corpus: Corpus,
          progress: bool = True):
  """A jitted optax loop on random windows of the training text.

  Returns the final params (posterior samples for IVON/EVON), the optimizer state, the
  minibatch losses and the training time.
  """
  train_tokens = jnp.asarray(corpus.train)
  offsets = jnp.arange(args.seq_len + 1)

  def loss_fn(params, batch):
    logits = apply_fn(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, key):
    starts = jax.random.randint(key, (args.batch_size, 1), 0,
                                train_tokens.shape[0] - args.seq_len - 1)
    batch = train_tokens[starts + offsets[None, :]]
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  keys = jax.random.split(jax.random.key(args.seed + 1), args.steps)
  bar = _progress(args.steps, progress, args.optimizer)
  report_every = max(1, args.steps // 10)
  losses = []
  start = time.perf_counter()
  for t in range(args.steps):
    params, opt_state, loss = step(params, opt_state, keys[t])
    losses.append(loss)
    if bar is not None:
      bar.update(1)
      if (t + 1) % 10 == 0:
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    elif progress and ((t + 1) % report_every == 0 or t + 1 == args.steps):
      print(f"  [{args.optimizer}] step {t + 1:5d}/{args.steps}  minibatch loss "
            f"{float(loss):.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
  losses = [float(x) for x in jax.device_get(losses)]
  seconds = time.perf_counter() - start
  if bar is not None:
    bar.close()
  return params, opt_state, losses, seconds


@functools.partial(jax.jit, static_argnums=0)
def _total_nll(apply_fn: Callable, params, windows, weight):
  logits = apply_fn(params, windows[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
  return jnp.sum(nll * weight[:, None])


def evaluate(apply_fn: Callable, params, windows: np.ndarray, batch: int) -> float:
  """Mean next-token cross entropy (nats) over all positions of the windows."""
  return _batched_mean(lambda w, weight: _total_nll(apply_fn, params, w, weight), windows,
                       batch)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _total_bma_nll(apply_fn: Callable, num_samples: int, params, opt_state, key, windows,
                   weight):
  probs = predictive.sample_predictive(key, apply_fn, opt_state, windows[:, :-1],
                                       num_samples, params=params)
  picked = jnp.take_along_axis(probs, windows[None, :, 1:, None], axis=-1)[..., 0]
  bma = jnp.maximum(jnp.mean(picked, axis=0), jnp.finfo(probs.dtype).tiny)
  return -jnp.sum(jnp.log(bma) * weight[:, None])


def evaluate_bma(apply_fn: Callable, params, opt_state, windows: np.ndarray, batch: int,
                 key: jax.Array, num_samples: int) -> float:
  """``-mean log(1/S Σ_s p(x_t | x_<t, W_s))``: the posterior predictive's cross entropy.

  The weights are drawn by `evon_jax.predictive.sample_predictive` (posterior samples of the
  EVON/IVON leaves; AdamW's leaves stay at their values); the same key gives the same S
  samples for every batch of windows.
  """
  return _batched_mean(
      lambda w, weight: _total_bma_nll(apply_fn, num_samples, params, opt_state, key, w,
                                       weight), windows, batch)


def _batched_mean(total_fn, windows: np.ndarray, batch: int) -> float:
  """Sums ``total_fn(windows, weights)`` over equal-size batches (one compilation; the
  ragged tail is padded with zero-weight copies) and divides by the number of tokens."""
  n = len(windows)
  pad = (-n) % batch
  padded = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)])
  weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  sums = [total_fn(jnp.asarray(padded[i:i + batch]), jnp.asarray(weights[i:i + batch]))
          for i in range(0, len(padded), batch)]
  return float(np.sum(np.asarray(jax.device_get(sums), np.float64))) / (
      n * (windows.shape[1] - 1))


def _relative_width(opt_state) -> float:
  """RMS of the marginal posterior std over RMS of the posterior mean (the EVON/IVON leaves)."""
  leaves = [(m, sd) for m, sd in zip(
      jax.tree.leaves(evon_jax.posterior.mean(opt_state)),
      jax.tree.leaves(evon_jax.posterior.marginal_stddev(opt_state)))]
  mean_sq = sum(float(jnp.sum(jnp.square(m))) for m, _ in leaves)
  std_sq = sum(float(jnp.sum(jnp.square(sd))) for _, sd in leaves)
  return math.sqrt(std_sq / mean_sq)


def run(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
  """Trains one optimizer and evaluates it; returns the JSON record."""
  start = time.perf_counter()
  corpus = load_corpus(args.max_chars)
  apply_fn, init_params = make_model(args, len(corpus.vocab))
  tx, settings = make_optimizer(args, len(corpus.train))
  labels = param_labels(init_params, args.partition)
  main_count = sum(int(np.prod(p.shape)) for p, label in zip(
      jax.tree.leaves(init_params), jax.tree.leaves(labels))
      if label == "main" and args.optimizer != "adamw")
  total_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(init_params))
  val_windows = _windows(corpus.val, args.seq_len)
  if args.val_windows is not None:
    val_windows = val_windows[:args.val_windows]
  if progress:
    print(f"{CORPUS_NAME}: {len(corpus.train)} train / {len(corpus.val)} val characters, "
          f"vocab {len(corpus.vocab)}; model {total_count} params"
          + (f" ({main_count} trained by {args.optimizer}, the rest by AdamW)"
             if args.optimizer != "adamw" and main_count < total_count else "") + "; "
          f"{args.steps} steps of {args.batch_size}x{args.seq_len}", flush=True)

  initial_val = evaluate(apply_fn, init_params, val_windows, args.eval_batch)
  params, opt_state, losses, train_seconds = train(args, tx, apply_fn, init_params, corpus,
                                                   progress)
  mean_params = posterior_mean(args.optimizer, params, opt_state)
  val_mean = evaluate(apply_fn, mean_params, val_windows, args.eval_batch)
  if is_bayesian(args.optimizer) and args.bma_samples > 0:
    val_bma = evaluate_bma(apply_fn, params, opt_state, val_windows, args.eval_batch,
                           jax.random.key(args.seed + 2), args.bma_samples)
    val_sample = evaluate(apply_fn, params, val_windows, args.eval_batch)
    posterior_width = _relative_width(opt_state)
  else:
    val_bma = val_mean
    val_sample = None
    posterior_width = None
  result = {
      "optimizer": args.optimizer,
      "seed": args.seed,
      "steps": args.steps,
      "seconds": time.perf_counter() - start,
      "train_seconds": train_seconds,
      "val_loss_mean": val_mean,
      "val_loss_bma": val_bma,
      "val_loss_last_sample": val_sample,
      "initial_val_loss": initial_val,
      "posterior_relative_stddev": posterior_width,
      "bma_samples": args.bma_samples if is_bayesian(args.optimizer) else 0,
      "train_loss": losses,
      "train_loss_note": ("minibatch loss at the posterior sample the loop holds"
                          if is_bayesian(args.optimizer) else "minibatch loss"),
      "settings": settings,
      "corpus": {"name": CORPUS_NAME, "chars": corpus.num_chars,
                 "train_tokens": int(len(corpus.train)), "val_tokens": int(len(corpus.val)),
                 "val_tokens_evaluated": int(val_windows.shape[0] * args.seq_len),
                 "vocab_size": len(corpus.vocab), "sha256": corpus.sha256,
                 "split": "per document: first 90% train, last 10% validation",
                 "python": sys.version.split()[0]},
      "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                "seq_len": args.seq_len, "tied_head": args.tied, "params": total_count,
                "params_main_optimizer": main_count},
      "batch_size": args.batch_size,
      "jax": jax.__version__,
      "device": jax.devices()[0].device_kind,
  }
  if progress:
    print(f"[{args.optimizer}] val loss: initial {initial_val:.4f}, mean {val_mean:.4f}, "
          f"BMA {val_bma:.4f}; train {train_seconds:.1f} s, total {result['seconds']:.1f} s",
          flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python examples/train_lm.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--optimizer", choices=OPTIMIZERS, default="evon")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="write the JSON record here")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--tied", action="store_true", help="tie the head to the embedding")
  parser.add_argument("--lr", type=float, default=None,
                      help=f"peak learning rate (default per optimizer: {DEFAULT_LR})")
  parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
  parser.add_argument("--partition", choices=("hidden", "all"), default="hidden",
                      help="'hidden': SOAP/IVON/EVON on the block matrices, AdamW on the rest")
  parser.add_argument("--aux-lr", type=float, default=None,
                      help=f"lr of AdamW on the non-block parameters (default {AUX_ADAMW_LR})")
  parser.add_argument("--adamw-b2", type=float, default=ADAMW_B2)
  parser.add_argument("--adamw-weight-decay", type=float, default=ADAMW_WEIGHT_DECAY)
  parser.add_argument("--soap-weight-decay", type=float, default=ADAMW_WEIGHT_DECAY)
  parser.add_argument("--ess", type=float, default=None,
                      help="IVON/EVON effective sample size (default: training characters)")
  parser.add_argument("--hess-init", type=float, default=None,
                      help=f"IVON/EVON initial Hessian (default: {DEFAULT_HESS_INIT})")
  parser.add_argument("--weight-decay", type=float, default=1e-6,
                      help="IVON/EVON prior precision per example δ")
  parser.add_argument("--b2", type=float, default=0.9999, help="IVON/EVON Hessian EMA decay")
  parser.add_argument("--shampoo-b", type=float, default=0.995, help="EVON factor EMA decay")
  parser.add_argument("--hess-clip-ratio", type=float, default=None)
  parser.add_argument("--precondition-frequency", type=int, default=10)
  parser.add_argument("--bma-samples", type=int, default=8)
  parser.add_argument("--eval-batch", type=int, default=64, help="validation windows per batch")
  parser.add_argument("--val-windows", type=int, default=None,
                      help="evaluate only the first N validation windows (default: all)")
  parser.add_argument("--max-chars", type=int, default=None,
                      help="truncate the corpus (quick tests)")
  parser.add_argument("--quiet", action="store_true", help="no progress output")
  return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = build_parser().parse_args(argv)
  if args.steps < 2:
    build_parser().error("--steps must be at least 2 (EVON's first call only initialises).")
  # On CPU the basis refresh (QR/eigh) runs LAPACK from scipy's OpenBLAS, whose spinning
  # threads compete with XLA's pool: one BLAS thread (see evon_jax/demo.py).
  limit = contextlib.nullcontext()
  try:
    import scipy.linalg  # noqa: F401  (loads the OpenBLAS so the limit reaches it)
    from threadpoolctl import threadpool_limits
    limit = threadpool_limits(limits=1, user_api="blas")
  except ImportError:
    pass
  with limit:
    return run(args, progress=not args.quiet)


if __name__ == "__main__":
  main()
