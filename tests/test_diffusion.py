"""Noise schedules, eps/v parametrisations, the training loss, samplers and guidance.

The samplers are checked on a problem with a known answer: data x0 ~ N(MU, S²) in every
dimension, whose exact optimal eps-model is
``eps*(x_t, t) = sqrt(1-ᾱ)·(x_t - sqrt(ᾱ)·MU) / (ᾱ·S² + 1 - ᾱ)``. Its probability-flow ODE
maps the standardised start noise z to ``MU + S·z`` exactly, so deterministic samplers are
also compared sample by sample with that map.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion as D

MU, S = 0.8, 0.6
SHAPE = (256, 32)  # 8192 independent scalar samples
N = SHAPE[0] * SHAPE[1]


@functools.lru_cache(maxsize=None)
def _sched(name: str = "scaled_linear") -> D.Schedule:
    kw = dict(beta_start=1e-4, beta_end=0.02) if name == "linear" else {}
    return D.Schedule.create(name, 1000, **kw)


def _bc(sched, t, x):
    return sched.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))


def _eps_opt(sched):
    def fn(x, t):
        a = _bc(sched, t, x)
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)
    return fn


def _v_opt(sched):
    eps_fn = _eps_opt(sched)

    def fn(x, t):
        a = _bc(sched, t, x)
        eps = eps_fn(x, t)
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
    return fn


def _start(sched, sampler, num_steps, seed=0):
    """x_T from the exact marginal at the sampler's first timestep, and its standard normal z."""
    t0 = int(D.sampling_timesteps(sched, num_steps, sampler)[0])
    a = float(sched.alphas_cumprod[t0])
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), SHAPE))
    return math.sqrt(a) * MU + math.sqrt(a * S**2 + 1 - a) * z, z


@functools.partial(jax.jit, static_argnames=("sampler", "num_steps", "prediction", "eta"))
def _sample_toy(sched, key, x_T, *, sampler, num_steps, eta=0.0, prediction="eps"):
    fn = _eps_opt(sched) if prediction == "eps" else _v_opt(sched)
    return D.sample(fn, sched, SHAPE, key, sampler=sampler, num_steps=num_steps, eta=eta,
                    prediction=prediction, x_T=x_T)


def _check_moments(x, what, bias_tol=0.0):
    """Sample mean and std of ``x`` against MU and S: within 5 Monte-Carlo standard errors,
    plus ``bias_tol`` (relative to S) of allowed discretisation error."""
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - MU) / S < bias_tol + 5.0 / math.sqrt(N), (what, x.mean())
    assert abs(x.std() / S - 1) < bias_tol + 5.0 / math.sqrt(2 * N), (what, x.std())


# ------------------------------------------------------------------------------ schedules


def test_make_betas_endpoints_and_formulas():
    b = D.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert b.dtype == np.float64 and b.shape == (1000,)
    np.testing.assert_allclose([b[0], b[-1]], [0.00085, 0.012], rtol=1e-12)
    # linear in sqrt space: constant differences of sqrt(beta)
    np.testing.assert_allclose(np.diff(np.sqrt(b)), (0.012**0.5 - 0.00085**0.5) / 999, rtol=1e-9)

    lin = D.make_betas("linear", 1000, 1e-4, 0.02)
    np.testing.assert_allclose([lin[0], lin[-1], lin[500]],
                               [1e-4, 0.02, 1e-4 + 500 * (0.02 - 1e-4) / 999])

    cos = D.make_betas("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(cos[0], 1 - f(1) / f(0), rtol=1e-10)
    assert cos[0] == pytest.approx(4.13e-5, rel=0.01)
    assert cos[-1] == 0.999  # clipped
    assert np.all(cos <= 0.999)
    ac = np.cumprod(1 - cos)
    np.testing.assert_allclose(ac[499], f(500) / f(0), rtol=1e-9)  # unclipped region: f(t+1)/f(0)
    with pytest.raises(ValueError, match="scaled_linear"):
        D.make_betas("quadratic")


@pytest.mark.parametrize("name", D.SCHEDULES)
def test_schedule_tables(name):
    sched = _sched(name)
    ac = np.asarray(sched.alphas_cumprod, np.float64)
    assert sched.num_timesteps == 1000 and sched.alphas_cumprod.dtype == jnp.float32
    assert np.all(np.diff(ac) < 0) and np.all(ac > 0) and np.all(ac < 1)
    np.testing.assert_allclose(np.asarray(sched.sqrt_alphas_cumprod) ** 2, ac, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sched.sqrt_one_minus_alphas_cumprod) ** 2, 1 - ac,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod_prev)[1:], ac[:-1])
    # The posterior q(x_{t-1} | x_t, x0) is consistent with the marginals: averaged over x_t,
    # its mean c1·x0 + c2·sqrt(ᾱ_t)·x0 is sqrt(ᾱ_{t-1})·x0 ...
    c1, c2 = np.asarray(sched.posterior_mean_coef1), np.asarray(sched.posterior_mean_coef2)
    prev = np.asarray(sched.alphas_cumprod_prev, np.float64)
    np.testing.assert_allclose(c1 + c2 * np.sqrt(ac), np.sqrt(prev), rtol=1e-5)
    # ... and so is its variance: var(x_{t-1}) = 1 - ᾱ_{t-1}.
    np.testing.assert_allclose(c2**2 * (1 - ac) + np.asarray(sched.posterior_variance), 1 - prev,
                               rtol=1e-4, atol=1e-7)
    # A pytree with static num_timesteps: passes through jit.
    out = jax.jit(lambda s: s.alphas_cumprod[s.num_timesteps - 1])(sched)
    assert float(out) == pytest.approx(ac[-1], rel=1e-6)


