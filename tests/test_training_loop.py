"""The step loop both trainers share (``trainers.common.run_training_loop``), driven by
stand-ins for the jitted step, the metric writer and the checkpointer: which step logs,
evaluates, writes images and saves, what the logged metrics average over, how a resume, a
preemption and an error end the loop. (The trainers' own tests run it for real.)"""

from __future__ import annotations

import os
import types

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clu import metrics as clu_metrics

from ldm_jax import checkpointing
from ldm_jax.trainers.common import (FlatState, clip_by_global_norm, finite_and_norm, flat_step, global_norm,
                                     run_training_loop)

Metrics = clu_metrics.Collection.create(loss=clu_metrics.Average.from_output("loss"))


class State(flax.struct.PyTreeNode):
    step: jax.Array
    nan_skips: jax.Array


class Sink:
    """Writer and checkpointer stand-in: records calls."""

    def __init__(self):
        self.scalars: dict[int, dict] = {}
        self.flushed = self.closed = False

    def write_scalars(self, step, scalars):
        self.scalars[step] = dict(scalars)

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


def _config(**kw):
    c = dict(num_train_steps=7, log_every_steps=2, eval_every_steps=3, image_every_steps=4,
             checkpoint_every_steps=5, global_batch_size=4)
    c.update(kw)
    return types.SimpleNamespace(**c)


def _run(config, start_step=0, fail_at=None, sinks=None):
    """Run the loop; batch i (counting from the first call) is the scalar i, the "loss".
    ``sinks``: a list that receives the writer and the checkpointer stand-ins."""
    writer, ckpt = Sink(), Sink()
    if sinks is not None:
        sinks += [writer, ckpt]
    calls = {"eval": [], "images": [], "save": [], "batches": 0}

    def next_batch():
        calls["batches"] += 1
        return jnp.float32(calls["batches"] - 1)

    def train_step(state, batch, acc):
        if fail_at is not None and int(state.step) + 1 == fail_at:
            raise RuntimeError("step failed")
        new = State(step=state.step + 1, nan_skips=state.nan_skips + (batch == 1))
        return new, acc.merge(Metrics.single_from_model_output(loss=batch))

    def run_eval(state, step):
        calls["eval"].append((step, int(state.step)))
        return {"eval/x": float(step)}

    state = State(step=jnp.int32(start_step), nan_skips=jnp.int32(0))
    result = run_training_loop(
        config, state=state, start_step=start_step, train_step=flat_step(train_step), next_batch=next_batch,
        empty_metrics=Metrics.empty, metrics_sharding=None, writer=writer, ckpt=ckpt, is_main=True,
        progress_keys=("loss",), run_eval=run_eval,
        save=lambda s, step: calls["save"].append((step, int(s.step))),
        write_images=lambda s, step: calls["images"].append(step),
        extra_scalars=lambda: {"extra": 1.5})
    return result, calls, writer, ckpt


def test_schedule_and_metric_windows():
    result, calls, writer, ckpt = _run(_config())
    assert result["start_step"] == 0 and result["final_step"] == 7
    hist = result["history"]
    # every 2 steps and the last; each entry averages the batches since the previous one
    assert sorted(hist) == [2, 4, 6, 7]
    assert [hist[s]["loss"] for s in (2, 4, 6, 7)] == pytest.approx([0.5, 2.5, 4.5, 6.0])
    assert hist[2]["nan_skips_total"] == 1.0 and hist[7]["nan_skips_total"] == 1.0  # from the state
    assert all(h["extra"] == 1.5 and np.isfinite(h["images_per_sec"]) for h in hist.values())
    assert writer.scalars[4] == {f"train/{k}": v for k, v in hist[4].items()}
    # callbacks get the state after the step they are called for
    assert calls["eval"] == [(3, 3), (6, 6), (7, 7)]
    assert calls["images"] == [4, 7]
    assert calls["save"] == [(5, 5), (7, 7)]
    assert result["eval"] == {"eval/x": 7.0}
    assert calls["batches"] == 7
    assert writer.flushed and writer.closed and ckpt.closed


def test_resume_starts_after_the_restored_step():
    result, calls, _, _ = _run(_config(), start_step=5)
    assert result["start_step"] == 5 and result["final_step"] == 7 and calls["batches"] == 2
    assert sorted(result["history"]) == [6, 7]
    assert result["history"][6]["loss"] == pytest.approx(0.0)  # the first batch after the resume
    assert calls["save"] == [(7, 7)] and calls["eval"] == [(6, 6), (7, 7)]


