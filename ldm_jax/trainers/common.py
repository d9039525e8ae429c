"""Pieces shared by the trainers: dtypes, guarded updates, sharded abstract states, the
step loop."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from ldm_jax.config_lib import LR_DECAYS, ConfigError
from ldm_jax.sharding import MIN_FSDP_SIZE

log = logging.getLogger("ldm_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
    return DTYPES[name]


# Arrays with fewer elements than this are summed together by ``global_norm``.
SMALL_ARRAY_ELEMENTS = 2**16
# ``global_norm`` sums each large array's squares into this many partial sums.
NORM_PARTIALS = 1024


def params_sharded(config) -> bool:
    """Whether the run's parameters (and so their gradients) may be split over devices: an
    FSDP mesh axis other than 1."""
    return int(config.mesh.fsdp) != 1


def global_norm(tree, *, sharded: bool = False) -> jax.Array:
    """The l2 norm of all of ``tree``'s elements (float32), as ``optax.tree.norm``, in few
    GPU kernels. optax takes one sum of squares per array, each one or two kernels (a large
    one is reduced to partial sums, then to a scalar). Here the arrays under
    ``SMALL_ARRAY_ELEMENTS`` (biases, norm scales: most of a model's arrays, a tiny share of
    its elements) are raveled and concatenated into one vector, reduced in one fusion; each
    large array is reduced to ``NORM_PARTIALS`` row sums in one kernel, and the partial-sum
    vectors are added elementwise and reduced in one more.

    ``sharded``: the arrays may be split over devices (FSDP). Packing and reshaping them
    would then move them between devices, so only the arrays that FSDP never splits (under
    ``sharding.MIN_FSDP_SIZE`` elements) are packed, and every other array is summed on its
    own, each device over its shard, with one all-reduce for all of them."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)

    def squares(x):
        x = x.astype(jnp.float32)
        return x * x

    # One pass sorts each array into one of the three reductions.
    small_size = min(SMALL_ARRAY_ELEMENTS, MIN_FSDP_SIZE) if sharded else SMALL_ARRAY_ELEMENTS
    small, total, partials = [], [], None
    for x in leaves:
        if x.size < small_size:
            small.append(x.ravel())
        elif sharded or x.size % NORM_PARTIALS:
            total.append(jnp.sum(squares(x)))
        else:
            rows = jnp.sum(squares(x).reshape(NORM_PARTIALS, -1), axis=1)
            partials = rows if partials is None else partials + rows
    if partials is not None:
        total.append(jnp.sum(partials))
    if small:
        total.append(jnp.sum(squares(jnp.concatenate(small, dtype=jnp.float32))))
    return jnp.sqrt(sum(total[1:], total[0]))