def test_q_sample_statistics():
    sched = _sched()
    ts = np.array([0, 100, 500, 999])
    n = 20000
    x0 = jnp.full((4, n), 0.7)
    noise = jax.random.normal(jax.random.PRNGKey(3), (4, n))
    xt = np.asarray(D.q_sample(sched, x0, jnp.asarray(ts), noise), np.float64)
    ac = np.asarray(sched.alphas_cumprod, np.float64)[ts]
    sd = np.sqrt(1 - ac)
    np.testing.assert_array_less(np.abs(xt.mean(1) - np.sqrt(ac) * 0.7), 5 * sd / math.sqrt(n))
    np.testing.assert_array_less(np.abs(xt.var(1) / (1 - ac) - 1), 5 * math.sqrt(2 / n))


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_predict_x0_eps_inverts_target(prediction):
    sched = _sched()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k1, (6, 4, 4, 3))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 250, 500, 998, 999])
    xt = D.q_sample(sched, x0, t, noise)
    target = D.prediction_target(sched, x0, noise, t, prediction)
    if prediction == "v":
        a = np.asarray(sched.sqrt_alphas_cumprod)[np.asarray(t)][:, None, None, None]
        s = np.asarray(sched.sqrt_one_minus_alphas_cumprod)[np.asarray(t)][:, None, None, None]
        np.testing.assert_allclose(target, a * noise - s * x0, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(target, noise)
    x0_hat, eps_hat = D.predict_x0_eps(sched, xt, t, target, prediction)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-4)
    with pytest.raises(ValueError, match="eps"):
        D.prediction_target(sched, x0, noise, t, "x0")


# ------------------------------------------------------------------------------ loss


