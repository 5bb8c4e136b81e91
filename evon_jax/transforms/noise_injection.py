"""The noise-injecting wrapper: everything that happens per call of a variational optimizer.

`inject_noise(inner, key=..., mc_samples=...)` owns the finiteness skip, replica averaging,
the noise (regenerated from the key that drew it, never stored), drop-in vs explicit mode,
Monte-Carlo accumulation, phasing, and the next sample: it reads the posterior from its inner
state and draws it with one rotation out (`evon_jax.readout.bubble.draw`, which `training_samples` and the
posterior read-outs use as well).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from evon_jax import _validation as check
from evon_jax.readout.bubble import eigen_normals, records as bubble_records
from evon_jax.transforms import _protocol as protocol
from evon_jax.transforms._common import (
    all_finite, as_typed_key, check_tree, leaf_names, replica_mean, sample_seeds,
    standard_normals)


class InjectNoiseState(NamedTuple):
  """State of `inject_noise`.

  Attributes:
    count: calls taken (skipped calls not counted).
    skipped: calls skipped because a gradient was not finite.
    key: PRNG key that drew the noise of the sample the loop holds now.
    noise_scale: 1.0 if that sample carries noise, 0.0 if it is the mean (the first call,
      clean phases, explicit mode's output).
    pending: drop-in Monte Carlo (mc_samples = k > 1): the gradients (a params-shaped tree
      with a leading axis k-1) and keys (k-1,) of the step's earlier samples; else None.
    inner: the inner piece's state.
    parameter_noise: None when the noise is drawn in eigen coordinates (the default);
      a constant True when it is drawn in parameter coordinates (`noise_basis='parameter'`),
      so that `training_samples` draws what the update regenerates.
  """

  count: jax.Array
  skipped: jax.Array
  key: jax.Array
  noise_scale: jax.Array
  pending: Any
  inner: Any
  parameter_noise: Any = None

  def bubble(self):
    """The posterior the optimizer holds (`evon_jax.posterior.bubble` finds it in wrappers)."""
    return self.inner.bubble()

  # Read-only views of the posterior's buffers, as `evon_jax.evon`'s state always offered
  # them (eigen coordinates; bases and factors stored per axis slot, see `kronecker`).
  mean = property(lambda self: self.bubble().mean)
  hessian = property(lambda self: self.bubble().hessian)
  bases = property(lambda self: self.bubble().bases)
  factors = property(lambda self: self.bubble().factors)
  ess = property(lambda self: self.bubble().ess)
  weight_decay = property(lambda self: self.bubble().weight_decay)
  momentum = property(lambda self: _innermost(self).momentum)


def _records(state) -> list:
  """Per leaf the Gaussian a state holds (`EigenPosterior`, None for frozen leaves)."""
  return bubble_records(state.bubble())


def _innermost(state):
  while hasattr(state, "inner"):
    state = state.inner
  return state


@dataclasses.dataclass(frozen=True)
class NoiseSpec(protocol.Spec):
  inner: protocol.Spec
  mc_samples: int = 1
  drop_in: bool = True
  phasing: bool = False
  replicas: Any = None            # the axis name, or None
  replica_noise: str = "shared"
  noise_basis: str = "eigen"

  def eigen(self, record, draws):
    """The call's standard normal draws in eigen coordinates (`eigen_normals` when the
    noise is drawn in parameter coordinates)."""
    if self.noise_basis == "parameter":
      return eigen_normals(record, draws, self.precision)
    return draws

  @property
  def axis_name(self):
    return self.replicas

  @property
  def accumulates(self) -> bool:
    return self.drop_in and self.mc_samples > 1

  @property
  def precision(self):
    return getattr(self.inner, "rotation_precision", "highest")

  # ------------------------------------------------------------------- schedule of calls

  def _calls_per_step(self) -> int:
    return self.mc_samples if self.drop_in else 1

  def noise_on(self, count):
    """Whether the sample evaluated at call `count` carries noise."""
    noisy = count > 0
    if self.phasing:  # odd real steps are clean
      real_step = (count - 1) // self._calls_per_step() + 1
      noisy = noisy & (real_step % 2 == 0)
    return noisy

  def first_sample(self, per_call: int):
    """Replica r of an 'independent' run draws samples r·k … r·k+k-1 of the key (exactly
    those of a one-device explicit run with replicas·k samples); otherwise 0."""
    if self.replicas is not None and self.replica_noise == "independent":
      return jax.lax.axis_index(self.replicas) * per_call
    return 0

  # ------------------------------------------------------------------- init

  def init(self, params, traced, layouts=None):
    inner_traced, key = traced
    inner = self.inner.init(params, inner_traced)
    key = as_typed_key(key)
    pending = None
    if self.accumulates:
      k = self.mc_samples - 1
      records = _records(inner)
      grads = [jnp.zeros((k,) + (jnp.shape(p) if r is not None else ()),
                         jnp.float32 if r is None else r.mean.dtype)
               for p, r in zip(jax.tree.leaves(params), records)]
      pending = (jax.tree.structure(params).unflatten(grads), jax.random.split(key, k))
    return InjectNoiseState(
        count=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32),
        key=key, noise_scale=jnp.zeros([], jnp.float32), pending=pending,
        inner=inner, parameter_noise=self._marker())

  def _marker(self):
    return jnp.asarray(True) if self.noise_basis == "parameter" else None

  # ------------------------------------------------------------------- per call

  def _gradient_stacks(self, grads, params, records):
    """Per leaf the call's gradients as (samples, *shape) in the statistics dtype."""
    names = leaf_names(params)
    stacks = []
    for name, grad, param, record in zip(names, jax.tree.leaves(grads),
                                         jax.tree.leaves(params), records):
      if record is None:
        stacks.append(None)
        continue
      shape, grad = tuple(jnp.shape(param)), jnp.asarray(grad)
      if not self.drop_in:
        stacked = (self.mc_samples,) + shape
        if tuple(grad.shape) != stacked and not (self.mc_samples == 1 and grad.shape == shape):
          raise ValueError(
              f"Leaf {name}: explicit mode (drop_in=False) expects gradients of shape "
              f"{stacked} (one per training sample), got {tuple(grad.shape)}.")
        grad = jnp.reshape(grad, stacked)
      elif tuple(grad.shape) != shape:
        raise ValueError(
            f"Leaf {name}: gradient shape {tuple(grad.shape)} does not match the parameter "
            f"shape {shape} the optimizer was initialised with.")
      else:
        grad = grad[None]
      stacks.append(grad.astype(record.mean.dtype))
    return stacks

  def _message(self, stacks, keys, params, records, noise_scale, gates):
    """The records of a step: gradients, their draws z (scaled by the sample's noise flag)
    and the points they were taken at."""
    if self.drop_in:  # each sample was drawn at its own call, from that call's key
      seeds = [sample_seeds(key, 1, self.first_sample(1))[0] for key in keys]
    else:  # all k samples of one call, from one key
      seeds = sample_seeds(keys[0], self.mc_samples, self.first_sample(self.mc_samples))
    requests = [None if stack is None else (i, jnp.shape(param), stack.dtype)
                for i, (stack, param) in enumerate(zip(stacks, jax.tree.leaves(params)))]
    draws = [standard_normals(s, requests) for s in seeds]
    leaves = []
    for i, (stack, param, record) in enumerate(zip(stacks, jax.tree.leaves(params), records)):
      if stack is None:
        leaves.append(None)
        continue
      dtype = stack.dtype
      normals = self.eigen(record, jnp.stack([per_sample[i] for per_sample in draws]))
      normals = normals * noise_scale.astype(dtype)
      if self.drop_in and stack.shape[0] == 1:  # the loop holds the sample itself
        thetas = jnp.asarray(param).astype(dtype)[None]
      else:
        thetas = protocol.draw(record, normals, 1.0, self.precision)
      leaves.append(protocol.SampledGradients(stack, normals, thetas))
    independent = self.replicas is not None and self.replica_noise == "independent"
    return protocol.Message(leaves, gates, None, self.replicas if independent else None)

  def _gates(self, count, active) -> protocol.Gates:
    noisy = self.noise_on(count)
    return protocol.Gates(active=active, first=count == 0, noisy=noisy,
                          factors_free=~noisy if self.phasing else jnp.asarray(True))

  def _step(self, stacks, keys, state, records, params, traced, active):
    """The inner's step on these samples (records: the posterior they were drawn from)."""
    message = self._message(stacks, keys, params, records, state.noise_scale,
                            self._gates(state.count, active))
    return self.inner.apply(message, state.inner, params, traced)[1]

  def _accumulated_step(self, stacks, state, params, traced, finite):
    """Drop-in Monte Carlo: k calls make a step. The step's earlier gradients wait in
    `pending`; the last call steps on all k (the first call stands alone). A switch skips
    the step's work on the other calls."""
    k = self.mc_samples
    first = state.count == 0
    position = jnp.where(first, k - 1, (state.count - 1) % k)
    complete = finite & (position == k - 1)
    grads, keys = state.pending

    def step(inner):  # the step's last call: the k samples, oldest first
      full = [None if s is None else jnp.concatenate([p, s])
              for s, p in zip(stacks, jax.tree.leaves(grads))]
      return self._step(full, list(keys) + [state.key], state._replace(inner=inner),
                        _records(inner), params, traced, complete)

    def first_step(inner):  # the first call stands alone (exactly, not as k copies)
      return self._step(stacks, [state.key], state._replace(inner=inner), _records(inner),
                        params, traced, complete)

    branch = jnp.where(complete, jnp.where(first, 1, 2), 0)
    inner = jax.lax.switch(branch, [lambda inner: inner, first_step, step], state.inner)
    write = finite & ~complete
    slot = jnp.minimum(position, k - 2)

    def stored(buffer, new):
      kept = jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
      return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(write, new, kept), slot, 0)

    new_grads = jax.tree.structure(grads).unflatten([
        p if s is None else stored(p, s[0])
        for s, p in zip(stacks, jax.tree.leaves(grads))])
    return inner, (new_grads, stored(keys, state.key))

  def _next_sample(self, records, params, key, noise_scale, moved):
    """Updates that move the loop's params to the next sample (drop-in) or to the mean."""
    seeds = sample_seeds(key, 1, self.first_sample(1))[0]
    normals = standard_normals(seeds, [
        None if record is None or not self.drop_in else (i, jnp.shape(param), record.mean.dtype)
        for i, (record, param) in enumerate(zip(records, jax.tree.leaves(params)))])
    updates = []
    for record, param, normal in zip(records, jax.tree.leaves(params), normals):
      param = jnp.asarray(param)
      if record is None:
        updates.append(jnp.zeros_like(param))
        continue
      if self.drop_in:
        target = protocol.draw(record, self.eigen(record, normal),
                               noise_scale.astype(normal.dtype), self.precision)
      else:
        target = protocol.draw(record, None, 0.0, self.precision)
      updates.append((target.astype(param.dtype) - param) * moved.astype(param.dtype))
    return jax.tree.structure(params).unflatten(updates)

  def apply(self, updates, state, params, traced):
    inner_traced, _ = traced
    if params is None:
      raise ValueError(
          "evon_jax optimizers need `params` in update(grads, state, params): drop-in mode "
          "returns (next sample - params), explicit mode returns (new mean - params).")
    reference = state.bubble().mean
    check_tree("gradient", updates, reference)
    check_tree("params", params, reference, compare_shapes=True)
    finite = all_finite(updates, self.replicas)
    if self.replicas is not None and self.replica_noise == "shared":
      updates = replica_mean(updates, self.replicas)
    records = _records(state.inner)
    stacks = self._gradient_stacks(updates, params, records)
    pending = state.pending
    if self.accumulates:
      inner, pending = self._accumulated_step(stacks, state, params, inner_traced, finite)
    else:
      inner = self._step(stacks, [state.key], state, records, params, inner_traced, finite)
    count = state.count + finite.astype(state.count.dtype)
    key = jax.lax.select(finite, jax.random.split(state.key)[0], state.key)
    # The next call's noise flag; in explicit mode the loop holds the mean while
    # `training_samples` draws the noisy samples from the same flag and key.
    noise_scale = jnp.where(finite, self.noise_on(count).astype(jnp.float32),
                             state.noise_scale)
    new_state = InjectNoiseState(
        count=count, skipped=state.skipped + (~finite).astype(state.skipped.dtype), key=key,
        noise_scale=noise_scale, pending=pending, inner=inner,
        parameter_noise=state.parameter_noise)
    out = self._next_sample(_records(inner), params, key, noise_scale,
                            finite.astype(jnp.float32))
    return out, new_state