def test_nothing_to_do_when_already_finished():
    result, calls, writer, ckpt = _run(_config(), start_step=7)
    assert result["final_step"] == 7 and result["history"] == {} and calls["batches"] == 0
    assert calls["save"] == [] and writer.closed and ckpt.closed


def test_preemption_saves_and_stops(monkeypatch):
    restored = []

    class Flag:
        reason = "SIGTERM"

        def should_stop(self, step, every):
            return step == 3

        def restore_handler(self):
            restored.append(True)

    monkeypatch.setattr(checkpointing, "PreemptionFlag", Flag)
    result, calls, writer, ckpt = _run(_config())
    assert result["final_step"] == 3 and calls["batches"] == 3
    assert calls["save"] == [(3, 3)]  # off the checkpoint schedule, because of the signal
    assert sorted(result["history"]) == [2]
    assert restored == [True] and writer.closed and ckpt.closed


def test_error_closes_writer_and_checkpointer(monkeypatch):
    restored = []

    class Flag(checkpointing.PreemptionFlag):
        def restore_handler(self):
            restored.append(True)
            super().restore_handler()

    monkeypatch.setattr(checkpointing, "PreemptionFlag", Flag)
    sinks = []
    with pytest.raises(RuntimeError, match="step failed"):
        _run(_config(), fail_at=4, sinks=sinks)
    writer, ckpt = sinks
    assert sorted(writer.scalars) == [2]  # what was logged before the error stays written
    assert writer.closed and ckpt.closed and not writer.flushed and restored == [True]


def test_flat_state_steps_pass_only_arrays():
    """``FlatState`` round-trips an NNX train state; a jitted ``flat_step`` takes and returns
    it with the state's shardings, donates its buffers and compiles once; equal structures
    share one interned key (the shardings' and the state's), different ones do not."""
    from flax import nnx

    from ldm_jax import sharding

    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(8.0).reshape(8, 1) * jnp.ones((8, 4)))
            self.b = nnx.Param(jnp.zeros((4,)))
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

    mesh = sharding.make_mesh(dict(data=-1, fsdp=1))
    state = {"model": nnx.state(Tiny()), "step": jnp.int32(0)}
    shardings = jax.tree.map(lambda x: sharding.replicated(mesh), state)
    state = jax.device_put(state, shardings)
    flat = FlatState.of(state)
    assert flat.structure is FlatState.of(shardings).structure
    assert FlatState.of({"other": 1}).structure is not flat.structure
    assert all(isinstance(x, jax.Array) for x in flat.leaves) and len(flat.leaves) == 4
    back = flat.tree()
    assert jax.tree.structure(back) == jax.tree.structure(state)
    np.testing.assert_array_equal(back["model"]["w"][...], state["model"]["w"][...])

    traces = []

    def step(st, x):
        traces.append(1)
        new = jax.tree.map(lambda a: a + x.astype(a.dtype), st)
        return new, jnp.sum(new["model"]["w"][...])

    flat_sh = FlatState.of(shardings)
    fn = jax.jit(flat_step(step), in_shardings=(flat_sh, None), out_shardings=(flat_sh, None),
                 donate_argnums=0)
    first = flat.leaves[0]
    flat, total = fn(flat, jnp.float32(1.0))
    flat, total = fn(flat, jnp.float32(1.0))
    assert len(traces) == 1  # the second call found the compiled program
    assert first.is_deleted()  # donated
    out = flat.tree()
    assert int(out["step"]) == 2 and int(out["model"]["count"][...]) == 2
    np.testing.assert_array_equal(out["model"]["w"][...], np.arange(8.0).reshape(8, 1) * np.ones((8, 4)) + 2)
    assert float(total) == float(np.sum(np.arange(8.0).reshape(8, 1) * np.ones((8, 4)) + 2))
    assert all(x.sharding == sharding.replicated(mesh) for x in flat.leaves)


