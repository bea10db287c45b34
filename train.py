"""Train LLaMA: python train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Writes DIR/config.json, DIR/metrics.jsonl, TensorBoard events in DIR/tensorboard, Orbax
checkpoints in DIR/checkpoints, DIR/samples/step_N.txt and DIR/plot.png; resumes from the
latest checkpoint in DIR. SIGTERM/SIGINT: finish the step, save, exit 0. A non-finite loss:
exit 1, the last good checkpoint kept.

Your own data: --config.data.sources=SPEC and --config.eval_data.sources=SPEC, e.g.
"text:notes/*.txt" or "0.7*text:a.txt,0.3*jsonl:b.jsonl#body" (llama_jax.data.spec).

Several processes (pods, clusters): jax.distributed is initialised from the environment
on TPU pods, SLURM and Open MPI, or from --coordinator-address/--num-processes/--process-id.

`python train.py --config FILE --help` lists the keys of FILE with their defaults.
"""
import os
import re
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llama_jax.errors import input_error, run_cli  # noqa: E402

FLAGS = None  # the parsed absl FlagValues (set by parse_flags)
_FLAGS_HELP = """  --config FILE[:ARG]      a configs/*.py file with get_config() (run as Python: trusted files only)
  --workdir DIR            run directory: metrics, TensorBoard, checkpoints (resumes from it)
  --config.KEY=VALUE       override one config key (listed below when --config is given)
  --coordinator-address H:P, --num-processes N, --process-id I
                           jax.distributed, when the environment does not say it
  --debug                  show the traceback of an error instead of one line"""


def _define_flags(fv, cfg, argv):
    from absl import flags
    from ml_collections import config_flags
    flags.DEFINE_string("workdir", None, "run directory (metrics, checkpoints)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes, for jax.distributed", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index, for jax.distributed", flag_values=fv)
    config_flags.DEFINE_config_dict("config", cfg, "the --config file's get_config()", flag_values=fv,
                                    lock_config=True, sys_argv=argv)


def _split_config_spec(argv):
    """(FILE[:ARG] of --config, the other arguments with flag names in absl's spelling)."""
    spec, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-config") and i + 1 < len(argv):
            spec, i = argv[i + 1], i + 2
            continue
        if re.match(r"^--?config=", a):
            spec = a.split("=", 1)[1]
        elif a.startswith("--"):  # hyphens are canonical; absl's names have underscores
            name, eq, value = a.partition("=")
            rest.append("--" + name[2:].replace("-", "_") + eq + value)
        else:
            rest.append(a)
        i += 1
    return spec, rest


def _did_you_mean(message: str, cfg) -> str:
    """' (did you mean --NAME?)' for absl's "Unknown command line flag 'X'", matched against
    train.py's flags, the config keys and their last parts (--stepz: --config.steps)."""
    import difflib
    from llama_jax.train import config_file
    m = re.search(r"Unknown command line flag '([^']+)'", message)
    if not m:
        return ""
    names = {n: "--" + n.replace("_", "-") for n in ("workdir", "coordinator_address", "num_processes", "process_id")}
    for key in config_file.keys(cfg):
        names.setdefault(f"config.{key}", f"--config.{key}")
        names.setdefault(key, f"--config.{key}")
        names.setdefault(key.rsplit(".", 1)[-1], f"--config.{key}")
    close = difflib.get_close_matches(m.group(1), list(names), n=1, cutoff=0.5)
    return f" (did you mean {names[close[0]]}?)" if close else ""


def _expected(message: str, cfg) -> str:
    """' (expected an integer: the config has run.fp8_history = 16)' for a config flag whose
    value did not parse as its key's type."""
    from llama_jax.train import config_file
    m = re.search(r"flag --config\.([\w.]+)=", message)
    keys = config_file.keys(cfg)
    if not m or m.group(1) not in keys:
        return ""
    now = keys[m.group(1)]
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(type(now))
    return f" (expected {kind}: the config has {m.group(1)} = {now!r})" if kind else ""


def parse_flags(argv):
    """Load the config file once, check overrides against its keys, then let absl parse."""
    from absl import flags
    from llama_jax.train import config_file
    global FLAGS
    spec, rest = _split_config_spec(list(argv))
    cfg = config_file.load(spec) if spec else None
    if any(a in ("-h", "--help", "--helpfull", "-help") for a in rest):
        print(config_file.usage(__doc__, spec, cfg, _FLAGS_HELP))
        raise SystemExit(0)
    if cfg is None:
        raise input_error("--config", "missing", "--config configs/NAME.py", None)
    from llama_jax.cli.sources import source_dicts, take_source_flags
    rest, source_specs = take_source_flags(rest)  # config_flags cannot override a list: specs are ours
    config_file.check_overrides(cfg, rest, spec)
    fv = flags.FlagValues()
    _define_flags(fv, cfg, ["train.py", *rest])
    try:
        fv(["train.py", *rest])
    except flags.Error as e:  # a value of the wrong type, an unknown flag
        raise input_error("train.py", str(e).splitlines()[0] + _did_you_mean(str(e), cfg) + _expected(str(e), cfg)) from None
    if not fv.workdir:
        raise input_error("--workdir", "missing", "--workdir DIR", None)
    for key, source_spec in source_specs.items():  # e.g. data.sources="text:notes/*.txt"
        fv.config[key.split(".")[0]].sources = source_dicts(key, source_spec)
    config_file.check_values(fv.config)
    FLAGS = fv
    return fv


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


def main(argv):
    parse_flags(argv)
    from llama_jax.cli.args import quiet_logs
    quiet_logs()  # Orbax and jax log every save step and backend probe at INFO through absl
    _init_distributed()
    import jax
    from llama_jax.train import loop as trainer
    from llama_jax.errors import InputError
    from llama_jax.train.console import Console, final_lines

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
    if lead and out.get("complete"):
        print(f"{FLAGS.workdir}: the run is already complete (checkpoint at step {out['step']} of "
              f"{cfg.steps}); raise --config.steps to continue")
    elif lead:
        print("\n".join(final_lines(out, FLAGS.workdir, stopped=stop.requested)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
