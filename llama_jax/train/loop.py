"""The training loop behind train.py: set up (mesh, state, input, checkpoints), run, finish.

`train(cfg, workdir)` resumes from the latest checkpoint under WORKDIR/checkpoints when
there is one, else initialises from `cfg.init_from` (a params-only checkpoint) or from
scratch; a damaged newest step is set aside for the newest intact one (train_recovery).
A `StopRequest` (set by train.py's SIGTERM/SIGINT handler) ends the run after the current
step with a checkpoint. A non-finite loss, gradient norm, or saved state raises
`NonFiniteLoss` before anything of that step is saved. The workdir is locked for the run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from llama_jax.train import metrics as metrics_lib
from llama_jax import sharding
from llama_jax.checkpoint import CHECKPOINTS_DIR, checkpoints_dir, integrity
from llama_jax.train import optim
from llama_jax.train import packed_guard
from llama_jax.train import report as run_report
from llama_jax.train import checkpoint as train_checkpoint
from llama_jax.train import checks as train_checks
from llama_jax.train import config as train_config
from llama_jax.train import recovery as train_recovery
from llama_jax.train import state as train_state
from llama_jax.train import workdir_lock
from llama_jax.config import ModelConfig
from llama_jax.model import Llama
from llama_jax.data import DataConfig
from llama_jax.errors import input_error
from llama_jax.data.input import ShardedInput, tokenizer_for

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class StopRequest:
    requested: bool = False


@dataclasses.dataclass
class Run:
    cfg: ml_collections.ConfigDict
    workdir: str
    model: ModelConfig
    mesh: Any
    tokenizer: Any
    shardings: Any
    abstract: Any           # unboxed abstract TrainState (ShapeDtypeStructs)
    state: Any
    input: ShardedInput
    manager: Any
    writer: metrics_lib.MetricsWriter
    train_step: Callable
    eval_step: Callable
    start_step: int
    base: Any = None        # LoRA: the frozen base params (state.params are the adapters)
    lora_record: dict | None = None  # LoRA: what each step's lora.json says
    # Which step a batch takes: a dense-mask one when its rows do not fit the packed kernel.
    guard: packed_guard.PackedGuard = dataclasses.field(default_factory=lambda: packed_guard.PackedGuard(0, dict))


def _with_architecture(model: ModelConfig, checkpoint_dir: str) -> ModelConfig:
    """The architecture stored beside a checkpoint's params (this run's options stay in config.run)."""
    return ModelConfig.load(os.path.join(checkpoint_dir, "model_config.json"))


def _checkpoint_tokenizer(path: str) -> str:
    """The tokenizer.model of a checkpoint: a pretrained model keeps its tokenizer."""
    from llama_jax.checkpoint import find_tokenizer_file
    tok = find_tokenizer_file(path)
    if tok is None:
        raise ValueError(f"init_from={path!r} has no tokenizer.model beside its params: "
                         f"pass --config.data.tokenizer=PATH/tokenizer.model")
    return str(tok)


def setup(cfg: ml_collections.ConfigDict, workdir: str) -> Run:
    """Builds everything a run needs; restores the latest checkpoint if there is one."""
    mesh = sharding.make_mesh(tuple(cfg.mesh))
    model = train_config.model_config(cfg)
    train_checks.check_config(cfg, model)
    manager = train_checkpoint.make_manager(str(checkpoints_dir(workdir)), cfg.keep_checkpoints,
                                            cfg.async_checkpoints)
    train_recovery.purge_deleted(str(manager.directory))
    train_recovery.set_aside_incomplete(manager)
    latest = manager.latest_step()
    if latest is not None:  # a resumed run keeps its own architecture (fine-tuned or not)
        model = _with_architecture(model, str(checkpoints_dir(workdir) / str(latest)))
        train_checks.check_seq_len(cfg, model)
    elif cfg.init_from:
        from llama_jax.checkpoint import resolve_checkpoint
        model = _with_architecture(model, str(resolve_checkpoint(cfg.init_from)))
    opt_cfg = train_config.optimizer_config(cfg)
    tx, schedule = optim.make_optimizer(opt_cfg, cfg.steps), optim.lr_schedule(opt_cfg, cfg.steps)
    lora = train_config.lora_config(cfg)
    net = Llama(model, train_config.run_options(cfg), lora=lora)
    base, record = None, None
    if lora is not None:
        step_dir = None if latest is None else str(checkpoints_dir(workdir) / str(latest))
        base, record = _lora_base(cfg, net, mesh, step_dir)
    boxed = train_state.abstract_state(net, tx)
    shardings = train_state.state_shardings(boxed, mesh)
    abstract = nn.unbox(boxed)

    data_d = cfg.data.to_dict()
    tok_path, shard_count = data_d.pop("tokenizer"), data_d.pop("shards") or jax.process_count()
    if cfg.init_from and not tok_path:
        tok_path = _checkpoint_tokenizer(cfg.init_from)
    data = DataConfig.from_dict(data_d)
    tokenizer = tokenizer_for(tok_path, data, model.vocab_size, workdir)
    train_checks.check_sample_prompt(cfg, model, tokenizer)
    inp = ShardedInput(data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, shard_count,
                       train_state.batch_sharding(mesh))
    if latest is not None:
        log.info("restoring %s/%d", os.path.join(workdir, CHECKPOINTS_DIR), latest)  # or the newest intact step before it
        latest, state, data_states = train_recovery.restore_intact(manager, abstract, shardings, inp.shards,
                                                                   shard_count)
        inp.set_states(data_states)
    elif cfg.init_from and lora is None:
        from llama_jax import load_checkpoint
        log.info("loading the params of %s", cfg.init_from)
        _, params = load_checkpoint(cfg.init_from, dtype="float32", mesh=mesh)
        state = train_state.state_from_params(params, tx, shardings, net)
    else:
        log.info("initialising the parameters")
        state = train_state.init_state(net, tx, mesh, jax.random.PRNGKey(cfg.seed))
    complete = latest is not None and latest >= cfg.steps  # train() returns at once: nothing to write

    def steps(net: Llama) -> dict[str, Callable]:
        return {"train": train_state.make_train_step(net, tx, schedule, mesh, shardings, cfg.micro_batches,
                                                     base=base, seed=cfg.seed),
                "eval": train_state.make_eval_step(net, mesh, shardings.params, base=base)}
    packed = steps(net)
    dense = lambda: steps(Llama(model, net.run.replace(packed_segments=0), lora=lora))  # noqa: E731
    return Run(cfg=cfg, workdir=workdir, model=model, mesh=mesh, tokenizer=tokenizer, shardings=shardings,
               abstract=abstract, state=state, input=inp, manager=manager,
               writer=metrics_lib.MetricsWriter(workdir, active=jax.process_index() == 0 and not complete,
                                                from_step=0 if latest is None else latest),
               train_step=packed["train"], eval_step=packed["eval"],
               start_step=0 if latest is None else latest, base=base, lora_record=record,
               guard=packed_guard.PackedGuard(packed_guard.kernel_slots(net.run, jax.default_backend()), dense))


def _lora_base(cfg, net: Llama, mesh, step_dir: str | None) -> tuple[Any, dict]:
    """(frozen base params, the lora.json record): the base a resumed step names, else
    `init_from`, else a random one from the seed (tests, benchmarks)."""
    import dataclasses as dc
    from llama_jax import load_checkpoint
    from llama_jax.checkpoint import resolve_checkpoint
    recorded = None if step_dir is None else train_checkpoint.lora_record(step_dir)
    path = recorded["base"] if recorded is not None else (str(resolve_checkpoint(cfg.init_from)) if cfg.init_from else "")
    dtype = cfg.lora.base_dtype
    if path:
        log.info("loading the frozen base params of %s (%s)", path, dtype)
        base = load_checkpoint(path, dtype=dtype, mesh=mesh)[1]
        base = jax.device_put(base, train_state.base_shardings(net, mesh, dtype)[1])
    else:
        base = train_state.init_base(net, mesh, jax.random.PRNGKey(cfg.seed), dtype)
    return base, {"lora": dc.asdict(net.lora), "base": path}


def save(run: Run) -> None:
    """Starts an async checkpoint of the current state (collective: every process calls it);
    raises NonFiniteLoss, saving nothing, if the state holds NaN or inf."""
    try:
        tok_path = getattr(run.tokenizer, "path", "")  # kept in each step as its tokenizer.model
        train_checkpoint.save(run.manager, run.state, run.input.get_states(), run.input.shard_count, run.model,
                              tok_path if os.path.isfile(tok_path) else None, lora=run.lora_record)
    except integrity.NonFiniteState as e:
        run.manager.wait_until_finished()
        raise NonFiniteLoss(f"{e}. Stopped without saving it; the last good checkpoint in "
                            f"{os.path.join(run.workdir, CHECKPOINTS_DIR)} (step {run.manager.latest_step()}) is kept. "
                            f"Resume from it with a lower optimizer.peak_lr or longer optimizer.warmup_steps.") from None
    train_recovery.purge_deleted(str(run.manager.directory), background=True)  # pruned by the previous save


def evaluate(run: Run) -> float:
    """Mean loss over the first `eval_batches` batches of the held-out sources (the same
    batches every time, so evaluations are comparable)."""
    cfg = run.cfg
    sources = cfg.eval_data.to_dict()["sources"]
    if not sources or cfg.eval_batches <= 0:
        return math.nan
    data = DataConfig.from_dict({"sources": sources, "shuffle": False})
    it = ShardedInput(data, run.tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, run.input.shard_count,
                      train_state.batch_sharding(run.mesh))
    loss_sum = tokens = 0.0
    for _ in range(cfg.eval_batches):
        local = it.next_local()
        step = run.guard.step_for(local, run.eval_step, "eval")
        # No fp8 state: FP8 runs evaluate with current scaling (delayed scales are for the step).
        out = step(run.state.params, it.to_global(local), None)
        loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
    return loss_sum / max(tokens, 1.0)


class _Logger:
    """Reads a step's metrics (blocking), checks them, logs every `log_every` steps with
    throughput and MFU over the steps since the previous log."""

    def __init__(self, run: Run, on_log: Callable | None):
        cfg = run.cfg
        self.run, self.on_log = run, on_log
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.flops_per_token = metrics_lib.flops_per_token(run.model, cfg.seq_len)
        self.peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, cfg.peak_tflops)
        self.since_step, self.since = run.start_step, time.perf_counter()
        self.window: list[float] = []

    def read(self, step: int, device_metrics, force_log: bool = False, extra: dict | None = None) -> dict:
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise NonFiniteLoss(
                f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite. Stopped without "
                f"saving this step; the last good checkpoint in "
                f"{os.path.join(self.run.workdir, CHECKPOINTS_DIR)} is kept. "
                f"Resume from it with a lower optimizer.peak_lr or longer optimizer.warmup_steps.")
        self.window.append(m["loss"])
        if force_log or step % self.run.cfg.log_every == 0:
            now = time.perf_counter()
            tps = (step - self.since_step) * self.tokens_per_step / max(now - self.since, 1e-9)
            # loss_mean: over the steps since the last log (one step's loss is noisy: rows differ).
            row = {**m, "tokens": step * self.tokens_per_step, "loss_tokens": m["tokens"],
                   "loss_mean": sum(self.window) / len(self.window), "tokens_per_s": tps,
                   "mfu": metrics_lib.mfu(tps, self.flops_per_token, jax.device_count(), self.peak),
                   **(extra or {})}
            self.run.writer.write(step, row)
            if self.on_log:
                self.on_log(step, row)
            self.since_step, self.since, self.window = step, time.perf_counter(), []
        return m


def _loop(run: Run, stop: StopRequest, on_log: Callable | None) -> int:
    cfg, step = run.cfg, run.start_step
    logger, pending, saved = _Logger(run, on_log), None, run.start_step
    log.info("compiling the train step (the first step waits for it)")
    while step < cfg.steps and not stop.requested:
        local = run.input.next_local()  # this process's rows, checked here before they become a global batch
        train_step = run.guard.step_for(local, run.train_step)
        run.state, m = train_step(run.state, run.input.to_global(local))
        step += 1
        if pending is not None:  # read the previous step while this one runs
            logger.read(*pending)
        pending = (step, m)
        do_eval = step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
        do_save = step == cfg.steps or step % cfg.checkpoint_every == 0 or stop.requested
        if do_eval or do_save:
            # A step is checked (finite) before it is saved; an eval joins its log row.
            extra = {"eval_loss": evaluate(run)} if do_eval else None
            logger.read(step, m, force_log=do_eval, extra=extra)
            pending = None
            if do_save:
                save(run)
                saved = step
    if pending is not None:
        logger.read(*pending)
    if step != saved:
        save(run)
    return step


def preflight(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Every check of the settings that needs no device state, made before anything is
    created in `workdir` (lock, checkpoint manager, directories): a bad setting fails with
    one InputError and leaves nothing behind."""
    train_checks.check_config(cfg, train_config.model_config(cfg))
    train_config.run_options(cfg)  # a bad run option fails here, naming its key
    lora = train_config.lora_config(cfg)  # (a bad lora key too; the rank is checked on the base's shapes)
    if lora is not None and cfg.lora.base_dtype not in ("float32", "bfloat16"):
        raise input_error("config.lora.base_dtype", "is the frozen base's dtype", "float32 or bfloat16",
                          cfg.lora.base_dtype)
    try:
        opt_cfg = train_config.optimizer_config(cfg)
    except ValueError as e:
        raise input_error("config.optimizer", str(e)) from None
    train_checks.check_schedule(cfg, opt_cfg)
    if cfg.init_from and _latest_complete_step(workdir) is None:  # a resumed run ignores init_from
        from llama_jax.checkpoint import resolve_checkpoint
        try:
            resolve_checkpoint(cfg.init_from)
        except (OSError, ValueError) as e:
            raise input_error("config.init_from", str(e)) from None
        if not cfg.data.tokenizer:
            try:
                _checkpoint_tokenizer(cfg.init_from)
            except ValueError as e:
                raise input_error("config.data.tokenizer", str(e)) from None