def test_loss_optimal_model_vs_zero_model():
    sched = _sched()
    x0 = MU + S * jax.random.normal(jax.random.PRNGKey(1), (4096, 8))
    key = jax.random.PRNGKey(2)
    loss_fn = jax.jit(D.diffusion_loss, static_argnames=("model_fn", "prediction", "min_snr_gamma"))
    opt, aux = loss_fn(sched, _eps_opt(sched), x0, key)
    zero, aux0 = loss_fn(sched, lambda x, t: jnp.zeros_like(x), x0, key)
    assert opt.dtype == jnp.float32 and opt.shape == ()
    assert np.isfinite(float(opt)) and float(opt) < 0.8 * float(zero)
    assert float(zero) == pytest.approx(1.0, abs=0.05)  # E[eps²]
    # The optimal model's MSE is the posterior variance of eps: ᾱS²/(ᾱS² + 1 - ᾱ).
    a = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(aux["t"])]
    expected = np.mean(a * S**2 / (a * S**2 + 1 - a))
    assert float(opt) == pytest.approx(expected, rel=0.05)
    assert float(aux["mse"]) == pytest.approx(float(opt), rel=1e-6)  # no weighting
    assert aux["per_example_mse"].shape == (4096,) and aux["t"].shape == (4096,)
    assert 0 <= int(aux["t"].min()) and int(aux["t"].max()) < 1000
    # v-prediction: the analytic v-model also wins.
    opt_v, _ = loss_fn(sched, _v_opt(sched), x0, key, prediction="v")
    zero_v, _ = loss_fn(sched, lambda x, t: jnp.zeros_like(x), x0, key, prediction="v")
    assert float(opt_v) < 0.8 * float(zero_v)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_min_snr_weighting(prediction):
    sched = _sched()
    t = jnp.arange(0, 1000, 7)
    gamma = 5.0
    w = np.asarray(D.min_snr_weight(sched, t, gamma, prediction), np.float64)
    ac = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = ac / (1 - ac)
    ref = np.minimum(snr, gamma) / (snr if prediction == "eps" else snr + 1)
    np.testing.assert_allclose(w, ref, rtol=1e-4)
    if prediction == "eps":
        assert np.all(w[snr < gamma] == pytest.approx(1.0)) and np.all(w <= 1 + 1e-6)
        assert w[0] < 0.01  # t = 0 has SNR ~1e3: strongly down-weighted
    np.testing.assert_array_equal(D.min_snr_weight(sched, t, 0.0, prediction), 1.0)

    # In the loss: weighted mean of the per-example MSE.
    x0 = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 2))
    model = lambda x, t: 0.5 * x  # noqa: E731
    loss, aux = D.diffusion_loss(sched, model, x0, jax.random.PRNGKey(1), prediction=prediction,
                                 min_snr_gamma=gamma)
    w_used = D.min_snr_weight(sched, aux["t"], gamma, prediction)
    assert float(loss) == pytest.approx(float(jnp.mean(w_used * aux["per_example_mse"])), rel=1e-5)
    assert float(loss) != pytest.approx(float(aux["mse"]), rel=1e-3)


def test_loss_jit_grad_bf16_model():
    sched = _sched()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 4))

    @jax.jit
    def loss_and_grad(w, key):
        def f(w):
            model = lambda x, t: (w * x).astype(jnp.bfloat16)  # noqa: E731
            return D.diffusion_loss(sched, model, x0, key, prediction="v", min_snr_gamma=5.0)[0]
        return jax.value_and_grad(f)(w)

    loss, g = loss_and_grad(jnp.float32(0.3), jax.random.PRNGKey(1))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss)) and np.isfinite(float(g))
    assert float(g) != 0.0


def test_drop_labels():
    y = jnp.arange(10000) % 7
    out = D.drop_labels(jax.random.PRNGKey(0), y, 7, 0.1)
    dropped = np.asarray(out == 7)
    assert abs(dropped.mean() - 0.1) < 5 * math.sqrt(0.09 / 10000)
    np.testing.assert_array_equal(np.asarray(out)[~dropped], np.asarray(y)[~dropped])
    np.testing.assert_array_equal(D.drop_labels(jax.random.PRNGKey(0), y, 7, 0.0), y)


# ------------------------------------------------------------------------------ samplers


def test_sampling_timesteps():
    sched = _sched()
    ddim = np.asarray(D.sampling_timesteps(sched, 50, "ddim"))
    np.testing.assert_array_equal(ddim, np.arange(980, -1, -20))
    np.testing.assert_array_equal(D.sampling_timesteps(sched, 1000, "ddpm"), np.arange(999, -1, -1))
    for n in (2, 20, 25, 500, 1000):
        ts = np.asarray(D.sampling_timesteps(sched, n, "dpmpp_2m"))
        assert len(ts) == n and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    # dpmpp_2m: (close to) uniform in log-SNR.
    ac = np.asarray(sched.alphas_cumprod, np.float64)
    lam = 0.5 * np.log(ac / (1 - ac))[np.asarray(D.sampling_timesteps(sched, 20, "dpmpp_2m"))]
    h = np.diff(lam)
    assert np.all(h > 0) and h.max() / h.min() < 1.35  # uniform in t: > 10
    with pytest.raises(ValueError, match="ddim"):
        D.sampling_timesteps(sched, 10, "euler")
    with pytest.raises(ValueError, match="num_steps"):
        D.sampling_timesteps(sched, 1001, "ddim")


