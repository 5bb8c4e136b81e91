"""Independent NumPy (float64) re-derivations of IVON, EVON and SOAP, used as test oracles.

Written from the mathematics (docs/algorithm.md) only. Every step takes the gradient and the noise as inputs, so a
test can feed these references exactly the numbers the JAX optimizer saw and compare the means.

Conventions shared by the three references:
  * One object per parameter leaf. A leaf with two or more dims is viewed as a matrix
    (all but the last dim merged into rows); a 1-D leaf is a column (d, 1); a scalar is (1, 1).
  * A side gets an eigenbasis when 1 < size <= max_precond_dim (for a 1-D leaf only its rows,
    and only with precondition_1d); otherwise that side is the identity.
  * The first call only initialises the Kronecker factors, (1 - shampoo_b) g g^T and
    (1 - shampoo_b) g^T g, and the bases, by a full eigh with descending eigenvalues.
    Real steps t = 1, 2, ... follow; the eigenbasis is refreshed after the factor update of
    every step with t % precondition_frequency == 0, by one power iteration and a QR.
  * EVON noise is passed in *parameter space* (sample - mean) and rotated into this reference's
    own basis. Flipping the sign of a basis column then flips the matching rows/columns of the
    eigen-coordinate noise, gradient and momentum together, leaves H and every parameter-space
    quantity unchanged; so the references agree with any implementation whatever sign
    convention its eigh / QR uses.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def newton_schulz(update: np.ndarray, eps: float = 1e-7) -> np.ndarray:
  """Quintic Newton-Schulz orthogonalisation of a matrix (as in Muon / EVON's whitening)."""
  a, b, c = NEWTON_SCHULZ_COEFFS
  x = update / (np.linalg.norm(update) + eps)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  for _ in range(NEWTON_SCHULZ_STEPS):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if transposed else x


def whiten_update(update: np.ndarray, is_matrix: bool, eps: float = 1e-7) -> np.ndarray:
  """Newton-Schulz for matrix leaves, L2 normalisation for vectors and scalars."""
  if is_matrix:
    return newton_schulz(update, eps)
  return update / (np.linalg.norm(update) + eps)


# The dtype the library computes in: its float noise sets the null tolerance (the float64
# worker sets float64).
COMPUTE_DTYPE = np.float32


def null_tolerance(size: int, dtype=None) -> float:
  """Eigenvalues (or ‖F q‖) below this fraction of the largest count as null: 100 √n eps."""
  return 100.0 * np.sqrt(size) * np.finfo(dtype or COMPUTE_DTYPE).eps


def canonical_signs(basis: np.ndarray) -> np.ndarray:
  """Each column flipped so that its largest-magnitude entry is positive."""
  rows = np.argmax(np.abs(basis), axis=0)
  return basis * np.where(basis[rows, np.arange(basis.shape[1])] < 0, -1.0, 1.0)


def eigh_descending(factor: np.ndarray, reference=None, dtype=None) -> np.ndarray:
  """Eigenvectors of a symmetric matrix, columns in descending eigenvalue order.

  With a reference basis R: canonical signs, and the (numerically) null eigenspace, of
  projector P, gets the basis of LAPACK's QR with column pivoting of P R (geqp3: the
  reference columns nearest the span first, near-ties to the earlier one), signed by the
  pivot columns, in pivot order.
  `dtype` sets the tolerance (that of the arrays the library computes in).
  """
  values, vectors = np.linalg.eigh(factor)
  values, vectors = values[::-1], canonical_signs(vectors[:, ::-1])
  if reference is None:
    return vectors
  size = factor.shape[0]
  null = values <= null_tolerance(size, dtype) * values[0]
  if not null.any():
    return vectors
  v = vectors[:, null]
  # Columns scaled by 1 + 1e-3 (1 - j/n): near-ties go to the earlier reference column.
  preference = 1.0 + 1e-3 * (1.0 - np.arange(size) / size)
  q, r, _ = scipy.linalg.qr((v @ v.T) @ reference * preference, pivoting=True)
  q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
  vectors[:, null] = q[:, :int(null.sum())]
  return vectors


# `power_qr_refresh`'s shift, as a fraction of the largest column of F Q.
POWER_SHIFT = 1e-3


def power_qr_refresh(factor: np.ndarray, basis: np.ndarray, dtype=None) -> np.ndarray:
  """One power iteration on F + μI (μ = POWER_SHIFT × the largest column of F Q) followed
  by QR (no sorting of the columns); each column signed to overlap its predecessor
  non-negatively."""
  product = factor @ basis
  largest = np.linalg.norm(product, axis=0).max()
  mu = POWER_SHIFT * largest if largest > 0 else 1.0
  q, _ = np.linalg.qr(product + mu * basis)
  overlap = np.sum(q * basis, axis=0)
  return q * np.where(overlap < 0, -1.0, 1.0)


def hessian_baseline(momentum, b1, t, kind):
  """The Price estimate's control variate at step t: the bias-corrected momentum of steps
  1 .. t-1 ('momentum'; 0 at t = 1) or 0 (None, the reference's estimate)."""
  if kind is None or t == 1:
    return np.zeros_like(momentum)
  return momentum / (1 - b1 ** (t - 1))


def ivon_hessian_update(hess, hess_hat, b2, weight_decay):
  """IVON's positivity-preserving EMA of the Hessian estimate (docs/algorithm.md, step 3)."""
  return (b2 * hess + (1 - b2) * hess_hat
          + 0.5 * (1 - b2) ** 2 * (hess - hess_hat) ** 2 / (hess + weight_decay))


class DensePrior:
  """A Gaussian prior N(m₀, P₀⁻¹) on one leaf, dense: P₀ acts on the row-major vec of the
  leaf (any view of it), m₀ has the leaf's shape. Per example (÷ ess) it adds the gradient
  P₀ (θ − m₀)/ess and, in an orthonormal basis K (columns: basis vectors of the vec), the
  per-coordinate precision diag(Kᵀ P₀ K)/ess."""

  def __init__(self, mean, precision, ess):
    self.mean = np.asarray(mean, np.float64)
    self.precision = np.asarray(precision, np.float64)
    self.ess = ess

  def gradient(self, theta):
    theta = np.asarray(theta, np.float64)
    flat = self.precision @ (theta.reshape(-1) - self.mean.reshape(-1)) / self.ess
    return flat.reshape(theta.shape)

  def diagonal(self, basis, shape):
    return (np.einsum('ij,ik,kj->j', basis, self.precision, basis) / self.ess).reshape(shape)


class IvonReference:
  """Diagonal IVON (mc_samples=1) on one leaf; the step counter is per object."""

  def __init__(self, mean, *, learning_rate, ess, hess_init, b1, b2, weight_decay,
               clip_radius=np.inf, rescale_lr=True, hessian_baseline='momentum',
               prior=None):
    self.baseline = hessian_baseline
    self.prior = prior  # a DensePrior, or None
    self.mean = np.array(mean, dtype=np.float64)
    self.momentum = np.zeros_like(self.mean)
    self.hess = np.full_like(self.mean, hess_init)
    self.t = 0
    self.ess, self.b1, self.b2, self.wd = ess, b1, b2, weight_decay
    self.clip_radius = clip_radius
    self.lr = learning_rate * (hess_init + weight_decay) if rescale_lr else learning_rate

  def step(self, grad, noise):
    """One real step from the gradient at mean + noise."""
    grad = np.asarray(grad, np.float64)
    noise = np.asarray(noise, np.float64)
    self.t += 1
    delta, prior_grad = self.wd, self.wd * self.mean
    if self.prior is not None:  # identity basis: diag(P₀)/ess per entry
      delta = delta + self.prior.diagonal(np.eye(self.mean.size), self.mean.shape)
      prior_grad = prior_grad + self.prior.gradient(self.mean)
    baseline = hessian_baseline(self.momentum, self.b1, self.t, self.baseline)
    hess_hat = noise * (grad - baseline) * self.ess * (self.hess + delta)
    self.momentum = self.b1 * self.momentum + (1 - self.b1) * grad
    self.hess = ivon_hessian_update(self.hess, hess_hat, self.b2, delta)
    update = (self.momentum / (1 - self.b1 ** self.t) + prior_grad) / (self.hess + delta)
    update = np.clip(update, -self.clip_radius, self.clip_radius)
    self.mean = self.mean - self.lr * update


class _Eigenbases:
  """Kronecker factors and their eigenbases for one leaf's matrix view (shared by EVON/SOAP)."""

  def __init__(self, shape, *, shampoo_b, max_precond_dim, precondition_1d):
    self.shape = tuple(shape)
    if len(self.shape) >= 2:
      rows, cols = int(np.prod(self.shape[:-1])), self.shape[-1]
      self.left = 1 < rows <= max_precond_dim
      self.right = 1 < cols <= max_precond_dim
      self.is_matrix = True
    else:
      rows, cols = (self.shape[0] if self.shape else 1), 1
      self.left = precondition_1d and 1 < rows <= max_precond_dim
      self.right = False
      self.is_matrix = False
    self.rows, self.cols = rows, cols
    self.matrix_shape = (rows, cols)
    self.shampoo_b = shampoo_b
    self.q_left, self.q_right = np.eye(rows), np.eye(cols)
    self.f_left, self.f_right = np.zeros((rows, rows)), np.zeros((cols, cols))

  def as_matrix(self, x):
    return np.asarray(x, np.float64).reshape(self.rows, self.cols)

  def from_matrix(self, x):
    return x.reshape(self.shape)

  def rotate_in(self, x):
    return self.q_left.T @ x @ self.q_right

  def rotate_out(self, x):
    return self.q_left @ x @ self.q_right.T

  def dense_basis(self):
    """Q_L ⊗ Q_R: maps the row-major vec of eigen coordinates to that of the matrix."""
    return np.kron(self.q_left, self.q_right)

  def init_from(self, g):
    """First call: factors (1 - b) g g^T, g^T g and their eigenbases."""
    b = self.shampoo_b
    if self.left:
      self.f_left = (1 - b) * g @ g.T
      self.q_left = eigh_descending(self.f_left, self.q_left)
    if self.right:
      self.f_right = (1 - b) * g.T @ g
      self.q_right = eigh_descending(self.f_right, self.q_right)

  def update_factors(self, g):
    b = self.shampoo_b
    if self.left:
      self.f_left = b * self.f_left + (1 - b) * g @ g.T
    if self.right:
      self.f_right = b * self.f_right + (1 - b) * g.T @ g

  def refresh(self, eigen_momentum, method='power_qr'):
    """Basis refresh ('power_qr' or a full 'eigh'); returns the momentum in the new basis."""
    new_basis = power_qr_refresh if method == 'power_qr' else eigh_descending
    momentum_param = self.rotate_out(eigen_momentum)
    if self.left:
      self.q_left = new_basis(self.f_left, self.q_left)
    if self.right:
      self.q_right = new_basis(self.f_right, self.q_right)
    return self.rotate_in(momentum_param)


class _AxisEigenbases:
  """One Kronecker factor and eigenbasis per dim of a leaf (the per-axis layout), written with
  NumPy mode products: X ×_k M = moveaxis(tensordot(M, X, (1, k)), 0, k). Same interface as
  `_Eigenbases`; the "matrix" of the interface is the leaf itself."""

  def __init__(self, shape, *, shampoo_b, max_precond_dim, precondition_1d):
    self.shape = tuple(shape)
    self.is_matrix = len(self.shape) >= 2
    self.matrix_shape = ((int(np.prod(self.shape[:-1])), self.shape[-1]) if self.is_matrix
                         else (int(np.prod(self.shape)), 1))
    self.rotated = [(self.is_matrix or precondition_1d) and 1 < n <= max_precond_dim
                    for n in self.shape]
    self.shampoo_b = shampoo_b
    self.q = [np.eye(n) for n in self.shape]
    self.f = [np.zeros((n, n)) for n in self.shape]

  def as_matrix(self, x):
    return np.asarray(x, np.float64).reshape(self.shape)

  def from_matrix(self, x):
    return x.reshape(self.shape)

  @staticmethod
  def _mode(x, m, k):
    return np.moveaxis(np.tensordot(m, x, axes=([1], [k])), 0, k)

  def rotate_in(self, x):
    for k, q in enumerate(self.q):
      x = self._mode(x, q.T, k)
    return x

  def rotate_out(self, x):
    for k, q in enumerate(self.q):
      x = self._mode(x, q, k)
    return x

  def dense_basis(self):
    out = np.ones((1, 1))
    for q in self.q:
      out = np.kron(out, q)
    return out

  @staticmethod
  def _gram(g, k):
    unfolded = np.moveaxis(g, k, 0).reshape(g.shape[k], -1)
    return unfolded @ unfolded.T

  def init_from(self, g):
    b = self.shampoo_b
    for k, rotated in enumerate(self.rotated):
      if rotated:
        self.f[k] = (1 - b) * self._gram(g, k)
        self.q[k] = eigh_descending(self.f[k], self.q[k])

  def update_factors(self, g):
    b = self.shampoo_b
    for k, rotated in enumerate(self.rotated):
      if rotated:
        self.f[k] = b * self.f[k] + (1 - b) * self._gram(g, k)

  def refresh(self, eigen_momentum, method='power_qr'):
    momentum_param = self.rotate_out(eigen_momentum)
    for k, rotated in enumerate(self.rotated):
      if rotated:
        self.q[k] = (power_qr_refresh(self.f[k], self.q[k]) if method == 'power_qr'
                     else eigh_descending(self.f[k], self.q[k]))
    return self.rotate_in(momentum_param)


_BASES = {'matrix': _Eigenbases, 'axes': _AxisEigenbases}


class EvonReference:
  """EVON reference semantics (no phasing) on one leaf.

  `step` takes one gradient and noise (mc_samples=1) or lists of them (one per Monte-Carlo
  sample): g and g° are sample means, ĥ = mean_s(E°_s ⊙ G°_s) ess (H + δ), and the factors
  use the outer product of the mean gradient g — with `factor_gradient='regularized'` (the
  default, as in `evon`) of the mean regularised gradient g + δ θ at the sampled points
  (at the mean on the first call).
  """

  def __init__(self, mean, *, learning_rate, ess, hess_init, b1, b2, shampoo_b=None,
               eps=1e-10, weight_decay=1e-4, precondition_frequency=10,
               max_precond_dim=10000, precondition_1d=False, hess_clip_ratio=None,
               whiten=False, refresh_method='power_qr', view='matrix',
               factor_gradient='regularized', hessian_baseline='momentum', prior=None):
    mean = np.asarray(mean, np.float64)
    self.baseline = hessian_baseline
    self.prior = prior  # a DensePrior, or None
    self.prior_in_factors = prior is not None and factor_gradient == 'regularized'
    self.factor_regularization = weight_decay if factor_gradient == 'regularized' else 0.0
    self.bases = _BASES[view](
        mean.shape, shampoo_b=b2 if shampoo_b is None else shampoo_b,
        max_precond_dim=max_precond_dim, precondition_1d=precondition_1d)
    self.mean_matrix = self.bases.as_matrix(mean)
    self.hess = np.full_like(self.mean_matrix, hess_init)
    self.momentum = np.zeros_like(self.mean_matrix)  # eigen coordinates
    self.t = 0
    self.initialised = False
    self.lr, self.ess, self.b1, self.b2 = learning_rate, ess, b1, b2
    self.eps, self.wd, self.every = eps, weight_decay, precondition_frequency
    self.hess_clip_ratio, self.whiten = hess_clip_ratio, whiten
    self.refresh_method = refresh_method

  @property
  def mean(self):
    return self.bases.from_matrix(self.mean_matrix)

  def momentum_parameter_space(self):
    return self.bases.from_matrix(self.bases.rotate_out(self.momentum))

  def _prior_gradient(self, theta_matrix):
    """P₀ (θ − m₀)/ess in the matrix view (0 without a prior)."""
    if self.prior is None:
      return np.zeros_like(theta_matrix)
    return self.bases.as_matrix(self.prior.gradient(self.bases.from_matrix(theta_matrix)))

  def _factor_gradient(self, g, theta):
    """The factors' gradient at the point θ: g + δ θ (+ P₀ (θ − m₀)/ess with a prior)."""
    out = g + self.factor_regularization * theta
    return out + self._prior_gradient(theta) if self.prior_in_factors else out

  def first_call(self, grad):
    """Call 0: gradient at the mean initialises the factors and bases; no mean update."""
    self.bases.init_from(self._factor_gradient(self.bases.as_matrix(grad), self.mean_matrix))
    self.initialised = True

  def delta(self):
    """δ per eigen coordinate: the weight decay, plus diag(Kᵀ P₀ K)/ess with a prior."""
    if self.prior is None:
      return self.wd
    return self.wd + self.prior.diagonal(self.bases.dense_basis(), self.mean_matrix.shape)

  def step(self, grad, noise):
    """One real step from gradients at mean + noise (noise in parameter space).

    `grad` and `noise` are arrays (one sample) or equally long lists (several samples).
    """
    assert self.initialised
    bases = self.bases
    grads = grad if isinstance(grad, (list, tuple)) else [grad]
    noises = noise if isinstance(noise, (list, tuple)) else [noise]
    grads_eig = [bases.rotate_in(bases.as_matrix(x)) for x in grads]
    noises_eig = [bases.rotate_in(bases.as_matrix(x)) for x in noises]
    g = np.mean([bases.as_matrix(x) for x in grads], axis=0)
    g_eig = np.mean(grads_eig, axis=0)
    mean_noise = np.mean([bases.as_matrix(x) for x in noises], axis=0)
    factor_grad = self._factor_gradient(g, self.mean_matrix + mean_noise)
    delta = self.delta()
    prior_grad = self.wd * self.mean_matrix + self._prior_gradient(self.mean_matrix)
    self.t += 1
    baseline = hessian_baseline(self.momentum, self.b1, self.t, self.baseline)
    hess_hat = np.mean([e * (x - baseline) for e, x in zip(noises_eig, grads_eig)], axis=0) * (
        self.ess * (self.hess + delta))
    self.clipped = 0  # number of entries of ĥ the clip changed this step
    if self.hess_clip_ratio is not None:
      bound = self.hess_clip_ratio * (self.hess + self.eps)
      self.clipped = int(np.sum(np.abs(hess_hat) > bound))
      hess_hat = np.clip(hess_hat, -bound, bound)
    self.momentum = self.b1 * self.momentum + (1 - self.b1) * g_eig
    self.hess = ivon_hessian_update(self.hess, hess_hat, self.b2, delta)
    update_eig = (self.momentum / (1 - self.b1 ** self.t)
                  + bases.rotate_in(prior_grad)) / (self.hess + delta + self.eps)
    update = bases.rotate_out(update_eig)
    if self.whiten:
      shape = update.shape  # whitening acts on the matrix view (rows merged)
      update = whiten_update(update.reshape(bases.matrix_shape), bases.is_matrix).reshape(shape)
    self.mean_matrix = self.mean_matrix - self.lr * update
    bases.update_factors(factor_grad)
    if self.t % self.every == 0:
      self.momentum = bases.refresh(self.momentum, self.refresh_method)


class SoapReference:
  """Deterministic SOAP (Adam in the eigenbasis) plus decoupled weight decay, one leaf.

  soap(lr, weight_decay): params <- params - lr * (D + weight_decay * params), D = 0 on the
  first call.
  """

  def __init__(self, params, *, learning_rate, b1, b2, shampoo_b=None, eps=1e-8,
               weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000,
               precondition_1d=False, view='matrix'):
    params = np.asarray(params, np.float64)
    self.bases = _BASES[view](
        params.shape, shampoo_b=b2 if shampoo_b is None else shampoo_b,
        max_precond_dim=max_precond_dim, precondition_1d=precondition_1d)
    self.params_matrix = self.bases.as_matrix(params)
    self.mu = np.zeros_like(self.params_matrix)  # eigen coordinates
    self.nu = np.zeros_like(self.params_matrix)
    self.t = 0
    self.initialised = False
    self.lr, self.b1, self.b2, self.eps = learning_rate, b1, b2, eps
    self.wd, self.every = weight_decay, precondition_frequency

  @property
  def params(self):
    return self.bases.from_matrix(self.params_matrix)

  def direction(self, grad):
    """SOAP's preconditioned direction D for this call; updates the statistics."""
    bases = self.bases
    g = bases.as_matrix(grad)
    if not self.initialised:
      bases.init_from(g)
      self.initialised = True
      return np.zeros_like(g)
    self.t += 1
    g_eig = bases.rotate_in(g)
    self.mu = self.b1 * self.mu + (1 - self.b1) * g_eig
    self.nu = self.b2 * self.nu + (1 - self.b2) * g_eig ** 2
    scale = np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
    direction = bases.rotate_out(scale * self.mu / (np.sqrt(self.nu) + self.eps))
    bases.update_factors(g)
    if self.t % self.every == 0:
      self.mu = bases.refresh(self.mu)
    return direction

  def step(self, grad):
    direction = self.direction(grad)
    self.params_matrix = self.params_matrix - self.lr * (
        direction + self.wd * self.params_matrix)