def _latest_complete_step(workdir: str) -> int | None:
    """The newest step directory under WORKDIR/checkpoints with all its items (read only)."""
    d = checkpoints_dir(workdir)
    if not d.is_dir():
        return None
    steps = [int(n) for n in os.listdir(d) if n.isdigit() and train_checkpoint.is_complete(d / n)]
    return max(steps, default=None)


def _remove_failed_setup(workdir: str, created: bool) -> None:
    """After a failure: a workdir holding nothing but our lock (and empty bookkeeping) loses
    the lock, and the directory too if this run created it."""
    if jax.process_index() != 0:
        return
    train_recovery.remove_if_empty(str(checkpoints_dir(workdir)))
    try:
        if os.listdir(workdir) != [workdir_lock.LOCK_FILE]:
            return
        os.unlink(os.path.join(workdir, workdir_lock.LOCK_FILE))
        if created:
            os.rmdir(workdir)
    except OSError:
        pass


def train(cfg: ml_collections.ConfigDict, workdir: str, stop: StopRequest | None = None,
          on_log: Callable | None = None) -> dict:
    """Runs (or resumes) training to `cfg.steps`; returns the last logged step, loss,
    loss_mean, eval_loss, train_loss (+ train_loss_from_step: the mean over the last 10% of
    steps), plot_path, a text sample (+ sample_path) when `cfg.sample.max_new_tokens` > 0, and
    dense_mask_batches ({"train": n, "eval": n}) when batches did not fit the packed kernel.
    A workdir whose latest checkpoint is already at `cfg.steps` returns {"step": that step,
    "complete": True} once that checkpoint restores (nothing compiled, trained or written).
    Raises workdir_lock.WorkdirBusy if another run holds `workdir`."""
    preflight(cfg, workdir)  # before anything is written
    created = not os.path.exists(workdir)
    with workdir_lock.hold_for_run(workdir):
        try:
            return _train(cfg, workdir, stop, on_log)
        except BaseException:
            _remove_failed_setup(workdir, created)  # a failed setup leaves nothing behind
            raise