def clip_by_global_norm(max_norm: float, *, sharded: bool = False) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same updates, same empty state) on ``global_norm``, so
    the clipping and ``finite_and_norm`` (given the same ``sharded``) compute one identical
    norm that XLA merges."""

    def update_fn(updates, state, params=None):
        del params
        norm = global_norm(updates, sharded=sharded)
        keep = norm < max_norm
        return jax.tree.map(
            lambda g: jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def fresh(tree):
    """Rebuild a State's Variables in the current trace (NNX refuses to mutate Variables
    created by an outer trace, e.g. BatchNorm statistics closed over by ``jax.grad``)."""
    return jax.tree.map(lambda v: v, tree)


def tree_where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


# ----------------------------------------------------------------------------------------
# Flat train states between steps
# ----------------------------------------------------------------------------------------


class _Structure:
    """A tree structure, compared by identity (one object per distinct structure)."""

    __slots__ = ("treedef",)

    def __init__(self, treedef):
        self.treedef = treedef


_STRUCTURES: list[_Structure] = []


def _interned(treedef) -> _Structure:
    for s in _STRUCTURES:
        if s.treedef == treedef:
            return s
    s = _Structure(treedef)
    _STRUCTURES.append(s)
    return s


class FlatState:
    """A pytree carried between jitted steps as its flat list of leaves.

    A train state of ``nnx.State`` / ``nnx.Variable`` nodes costs host time on every call
    of a jitted step: the outputs are rebuilt Variable by Variable in Python (the 285.7M
    U-Net's state has 1734 of them), and the structure of the inputs is compared node by
    node to find the compiled program. ``FlatState`` is one pytree node whose children are
    the leaves and whose static data is an interned structure compared by identity, so a
    step call only passes arrays. ``tree()`` rebuilds the original pytree (on the host for
    evaluation, checkpoints and logs; at trace time inside the step, see ``flat_step``).
    Equal structures share one interned key, so ``FlatState.of(shardings)`` matches the
    state's structure in ``in_shardings`` / ``out_shardings``.
    """

    __slots__ = ("leaves", "structure")

    def __init__(self, leaves: list, structure: _Structure):
        self.leaves, self.structure = leaves, structure

    @classmethod
    def of(cls, tree: Any) -> "FlatState":
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return cls(leaves, _interned(treedef))

    def tree(self) -> Any:
        return jax.tree_util.tree_unflatten(self.structure.treedef, self.leaves)


jax.tree_util.register_pytree_node(
    FlatState, lambda f: (f.leaves, f.structure), lambda structure, leaves: FlatState(list(leaves), structure))


def flat_step(step_fn: Callable) -> Callable:
    """``step_fn(state, *args) -> (state, *rest)`` as ``(FlatState, *args) -> (FlatState,
    *rest)``; jit the result with ``FlatState.of(state_shardings)`` as the state's in and
    out shardings."""

    def fn(flat: FlatState, *args):
        new, *rest = step_fn(flat.tree(), *args)
        return (FlatState.of(new), *rest)

    # the step's name for the compiled module (jit_<name>: cache entries, profiles)
    fn.__name__ = fn.__qualname__ = getattr(step_fn, "__name__", "step_fn")
    return fn


def finite_and_norm(loss, grads, *, sharded: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(loss and every gradient element finite, global gradient norm)`` from one reduction
    over the gradients: a NaN propagates into the sum of squares and an inf squares to inf,
    so the norm is finite exactly when every element is (and the squares do not overflow
    fp32: a gradient norm above ~1e19 counts as non-finite, a step to skip anyway). The
    clipping transform's identical norm computation (same ``sharded``, see ``global_norm``)
    is merged with this one by XLA."""
    norm = global_norm(grads, sharded=sharded)
    return jnp.isfinite(loss) & jnp.isfinite(norm), norm


def lr_schedule(peak: float, optim, total_steps: int) -> Callable[[Any], jax.Array]:
    """Learning rate by step: a linear warm-up from 0 over ``optim.warmup_steps`` steps,
    then ``optim.lr_decay``: ``constant`` (CompVis), or ``cosine`` / ``linear`` decay to
    ``optim.min_lr_ratio * peak`` at ``total_steps`` (the run's ``num_train_steps``; held
    there after it)."""
    warmup, decay = int(optim.warmup_steps), optim.lr_decay
    if decay not in LR_DECAYS:
        raise ConfigError(f"optim.lr_decay must be one of {LR_DECAYS}, got {decay!r}")
    end, span = peak * float(optim.min_lr_ratio), max(int(total_steps) - warmup, 1)
    if decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, span, alpha=float(optim.min_lr_ratio))
    else:
        after = optax.linear_schedule(peak, end, span)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# Largest program output (elements) that one_shot_compiler_options compiles unoptimised.
ONE_SHOT_O0_MAX_ELEMENTS = 32_000_000


def one_shot_compiler_options(outputs: Any) -> dict | None:
    """XLA options for a program that runs once (a random initialisation) whose outputs
    have the shapes ``outputs`` (a pytree of arrays or ``jax.ShapeDtypeStruct``s).

    On the CPU backend, LLVM's optimisation of the generated code is most of a small such
    program's compile time (the threefry kernels of every initialiser) and buys little for
    a single execution: the tiny U-Net's train state (3.0M elements) is made in ~7 s
    instead of ~13 s at backend optimisation level 0. Unoptimised code runs several times
    slower, though, which wins for large outputs: the SD KL-f8 autoencoder's 83.7M
    parameters compile in 8.7 s and take 56 s to generate at level 0, against 15.5 s and
    7.6 s at the default (2-core CPU). So level 0 only up to ``ONE_SHOT_O0_MAX_ELEMENTS``
    output elements. The random bits are integer arithmetic and do not change; the float
    transforms (normal, truncated normal) can round differently in the last bit, the same
    way on every run. GPUs and TPUs compile with their defaults."""
    if jax.default_backend() != "cpu":
        return None
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(outputs))
    return {"xla_backend_optimization_level": 0} if n <= ONE_SHOT_O0_MAX_ELEMENTS else None


def init_sharded(init: Callable, *args, mesh, abstract: bool = False):
    """``(state, shardings)``: ``init(*args)`` (a pytree of arrays) compiled as one program
    whose outputs are born sharded on ``mesh`` (never whole on one device), or, when
    ``abstract``, only its shapes, dtypes and shardings (``jax.ShapeDtypeStruct``s, the
    target of a checkpoint restore; nothing compiled or computed)."""
    from ldm_jax import sharding

    shapes = jax.eval_shape(init, *args)
    shardings = sharding.state_shardings(shapes, mesh)
    if abstract:
        return abstract_with_shardings(shapes, shardings), shardings
    fn = jax.jit(init, out_shardings=shardings, compiler_options=one_shot_compiler_options(shapes))
    return fn(*args), shardings