def test_ddim_eta0_is_deterministic():
    sched = _sched()
    x_T, _ = _start(sched, "ddim", 10)
    a = _sample_toy(sched, jax.random.PRNGKey(0), x_T, sampler="ddim", num_steps=10)
    b = _sample_toy(sched, jax.random.PRNGKey(0), x_T, sampler="ddim", num_steps=10)
    c = _sample_toy(sched, jax.random.PRNGKey(5), x_T, sampler="ddim", num_steps=10)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)  # with eta = 0 the key only draws x_T
    # With eta > 0 the key matters; without x_T the key draws the start noise.
    d = _sample_toy(sched, jax.random.PRNGKey(0), x_T, sampler="ddim", num_steps=10, eta=0.5)
    e = _sample_toy(sched, jax.random.PRNGKey(5), x_T, sampler="ddim", num_steps=10, eta=0.5)
    assert np.abs(np.asarray(d) - np.asarray(e)).mean() > 1e-2
    f = D.sample(_eps_opt(sched), sched, SHAPE, jax.random.PRNGKey(0), num_steps=10)
    g = D.sample(_eps_opt(sched), sched, SHAPE, jax.random.PRNGKey(1), num_steps=10)
    assert np.abs(np.asarray(f) - np.asarray(g)).mean() > 1e-2


def test_ddim_eta1_full_chain_is_ancestral_ddpm():
    sched = _sched()
    x_T, _ = _start(sched, "ddpm", 1000)
    ddpm = _sample_toy(sched, jax.random.PRNGKey(1), x_T, sampler="ddpm", num_steps=1000)
    ddim = _sample_toy(sched, jax.random.PRNGKey(2), x_T, sampler="ddim", num_steps=1000, eta=1.0)
    _check_moments(ddpm, "ddpm")
    _check_moments(ddim, "ddim eta=1")
    # Independent noise: they differ per sample but agree in distribution.
    assert np.abs(np.asarray(ddpm) - np.asarray(ddim)).mean() > 0.1
    # Same per-step noise: the two formulas are the same Markov chain.
    ddim_same = _sample_toy(sched, jax.random.PRNGKey(1), x_T, sampler="ddim", num_steps=1000,
                            eta=1.0)
    np.testing.assert_allclose(ddim_same, ddpm, atol=5e-3)


def test_per_sample_keys_make_samples_independent_of_their_batch():
    """With one key per sample, sample j of a batch of 6 equals the same key's sample drawn
    alone or in a batch of 3: start noise and per-step noise (ddpm; ddim with eta > 0 draws
    the same way) come from its key only. The per-sample noise is standard normal and
    differs between samples."""
    sched = _sched()
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(7), jnp.arange(6))
    run = jax.jit(lambda k, n: D.sample(_eps_opt(sched), sched, (n, 4, 8), k, sampler="ddpm",
                                        num_steps=20), static_argnums=1)
    six = np.asarray(run(keys, 6))
    np.testing.assert_allclose(np.asarray(run(keys[2:5], 3)), six[2:5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(run(keys[4:5], 1))[0], six[4], rtol=1e-5, atol=1e-6)
    assert np.abs(six[0] - six[1]).mean() > 0.1
    # typed keys give the raw keys' samples
    typed = jax.random.wrap_key_data(keys)
    np.testing.assert_allclose(np.asarray(run(typed, 6)), six, rtol=1e-6, atol=1e-6)
    # the x_T drawn from per-sample keys is N(0, I)
    x_T = np.asarray(jax.jit(lambda k: D.sample(lambda x, t: jnp.zeros_like(x), sched, (4096, 8), k,
                                                 num_steps=1, sampler="ddim", prediction="v"))(
        jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(0), jnp.arange(4096))))
    # v = 0 at t = T-1 gives x0 = a·x_T: undo the scale to recover the start noise
    a = float(np.sqrt(sched.alphas_cumprod[int(D.sampling_timesteps(sched, 1, "ddim")[0])]))
    z = x_T / a
    assert abs(z.mean()) < 5 / math.sqrt(z.size) and abs(z.std() - 1) < 5 / math.sqrt(2 * z.size)
    with pytest.raises(ValueError, match="3 per-sample keys for a batch of 6"):
        D.sample(_eps_opt(sched), sched, (6, 4, 8), keys[:3], num_steps=2)


