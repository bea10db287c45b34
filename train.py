"""Train LLaMA: python train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Writes DIR/config.json, DIR/metrics.jsonl, TensorBoard events in DIR/tensorboard, Orbax
checkpoints in DIR/checkpoints, DIR/samples/step_N.txt and DIR/plot.png; resumes from the
latest checkpoint in DIR. SIGTERM/SIGINT: finish the step, save, exit 0. A non-finite loss:
exit 1, the last good checkpoint kept.

Your own data: --config.data.sources=SPEC and --config.eval_data.sources=SPEC, e.g.
"text:notes/*.txt" or "0.7*text:a.txt,0.3*jsonl:b.jsonl#body" (llama_jax.data.spec).

Several processes (pods, clusters): jax.distributed is initialised from the environment
on TPU pods, SLURM and Open MPI, or from --coordinator_address/--num_processes/--process_id.
"""
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
    specs = {}
    if any(".sources" in a for a in argv):  # config_flags cannot override a list: take them out
        from llama_jax.data.cli import take_source_flags
        argv, specs = take_source_flags(argv)
        sys.argv = argv  # config_flags reads its overrides from sys.argv itself
    rest = _parse_config_flags(argv)
    if specs:
        from llama_jax.data.cli import source_dicts
        try:
            for key, spec in specs.items():
                FLAGS.config[key.split(".")[0]].sources = source_dicts(key, spec)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return rest


def _parse_config_flags(argv):
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
    from llama_jax import trainer
    from llama_jax.errors import InputError
    from llama_jax.train_console import Console, final_lines

    lead = jax.process_index() == 0
    cfg = FLAGS.config
    console = Console(cfg.steps, active=lead)  # phase lines above the bar, never in it
    stop = trainer.StopRequest()
    def on_signal(signum, _frame):
        stop.requested = True  # the loop finishes the step, saves and returns
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        out = trainer.train(cfg, FLAGS.workdir, stop=stop, on_log=console.on_log)
    except trainer.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InputError as e:  # a bad setting, a locked workdir, a damaged checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        console.close()
    if lead:
        print("\n".join(final_lines(out, FLAGS.workdir, stopped=stop.requested)))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
