"""Train LLaMA: python train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Writes DIR/metrics.jsonl, TensorBoard events in DIR/tensorboard and Orbax checkpoints in
DIR/checkpoints; resumes from the latest checkpoint in DIR. SIGTERM/SIGINT: finish the
step, save, exit 0. A non-finite loss: exit 1, the last good checkpoint kept.

Several processes (pods, clusters): jax.distributed is initialised from the environment
on TPU pods, SLURM and Open MPI, or from --coordinator_address/--num_processes/--process_id.
"""
import logging
import os
import signal
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "a configs/*.py file with get_config()", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (metrics, checkpoints)", required=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed")
flags.DEFINE_integer("num_processes", None, "number of processes, for jax.distributed")
flags.DEFINE_integer("process_id", None, "this process's index, for jax.distributed")
FLAGS = flags.FLAGS


def _multi_process_env() -> bool:
    """True on TPU VMs (jax finds the pod's hosts itself; one host works too) and when a
    cluster launcher (SLURM, Open MPI) says there are several processes."""
    import importlib.util
    env = os.environ
    return (importlib.util.find_spec("libtpu") is not None
            or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def _init_distributed():
    import jax
    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif _multi_process_env():
        jax.distributed.initialize()


def _config_keys(argv) -> list[str]:
    """Every dotted key of the --config file's get_config(), for the unknown-key message."""
    import importlib.util
    import ml_collections
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv:
        path = argv[argv.index("--config") + 1]
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_train_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    def walk(d, prefix):
        for k, v in d.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [prefix + k]
    return sorted(walk(cfg, ""))


def _parse_flags(argv):
    # ml_collections reports an unknown --config.KEY as a bare KeyError/AttributeError
    # traceback; say which key and list the valid ones instead.
    try:
        return FLAGS(argv)
    except flags.IllegalFlagValueError as e:  # a value of the wrong type
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError):
        valid = _config_keys(argv)
        given = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
        unknown = [k for k in given if k not in valid]
        sys.exit(f"error: unknown config key(s) {unknown}; valid keys:\n  " + "\n  ".join(valid))


def main(argv):
    del argv
    # Orbax and jax log every save step and backend probe at INFO through absl: quiet them.
    absl_logging.set_verbosity(absl_logging.WARNING)
    _init_distributed()
    import jax
    from tqdm import tqdm
    from llama_jax import trainer
    from llama_jax.errors import InputError

    lead = jax.process_index() == 0
    logging.getLogger("llama_jax").setLevel(logging.INFO if lead else logging.WARNING)
    cfg = FLAGS.config
    stop = trainer.StopRequest()
    def on_signal(signum, _frame):
        stop.requested = True  # the loop finishes the step, saves and returns
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    bar = tqdm(total=cfg.steps, disable=not lead, dynamic_ncols=True)
    def on_log(step, row):
        bar.n = step
        bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss_mean", "lr", "eval_loss") if row.get(k) is not None})
    try:
        out = trainer.train(cfg, FLAGS.workdir, stop=stop, on_log=on_log)
    except trainer.NonFiniteLoss as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InputError as e:  # a bad setting, a locked workdir, a damaged checkpoint
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar.close()
    if lead:
        why = " (stopped by signal)" if stop.requested else ""
        print(f"step {out['step']}{why}: loss {out['loss_mean']} (mean since the last log), "
              f"eval loss {out['eval_loss']}; "
              f"checkpoints in {os.path.join(FLAGS.workdir, 'checkpoints')}")
        if "sample" in out:
            print("sample:\n" + out["sample"])
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