@pytest.mark.parametrize("sampler,num_steps,max_err,bias_tol", [
    ("dpmpp_2m", 20, 0.05, 0.01),
    ("dpmpp_2m", 25, 0.05, 0.01),
    ("ddim", 50, 0.3, 0.04),  # first order: a few % too little spread at 50 steps
])
def test_deterministic_samplers_reach_the_data_distribution(sampler, num_steps, max_err, bias_tol):
    sched = _sched()
    x_T, z = _start(sched, sampler, num_steps)
    x = np.asarray(_sample_toy(sched, jax.random.PRNGKey(0), x_T, sampler=sampler,
                               num_steps=num_steps))
    # Sample by sample against the exact probability-flow map z -> MU + S z.
    err = np.abs(x - (MU + S * z)).max() / S
    assert err < max_err, err
    _check_moments(x, sampler, bias_tol)
    # The v-parametrised model gives the same samples.
    xv = _sample_toy(sched, jax.random.PRNGKey(0), x_T, sampler=sampler, num_steps=num_steps,
                     prediction="v")
    np.testing.assert_allclose(xv, x, atol=1e-4)


def test_dpmpp_2m_beats_ddim_at_fewer_steps():
    sched = _sched()

    def err(sampler, n):
        x_T, z = _start(sched, sampler, n)
        x = _sample_toy(sched, jax.random.PRNGKey(0), x_T, sampler=sampler, num_steps=n)
        return float(np.abs(np.asarray(x) - (MU + S * z)).max())

    e_dpm, e_ddim = err("dpmpp_2m", 20), err("ddim", 50)
    assert e_dpm < 0.25 * e_ddim, (e_dpm, e_ddim)
    assert err("dpmpp_2m", 10) > e_dpm  # it converges with more steps


def test_sample_jits_with_schedule_as_argument_and_clips():
    sched = _sched("linear")

    @functools.partial(jax.jit, static_argnames=("sampler",))
    def run(sched, key, sampler):
        return D.sample(_eps_opt(sched), sched, (16, 8), key, sampler=sampler, num_steps=8,
                        clip_x0=True)

    for sampler in D.SAMPLERS:
        x = np.asarray(run(sched, jax.random.PRNGKey(0), sampler))
        assert x.shape == (16, 8) and x.dtype == np.float32 and np.all(np.isfinite(x))
        assert np.all(np.abs(x) <= 1.0 + 1e-6)  # the last step returns the clipped x0
    with pytest.raises(ValueError, match="dpmpp_2m"):
        D.sample(_eps_opt(sched), sched, (2, 2), jax.random.PRNGKey(0), sampler="heun")


# ------------------------------------------------------------------------------ guidance


def test_classifier_free_guidance_one_doubled_call():
    calls = []

    def model_cond(x, t, y):
        calls.append(x.shape[0])
        return x * (1.0 + 0.1 * y[:, None]) + 0.001 * t[:, None]

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    t = jnp.array([10, 20, 30], jnp.int32)
    y = jnp.array([0, 1, 2], jnp.int32)
    null = 10
    cond = model_cond(x, t, y)
    uncond = model_cond(x, t, jnp.full_like(y, null))
    calls.clear()
    guided = D.classifier_free_guidance(model_cond, y, null, 3.0)(x, t)
    assert calls == [6]  # one call on the doubled batch
    np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=1e-6, atol=1e-6)
    calls.clear()
    plain = D.classifier_free_guidance(model_cond, y, null, 1.0)(x, t)
    assert calls == [3]
    np.testing.assert_allclose(plain, cond, rtol=1e-6)
    # Inside a sampler under jit.
    fn = D.classifier_free_guidance(model_cond, y, null, 2.0)
    out = jax.jit(lambda k: D.sample(lambda a, b: 0.1 * fn(a, b), _sched(), (3, 5), k,
                                     num_steps=4))(jax.random.PRNGKey(0))
    assert out.shape == (3, 5) and np.all(np.isfinite(np.asarray(out)))


def test_interleave_pairs_order_and_inverse():
    """``a0, b0, a1, b1, ...`` (the order that keeps pairs on one device) and back."""
    from ldm_jax.sharding import interleave_pairs, split_pairs

    a = jnp.arange(6.0).reshape(3, 2)
    b = -a - 100.0
    ab = interleave_pairs(a, b)
    np.testing.assert_array_equal(np.asarray(ab[:, 0]), [0.0, -100.0, 2.0, -102.0, 4.0, -104.0])
    a2, b2 = split_pairs(ab)
    np.testing.assert_array_equal(np.asarray(a2), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(b2), np.asarray(b))
    with pytest.raises(ValueError, match="equal size"):
        interleave_pairs(a, b[:2])
    with pytest.raises(ValueError, match="even batch"):
        split_pairs(a)