def _norm64(tree) -> float:
    """The reference l2 norm, in float64 NumPy."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def _grad_tree():
    """A model's gradients in miniature: many small arrays (biases, norm scales), a few large
    ones, float32 and bfloat16."""
    rng = np.random.default_rng(0)  # (numpy: eager jax.random would compile per shape)

    def normal(shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    tree = {f"bias{i}": normal((32 + i,)) for i in range(40)}
    tree["scale"] = normal((64,), jnp.bfloat16)
    tree["conv"] = normal((64, 3, 3, 128))  # 73,728 = 72 * 1024 elements
    tree["conv2"] = normal((128, 3, 3, 64), jnp.bfloat16)
    tree["dense"] = normal((300, 300))  # 90,000: not a multiple of 1024
    return tree


def test_global_norm_in_few_reductions():
    """``global_norm`` is optax's norm in fewer reductions (GPU kernels in a training step):
    the 41 arrays under ``SMALL_ARRAY_ELEMENTS`` reduced together, each large array whose
    size is a multiple of ``NORM_PARTIALS`` reduced to that many partial sums, the partial
    sums added and reduced once; optax: one reduction per array (two kernels for a large
    one on a GPU)."""
    from ldm_jax.trainers import common

    assert common.SMALL_ARRAY_ELEMENTS == 2**16 and common.NORM_PARTIALS == 1024
    tree = _grad_tree()
    want = _norm64(tree)
    compiled = jax.jit(global_norm).lower(tree).compile()
    got = compiled(tree)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    hlo = compiled.as_text()
    # small arrays: 1; conv, conv2: 1 each to 1024 partial sums, then 1; dense: 1.
    assert hlo.count(" reduce(") == 5, hlo.count(" reduce(")
    assert float(global_norm({})) == 0.0
    np.testing.assert_allclose(float(global_norm({"b": jnp.full((3,), 2.0)})), np.sqrt(12.0), rtol=1e-7)
    # The trainers' non-finite guard reads finiteness off this norm: a NaN or inf anywhere,
    # small array or large, makes it non-finite.
    guard = jax.jit(finite_and_norm)  # one program for every call below
    for name, bad in (("bias3", np.nan), ("dense", np.inf), ("scale", -np.inf), ("conv2", np.nan)):
        value = np.array(tree[name])
        value.flat[0] = bad
        ok, norm = guard(jnp.float32(1.0), dict(tree, **{name: jnp.asarray(value)}))
        assert not bool(ok) and not np.isfinite(float(norm)), name
    ok, norm = guard(jnp.float32(1.0), tree)
    assert bool(ok) and float(norm) == pytest.approx(want, rel=1e-6)
    assert not bool(guard(jnp.float32(jnp.nan), tree)[0])


def test_global_norm_of_sharded_gradients_moves_no_arrays():
    """With the arrays split over devices as FSDP splits parameters, ``sharded=True`` sums
    each device's shards and all-reduces scalars: no all-gather, all-to-all or permute (the
    packing and reshaping of the replicated case would move the arrays). Replicated arrays
    (data parallel) with ``sharded=False``: no cross-device op at all."""
    import re

    import ml_collections

    from ldm_jax import sharding
    from ldm_jax.trainers import common

    shapes = [(64, 3, 3, 128), (128, 3, 3, 64), (300, 224), (224, 896), (20000,), (448,), (64, 3, 3, 4)]
    fsdp = sharding.make_mesh(dict(data=1, fsdp=8, num_devices=-1))
    dp = sharding.make_mesh(dict(data=8, fsdp=1, num_devices=-1))
    rng = np.random.default_rng(1)
    values = {f"a{i}": jnp.asarray(rng.standard_normal(s, np.float32)) for i, s in enumerate(shapes)}
    want = _norm64(values)

    def ops(mesh, sharded):
        specs = {k: sharding.param_spec(v.shape, mesh.shape["fsdp"]) for k, v in values.items()}
        tree = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k])) for k, v in values.items()}
        compiled = jax.jit(lambda t: global_norm(t, sharded=sharded)).lower(tree).compile()
        hlo = compiled.as_text()
        np.testing.assert_allclose(float(compiled(tree)), want, rtol=1e-6)
        return {op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce")
                if re.search(op + r"(-start)?\(", hlo)}, specs

    moved, specs = ops(fsdp, True)
    assert sum(any(p) for p in specs.values()) == 5  # five of the seven arrays are split
    assert moved == {"all-reduce"}, moved
    assert ops(dp, False)[0] == set()
    # The unsharded layout on an FSDP mesh gathers arrays (why the trainers pass the flag).
    assert ops(fsdp, False)[0] - {"all-reduce"}
    def cfg(fsdp):
        return ml_collections.ConfigDict(dict(mesh=dict(data=-1, fsdp=fsdp)))

    assert common.params_sharded(cfg(-1)) and common.params_sharded(cfg(4)) and not common.params_sharded(cfg(1))


@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipped / left alone
def test_clip_by_global_norm_is_optax_clip(max_norm):
    tree = jax.tree.map(lambda x: x.astype(jnp.float32), _grad_tree())
    ours, ref = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    state = ours.init(tree)
    assert type(state) is type(ref.init(tree)) and not jax.tree.leaves(state)
    got, _ = jax.jit(ours.update)(tree, state)
    want, _ = jax.jit(ref.update)(tree, ref.init(tree))
    for k in tree:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-6, atol=1e-9, err_msg=k)
    assert _norm64(got) == pytest.approx(min(max_norm, _norm64(tree)), rel=1e-5)


def test_one_shot_compiler_options_by_output_size():
    """CPU inits compile unoptimised only while their outputs are small: a large one (the
    SD autoencoder's 83.7M parameters) runs much longer unoptimised than it saves."""
    from ldm_jax.trainers.common import ONE_SHOT_O0_MAX_ELEMENTS, one_shot_compiler_options

    assert jax.default_backend() == "cpu"
    small = {"a": jax.ShapeDtypeStruct((1000, 3000), jnp.float32), "b": np.zeros((10,), np.float32)}
    assert one_shot_compiler_options(small) == {"xla_backend_optimization_level": 0}
    n = ONE_SHOT_O0_MAX_ELEMENTS
    assert one_shot_compiler_options([jax.ShapeDtypeStruct((n,), jnp.float32)]) is not None
    assert one_shot_compiler_options([jax.ShapeDtypeStruct((n // 2 + 1,), jnp.bfloat16)] * 2) is None
    # a real init: options as given, and the program compiles and runs with them
    init = lambda: jax.random.normal(jax.random.PRNGKey(0), (4, 8))  # noqa: E731
    out = jax.jit(init, compiler_options=one_shot_compiler_options(jax.eval_shape(init)))()
    np.testing.assert_allclose(out, init(), rtol=1e-6, atol=1e-6)


def test_cli_compilation_cache_resolution(monkeypatch):
    """The command-line tools' cache: the flag wins ('' turns it off), else the
    environment's JAX_COMPILATION_CACHE_DIR, else the configs' default directory."""
    from ldm_jax import config_lib
    from ldm_jax.trainers.common import cli_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/from_env")
        assert cli_compilation_cache(None) == "/tmp/from_env" == jax.config.jax_compilation_cache_dir
        assert cli_compilation_cache("~/c") == os.path.expanduser("~/c") == jax.config.jax_compilation_cache_dir
        assert cli_compilation_cache("") is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        assert cli_compilation_cache(None) == os.path.expanduser(config_lib.DEFAULT_COMPILATION_CACHE_DIR)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_clu_writer_hides_gpus_from_tensorflow_first(monkeypatch, tmp_path):
    """Where TensorFlow is installed, the writer is clu's, and TensorFlow gets no GPU (it
    would claim their memory beside JAX's), set before clu's writer exists; without
    TensorFlow the writer is tensorboardX's. (Stand-in modules: the test extras have no
    TensorFlow.)"""
    import sys

    import clu

    from ldm_jax import metric_writers

    events = []
    fake_tf = types.ModuleType("tensorflow")
    fake_tf.config = types.SimpleNamespace(
        set_visible_devices=lambda devices, kind: events.append(("hide", tuple(devices), kind)))
    fake_mw = types.ModuleType("clu.metric_writers")
    fake_mw.SummaryWriter = lambda logdir: events.append(("writer", logdir)) or "clu-writer"
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    monkeypatch.setitem(sys.modules, "clu.metric_writers", fake_mw)
    monkeypatch.setattr(clu, "metric_writers", fake_mw, raising=False)
    logdir = str(tmp_path / "tb")
    assert metric_writers.create_writer(logdir, is_main=True) == "clu-writer"
    assert events == [("hide", (), "GPU"), ("writer", logdir)]

    def initialised(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")

    fake_tf.config.set_visible_devices = initialised
    events.clear()
    assert metric_writers.create_writer(logdir, is_main=True) == "clu-writer"
    assert events == [("writer", logdir)]

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # not installed: import fails
    w = metric_writers.create_writer(logdir, is_main=True)
    assert isinstance(w, metric_writers.TensorboardXWriter)
    w.close()
    with pytest.raises(ImportError, match=r"ldm-jax\[tf\]"):
        metric_writers.create_writer(logdir, is_main=True, backend="clu")