def _train(cfg, workdir, stop, on_log) -> dict:
    run = setup(cfg, workdir)
    if run.start_step >= cfg.steps:  # the latest intact checkpoint is already at `steps`
        run.manager.wait_until_finished()
        return {"step": run.start_step, "complete": True}
    run_report.start(run)  # WORKDIR/config.json and the start-of-run summary
    logger_last: dict = {}
    try:
        step = _loop(run, stop or StopRequest(), _chain(on_log, logger_last))
    finally:
        run.manager.wait_until_finished()  # in-flight saves are of checked, good steps
        train_recovery.purge_deleted(str(run.manager.directory))
        run.writer.close()
    out = {"step": step, **{k: logger_last.get(k) for k in ("loss", "loss_mean", "eval_loss")}}
    if run.guard.summary():
        log.info("%s", run.guard.summary())
        out["dense_mask_batches"] = dict(run.guard.dense_batches)
    if cfg.sample.max_new_tokens > 0 and jax.process_count() == 1:
        out["sample"] = sample(run)
    return run_report.finish(run, out)  # sample file, plot.png, smoothed train loss


def sample(run: Run) -> str:
    """The configured prompt and its continuation by the current params (gathered to the
    host first: meant for the small demo models)."""
    from llama_jax.inference.text import generate_text
    s = run.cfg.sample
    log.info("generating a %d-token sample", s.max_new_tokens)
    params = run.state.params
    if run.base is not None:  # LoRA: the merged weights
        from llama_jax import lora as lora_lib
        params = lora_lib.merge(run.base, params, train_config.lora_config(run.cfg))
    params = jax.device_get(params)
    new = generate_text(run.model, params, run.tokenizer, [s.prompt], s.max_new_tokens,
                        temperature=s.temperature, seed=run.cfg.seed)
    return s.prompt + new[0]


def _chain(on_log: Callable | None, last: dict) -> Callable:
    def f(step, row):
        last.update(row)
        if on_log:
            on_log(step, row)
    return f