def log_once(msg: str) -> None:
    """Warning-level log from process 0 only (start-up facts users must see)."""
    if jax.process_index() == 0:
        log.warning(msg)


def param_count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def use_compilation_cache(config: Any) -> None:
    """Point JAX's persistent compilation cache at ``config.compilation_cache_dir`` (if set);
    called first, before anything is compiled. An empty value leaves the cache as it is
    (``JAX_COMPILATION_CACHE_DIR``, or what the calling process set)."""
    if config.compilation_cache_dir:
        cli_compilation_cache(config.compilation_cache_dir)


def cli_compilation_cache(flag: str | None) -> str | None:
    """The persistent compilation cache of a command-line tool (``sample.py``,
    ``python -m ldm_jax.evaluate``), set before anything is compiled, so a second run with
    the same shapes loads its programs instead of compiling them. ``flag`` is the tool's
    ``--compilation_cache_dir``: None (not given) uses ``JAX_COMPILATION_CACHE_DIR`` if set,
    else the configs' default ``~/.cache/ldm_jax/xla``; ``""`` turns the cache off.
    Returns the directory in use (None: off)."""
    from ldm_jax import config_lib

    if flag is None:
        flag = os.environ.get("JAX_COMPILATION_CACHE_DIR") or config_lib.DEFAULT_COMPILATION_CACHE_DIR
    path = os.path.expanduser(flag) if flag else None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def check_workdir(config: Any, workdir: str) -> None:
    """Stop before any work when ``workdir`` holds a run of another trainer (its
    ``config.json`` says which; nothing there: a new run)."""
    from ldm_jax import config_lib

    try:
        with open(os.path.join(workdir, "config.json")) as f:
            trainer = json.load(f).get("trainer")
    except (OSError, ValueError):
        return
    if trainer and trainer != config.trainer:
        raise config_lib.ConfigError(f"{workdir} holds a {trainer!r} run; this config trains "
                                     f"{config.trainer!r}: use another --workdir")


def prepare_workdir(config: Any, workdir: str):
    """Create ``workdir``, write ``config.json`` (process 0) and open the metric writer;
    returns ``(is_main, writer)``. The trainers call it once their data, weights and frozen
    models are open and the checkpoint (if any) is restored, so a run stopped by a bad
    setting leaves ``workdir`` as it was (its ``config.json`` still that of its checkpoints)."""
    import ml_collections

    from ldm_jax import metric_writers as mw

    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer = mw.create_writer(os.path.join(workdir, "tensorboard"), is_main=is_main)
    writer.write_hparams({k: v for k, v in config.items() if not isinstance(v, ml_collections.ConfigDict)})
    return is_main, writer


# ----------------------------------------------------------------------------------------
# The step loop
# ----------------------------------------------------------------------------------------