def inject_noise(inner, *, key=0, mc_samples: int = 1, drop_in: bool = True,
                 phasing: bool = False, axis_name=None, replica_noise: str = "shared",
                 noise_basis: str = "eigen") -> protocol.PieceTransformation:
  r"""Turns a posterior-keeping piece into a variational optimizer that trains at samples.

  Each call: gradients that are not all finite skip the call (every state bit-identical,
  zero updates, `skipped` counted); replicas average (`axis_name`); the draws z of the
  sample(s) the gradients were taken at are regenerated from the key; `inner` steps; and
  the update moves the loop's params to the next sample ``Q (M° + sqrt(V) z') Qᵀ`` (drop-in
  mode) or to the new mean (explicit mode, ``drop_in=False``: the gradients carry a leading
  axis of `mc_samples`, taken at `evon_jax.training_samples(state, mc_samples)`). In drop-in
  mode `mc_samples = k` spreads a step over k calls, each at a fresh sample. With
  `phasing`, odd steps are clean (at the mean, H still).

  Args:
    inner: `eigenbasis_refresh(eigenspace_ivon(...), ...)` (EVON) or `eigenspace_ivon(...)`
      (IVON).
    key: an int seed or a PRNG key for the noise.
    mc_samples: Monte-Carlo samples per step.
    drop_in: drop-in (params are the current sample) or explicit mode.
    phasing: alternate clean and noisy steps.
    axis_name: the mapped axis of replicas (`pmap` / `shard_map`), or None.
    replica_noise: 'shared' (one sample on all replicas) or 'independent' (each replica its
      own samples).
    noise_basis: where the standard normal draws are made. 'eigen' (default, the
      reference's): z in eigen coordinates, sample ``Q (M° + √V ⊙ z) Qᵀ``. 'parameter':
      ξ in parameter coordinates, sample ``M + Q (√V ⊙ Qᵀ ξ Q) Qᵀ = M + Σ^{1/2} ξ`` — the
      same posterior, but the sample is a continuous function of the covariance rather
      than of its eigenbasis: where the basis is ill-determined (near-degenerate or
      near-null factor eigenvalues, early steps, tiny batches) the two runs of a 1e-7
      input change no longer drift apart (benchmarks/results/sensitivity.md). Costs one
      more rotation per sample drawn and per sample the step regenerates.
  """
  spec, traced = protocol.spec_of(inner, "inject_noise")
  if not protocol.holds_posterior(spec):
    raise TypeError(
        "inject_noise wraps a piece that keeps a posterior: eigenspace_ivon(...) (IVON) or "
        f"eigenbasis_refresh(eigenspace_ivon(...), ...) (EVON), got {type(spec).__name__}.")
  check.check_static_int("mc_samples", mc_samples, 1)
  check.check_replicas(axis_name, replica_noise)
  check.check_choice("noise_basis", noise_basis, ("eigen", "parameter"))
  noise_spec = NoiseSpec(spec.without_updates(), mc_samples=int(mc_samples),
                         drop_in=bool(drop_in), phasing=bool(phasing), replicas=axis_name,
                         replica_noise=replica_noise, noise_basis=noise_basis)
  return protocol.transformation(noise_spec, (traced, key))