def test_guided_call_on_a_sharded_batch_stays_on_each_device():
    """With the batch sharded over 8 devices, the doubled CFG batch keeps each sample and its
    unconditional twin on the sample's device: no all-to-all before the model, no collective
    permute after it; same numbers as one device."""
    from ldm_jax import sharding

    def model_cond(x, t, y):  # per-sample, like the U-Net
        return jnp.tanh(x * (1.0 + 0.1 * y[:, None, None, None]) + 0.001 * t[:, None, None, None])

    sh = sharding.batch_sharding(sharding.make_mesh(dict(data=8, fsdp=1, num_devices=-1)))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 4, 4, 3))
    t = jnp.arange(8, dtype=jnp.int32) * 100
    y = jnp.arange(8, dtype=jnp.int32) % 3
    fn = jax.jit(lambda a, b, c: D.classifier_free_guidance(model_cond, c, 5, 2.5)(a, b), out_shardings=sh)
    args = [jax.device_put(v, sh) for v in (x, t, y)]
    hlo = fn.lower(*args).compile().as_text()
    assert "all-to-all" not in hlo and "collective-permute" not in hlo
    want = model_cond(x, t, jnp.full_like(y, 5)) + 2.5 * (model_cond(x, t, y) - model_cond(x, t, jnp.full_like(y, 5)))
    np.testing.assert_allclose(np.asarray(fn(*args)), np.asarray(want), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ diffusers parity


def _nonlinear_model(xp, x, t, prediction):
    """A fixed, nonlinear stand-in network (``xp`` = numpy or jax.numpy; ``t`` broadcastable)."""
    scale = 0.5 + t / 2000.0
    return xp.tanh(0.8 * x) * scale + 0.1 * xp.cos(3.0 * x) - (0.2 * x if prediction == "v" else 0.0)


@pytest.mark.parametrize("sampler,num_steps,prediction", [
    ("ddim", 50, "eps"), ("ddim", 7, "v"), ("dpmpp_2m", 20, "eps"), ("dpmpp_2m", 8, "v")])
def test_samplers_match_diffusers_schedulers(sampler, num_steps, prediction):
    """DDIM (eta 0) and DPM-Solver++(2M) against diffusers' ``DDIMScheduler`` and
    ``DPMSolverMultistepScheduler`` on the SD schedule, same start noise and model, step by
    step to the final sample: the conventions the module doc claims (leading spacing without
    offset, ``set_alpha_to_one``, ``final_sigmas_type="zero"``, first-order first and last
    steps, midpoint second order) are diffusers'. DPM-Solver++ gets our logSNR timesteps as
    diffusers' custom ``timesteps``."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")

    sched = _sched("scaled_linear")
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    ts = np.asarray(D.sampling_timesteps(sched, num_steps, sampler))
    if sampler == "ddim":
        ref = diffusers.DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                      timestep_spacing="leading")
        ref.set_timesteps(num_steps)
    else:
        ref = diffusers.DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2,
                                                    solver_type="midpoint", lower_order_final=True,
                                                    final_sigmas_type="zero")
        ref.set_timesteps(timesteps=ts.tolist())
    np.testing.assert_array_equal(ref.timesteps.numpy(), ts)

    shape = (2, 4, 4, 3)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(3), shape), np.float32)
    x = torch.from_numpy(x_T.copy())
    for t in ref.timesteps:
        out = _nonlinear_model(np, x.numpy(), float(t), prediction).astype(np.float32)
        x = ref.step(torch.from_numpy(out), t, x).prev_sample
    want = x.numpy()

    fn = lambda x, t: _nonlinear_model(jnp, x, t.astype(jnp.float32)[:, None, None, None], prediction)  # noqa: E731
    got = np.asarray(D.sample(fn, sched, shape, jax.random.PRNGKey(0), sampler=sampler, num_steps=num_steps,
                              prediction=prediction, x_T=jnp.asarray(x_T)))
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert np.abs(want - x_T).max() > 0.1  # the chain moved