def run_training_loop(config: Any, *, state: Any, start_step: int, train_step: Callable,
                      next_batch: Callable[[], Any], empty_metrics: Callable[[], Any],
                      metrics_sharding: Any, writer: Any, ckpt: Any, is_main: bool,
                      progress_keys: Sequence[str],
                      run_eval: Callable[[Any, int], dict], save: Callable[[Any, int], None],
                      write_images: Callable[[Any, int], None] | None = None,
                      extra_scalars: Callable[[], dict] | None = None) -> dict:
    """Both trainers' loop from ``start_step`` to ``config.num_train_steps``.

    Each step: ``flat, acc = train_step(flat, next_batch(), acc)`` (the first one timed,
    compile included), where ``flat`` is ``FlatState.of(state)`` (the step is built with
    ``flat_step``) and ``acc`` starts as ``empty_metrics()`` (a fresh one each time: the
    step may donate it). The callbacks below get the state as a tree (``flat.tree()``,
    rebuilt at most once per step). Every ``log_every_steps`` (and at the last step) the accumulated
    metrics are fetched, reset and written as ``train/*`` with ``nan_skips_total``,
    ``extra_scalars()`` and ``images_per_sec``, and the progress line shows
    ``progress_keys``; every ``eval_every_steps`` ``run_eval(state, step)``; every
    ``image_every_steps`` ``write_images(state, step)``; every ``checkpoint_every_steps``
    ``save(state, step)``. The last step does all of them. SIGTERM (preemption) or Ctrl-C saves at
    the next log boundary, agreed by all processes, and stops. ``ckpt`` and ``writer``
    are closed on the way out, on errors too.

    Returns ``{"history": {step: scalars}, "eval": last eval result, "start_step",
    "final_step"}``.
    """
    from ldm_jax import checkpointing
    from ldm_jax import metric_writers as mw

    history: dict[int, dict] = {}
    eval_result: dict = {}
    acc = jax.device_put(empty_metrics(), metrics_sharding)
    progress = mw.Progress(config.num_train_steps, start_step, config.global_batch_size, enabled=is_main)
    preempt = checkpointing.PreemptionFlag()
    step = start_step
    flat = FlatState.of(state)
    del state  # from here on the loop's state is ``flat`` (the step donates its buffers)
    view: list = [None]  # the tree of the current ``flat``, rebuilt once when a callback needs it

    def current():
        if view[0] is None:
            view[0] = flat.tree()
        return view[0]

    try:
        while step < config.num_train_steps:
            batch = next_batch()
            if step == start_step:
                t0 = time.perf_counter()
                flat, acc = train_step(flat, batch, acc)
                jax.block_until_ready(acc)
                log_once(f"first step (compile + run) took {time.perf_counter() - t0:.1f}s")
            else:
                flat, acc = train_step(flat, batch, acc)
            view[0] = None
            step += 1
            last = step == config.num_train_steps
            if step % config.log_every_steps == 0 or last:
                scalars = {k: float(v) for k, v in jax.device_get(acc.compute()).items()}
                acc = jax.device_put(empty_metrics(), metrics_sharding)
                scalars["nan_skips_total"] = float(jax.device_get(current().nan_skips))
                if extra_scalars is not None:
                    scalars.update(extra_scalars())
                scalars["images_per_sec"] = progress.update(step, {k: scalars[k] for k in progress_keys})
                writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                history[step] = scalars
            if step % config.eval_every_steps == 0 or last:
                eval_result = run_eval(current(), step)
                if is_main:
                    log.info("step %d eval %s", step, json.dumps(eval_result))
            if write_images is not None and (step % config.image_every_steps == 0 or last):
                write_images(current(), step)
            stop = preempt.should_stop(step, config.log_every_steps)
            if step % config.checkpoint_every_steps == 0 or last or stop:
                save(current(), step)
            if stop:
                log_once(f"stopped by {preempt.reason or 'a signal to another process'} at step "
                         f"{step}; checkpoint saved")
                break
        writer.flush()
    finally:
        preempt.restore_handler()
        ckpt.close()
        writer.close()
    return {"history": history, "eval": eval_result, "start_step": start_step, "final_step": step}


# ----------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------


def split_microbatches(tree, k: int):
    """``[B, ...] -> [k, B/k, ...]`` for every leaf; microbatch ``i`` holds rows ``i, i+k,
    i+2k, ...``. The batch dimension is sharded in contiguous blocks, one per device, so
    with ``B/k`` divisible by the device count every device keeps exactly its own rows in
    every microbatch: the split moves no data between devices."""
    def split(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"batch dimension {b} is not divisible by {k} microbatches")
        return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def microbatch_mean(fn, xs, k: int, carry=None):
    """Mean of ``fn``'s outputs over ``k`` microbatches of ``xs``, run one after another.

    ``fn(xs_i, i, carry) -> (out, carry)``: ``out`` is a pytree of arrays (gradients,
    scalar losses) averaged over the microbatches, ``carry`` state threaded through them
    (e.g. BatchNorm running statistics). With ``k == 1`` this is ``fn(xs, 0, carry)``,
    the same program as without accumulation. Otherwise the microbatches run in a
    ``lax.scan``, so activations live for one microbatch at a time, and the sums are kept
    in float32 (then cast back), so bf16 gradients do not lose bits to the accumulation.
    Equal microbatches make the mean of their batch-mean losses the loss of the whole batch.
    """
    if k == 1:
        return fn(xs, jnp.int32(0), carry)
    mbs = split_microbatches(xs, k)
    first = jax.tree.map(lambda x: x[0], mbs)
    out_shapes = jax.eval_shape(lambda a, c: fn(a, jnp.int32(0), c)[0], first, carry)

    def acc_dtype(d):
        return jnp.float32 if jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits < 32 else d

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s.dtype)), out_shapes)

    def body(c, inp):
        total, carry = c
        mb, i = inp
        out, carry = fn(mb, i, carry)
        total = jax.tree.map(lambda a, o: a + o.astype(a.dtype), total, out)
        return (total, carry), None

    (total, carry), _ = jax.lax.scan(body, (zeros, carry), (mbs, jnp.arange(k, dtype=jnp.int32)))
    mean = jax.tree.map(lambda a, s: (a / k).astype(s.dtype), total, out_shapes)
    return mean, carry