def training_samples(opt_state, num_samples: int = 1, *, axis_name=None) -> Any:
  """The parameters at which explicit mode expects the next gradients (see `evon`).

  Pass `axis_name` exactly when the optimizer runs with `replica_noise='independent'` (each
  replica draws, and its update regenerates, its own samples); otherwise leave it None.
  """
  from evon_jax.readout.locate import find_state
  state = find_state(opt_state, InjectNoiseState)
  first = 0
  if axis_name is not None:
    first = jax.lax.axis_index(axis_name) * num_samples
  seeds = sample_seeds(state.key, num_samples, first)
  means = state.bubble().mean
  treedef = jax.tree.structure(means)
  records = _records(state)
  requests = [None if record is None else (i, record.mean.shape, record.mean.dtype)
              for i, record in enumerate(records)]
  draws = [standard_normals(s, requests) for s in seeds]
  out = []
  for i, (record, mean) in enumerate(zip(records, treedef.flatten_up_to(means))):
    if record is None:
      out.append(jnp.broadcast_to(mean, (num_samples,) + jnp.shape(mean)))
      continue
    normals = jnp.stack([per_sample[i] for per_sample in draws])
    if state.parameter_noise is not None:  # noise_basis='parameter'
      normals = eigen_normals(record, normals)
    out.append(protocol.draw(record, normals, state.noise_scale.astype(normals.dtype)))
  return treedef.unflatten(out)
