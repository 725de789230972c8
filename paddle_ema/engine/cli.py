"""Command-line front-ends of tools/*.py: argument parsing, and errors as one line + exit 2.

One error path: a problem the user or the machine causes is printed as one line `error: ...` on
stderr and the tool exits with status 2, without a traceback. That is every paddle_ema error
(ConfigError, CheckpointError, ...), every OSError (disk full, read-only file system, file-size
limit, a path through a file, permissions: the line names the path and what to do) and running
out of memory. Anything else is a bug and keeps its traceback. The environment variables the
package reads are checked first. SIGINT and SIGTERM stop a tool the same way: the exception
unwinds every writer (temporary files removed, the run lock released), then one line and exit
status 130 or 143.
"""

import argparse
import os
import shlex
import signal
import sys
import time
import warnings

from .. import environment
from ..errors import ConfigError, PaddleEMAError
from .output_folder import check_writable, describe_os_error

__all__ = ["train_main", "eval_main", "export_main", "average_main", "posthoc_main"]


def _quiet():
    # Paddle's notices that say nothing about the user's run: ccache (custom-op builds only) and
    # BatchNorm's "we now always track global mean and variance" on every training forward. Set
    # inside _run's catch_warnings: a caller's own filters are back once the tool returns.
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")


def _one_line(text, limit=2000):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# How long a rank other than 0 holds its error exit under paddle.distributed.launch; see _error_exit.
PEER_ERROR_GRACE_S = 20.0


def _error_exit(line):
    """Print the one error line and return the exit status 2, letting rank 0 report first under a launcher.

    Paddle's launcher stops every worker (SIGTERM) once one fails, and exits with the status of the
    lowest-ranked worker that did not exit 0. A config error is found by every rank; if rank 1 got
    there first, rank 0 would die of the SIGTERM and the launch would exit 241 (-15), not 2. So a rank
    above 0 prints its line, then waits (killed by the launcher once rank 0 has failed, or exiting
    after PEER_ERROR_GRACE_S when the error was its own).
    """
    print(line, file=sys.stderr, flush=True)
    try:
        rank, world = int(os.environ.get("PADDLE_TRAINER_ID", "0")), int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    except ValueError:
        rank, world = 0, 1
    if rank > 0 and world > 1:
        time.sleep(PEER_ERROR_GRACE_S)
    return 2


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that it unwinds like KeyboardInterrupt on SIGINT."""


def _terminate(signum, frame):
    raise Terminated()


def _run(main, argv):
    with warnings.catch_warnings():
        _quiet()
        return _run_quietly(main, argv)


def _run_quietly(main, argv):
    if hasattr(signal, "SIGXFSZ"):
        # Past a file-size limit (ulimit -f) the kernel would kill the process without a word; ignored,
        # the write fails with EFBIG instead, which is reported like any other OSError.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # After Paddle's import, which installs its own SIGTERM handler (a multi-line FatalError and a
    # core dump), so that this one replaces it.
    import paddle  # noqa: F401

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run_main(main, argv)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_main(main, argv):
    try:
        environment.check()
        main(argv)
    except PaddleEMAError as exc:
        return _error_exit(f"error: {_one_line(exc)}")
    except OSError as exc:
        return _error_exit(f"error: {_one_line(describe_os_error(exc))}")
    except MemoryError:
        return _error_exit("error: out of memory (a config or file asks for more than this machine has)")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _parser(description, config_required=True):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=config_required, help="YAML config file")
    parser.add_argument("-o", "--opt", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. -o use_ema=true TrainReader.batch_size=8")
    return parser


TOOL_FILES = ("train.py", "eval.py", "export_model.py", "average_checkpoints.py", "posthoc_ema.py")


def _command(tool):
    """How the user runs `tool` ('train', ...), the way this process was started: paddle-ema-train,
    or python <the folder of this tools/*.py>/train.py."""
    from .._require import COMMAND_PREFIX

    started = sys.argv[0] if sys.argv else ""
    if os.path.basename(started).startswith(COMMAND_PREFIX):
        return f"{COMMAND_PREFIX}{tool}"
    folder = os.path.dirname(started) if os.path.basename(started) in TOOL_FILES else "tools"
    return f"python {os.path.join(folder, tool + '.py')}"


def _missing_config(given):
    """The error for a -c that is neither a file nor a packaged config: did-you-mean and the list."""
    import difflib
    from pathlib import Path

    from ..config.packaged import packaged_configs

    names = packaged_configs()
    stem = Path(given).stem if Path(given).suffix in (".yml", ".yaml") else Path(given).name
    close = difflib.get_close_matches(stem, names, n=1)
    guess = f"did you mean {close[0]}? " if close else ""
    shipped = f"packaged configs: {', '.join(names)}" if names else "no packaged configs are installed"
    return ConfigError(f"-c {given}: no such file, and no packaged config of that name; {guess}{shipped} "
                       "(or give the path of a YAML config)")


def _config(args):
    from ..config.packaged import resolve_config
    from . import read_config

    args.given_config = args.config
    args.config = resolve_config(args.config)  # a path, or the name of a shipped config
    if not os.path.exists(args.config):
        raise _missing_config(args.given_config)
    return read_config(args.config, args.opt)


def _check_resume_target(resume, run_dir):
    """A ConfigError when -r names an existing file or folder that cannot be a checkpoint's path
    (README.md, a run folder): the line says what -r takes and lists the checkpoints there are."""
    from ..infra.checkpoint import complete_checkpoints
    from .checkpoint_files import checkpoint_stem
    from .trainer import RESUME_AUTO

    if resume == RESUME_AUTO:
        return
    is_folder = os.path.isdir(resume)
    if not is_folder and not (os.path.isfile(resume) and checkpoint_stem(resume) == resume):
        return
    folder = resume if is_folder and complete_checkpoints(resume, ".pdopt") else run_dir
    stems = complete_checkpoints(folder, ".pdopt")
    example = stems[-1] if stems else os.path.join(run_dir, "5")
    there = (f"; complete checkpoints in {folder}: {', '.join(os.path.basename(s) for s in stems)}" if stems
             else f"; {run_dir} holds no complete checkpoint yet")
    raise ConfigError(f"-r {resume}: {resume} is {'a folder' if is_folder else 'a file'}, not a checkpoint: give "
                      f"a checkpoint's path without suffix, like {example}, or -r auto for this run's newest"
                      f"{there}")


def _train(argv):
    parser = _parser("Train a model with an EMA of its weights.")
    parser.add_argument("-r", "--resume", default=None,
                        help="checkpoint to resume from (path without suffix), or 'auto': the newest complete "
                             "checkpoint of this run, or a fresh start when there is none")
    parser.add_argument("--eval", action="store_true", help="evaluate raw and EMA weights at snapshot epochs")
    parser.add_argument("--use_vdl", action="store_true", help="write VisualDL scalars")
    parser.add_argument("--vdl_log_dir", default=None, help="VisualDL log dir (default: <output>/<name>/vdl)")
    args = parser.parse_args(argv)
    if args.resume is not None and not args.resume.strip():
        raise ConfigError("-r: an empty checkpoint path; give a checkpoint (path without suffix), or -r auto for the "
                          "newest complete checkpoint of this run (./auto for a checkpoint named auto)")
    cfg = _config(args)
    from .builders import run_name
    from .trainer_choice import build_trainer

    name = run_name(args.config)
    if args.resume is not None:
        _check_resume_target(args.resume, os.path.join(cfg["output_dir"], name))
    vdl = None
    if args.use_vdl or args.vdl_log_dir:
        vdl = args.vdl_log_dir or os.path.join(cfg["output_dir"], name, "vdl")
    trainer = build_trainer(cfg, name, do_eval=args.eval, vdl_log_dir=vdl, resume=args.resume)
    trainer.train()


def _weights(cfg, args):
    """The weights file to read: -o weights, else the run's model_final, which training must have written."""
    from .builders import run_name

    if cfg["weights"]:
        return cfg["weights"]
    path = os.path.join(cfg["output_dir"], run_name(args.config), "model_final.pdparams")
    if not os.path.exists(path):
        overrides = "".join(f" {shlex.quote(o)}" for o in args.opt)
        train = f"{_command('train')} -c {shlex.quote(args.given_config)}" + (f" -o{overrides}" if overrides else "")
        raise ConfigError(f"{path} does not exist: train first ({train}), or point -o weights=PATH at a .pdparams file")
    return path


def _eval(argv):
    args = _parser("Accuracy of a checkpoint (-o weights=PATH; default <output>/<name>/model_final).").parse_args(argv)
    cfg = _config(args)
    from .builders import build_datasets, build_model, set_device
    from .checkpoint_files import load_weights
    from .evaluation import evaluate

    set_device(cfg)
    dataset = build_datasets(cfg, ("eval",))["eval"]
    model = build_model(cfg, dataset)
    file = load_weights(model, _weights(cfg, args))
    accuracy = evaluate(model, dataset, cfg["EvalReader"]["batch_size"])
    print(f"{file}: accuracy {accuracy:.4f} on {len(dataset)} {cfg['dataset']} eval images")


def _export(argv):
    parser = _parser("Export an inference model (paddle.jit.save) with the checkpoint's (EMA) weights.")
    parser.add_argument("--output_dir", default="output_inference", help="folder of the exported model")
    args = parser.parse_args(argv)
    if not args.output_dir.strip():
        raise ConfigError("--output_dir: an empty path; give the folder to export into (default output_inference)")
    cfg = _config(args)
    from .builders import run_name
    from .export import export_model

    weights = _weights(cfg, args)  # before anything is created: no trained run, no empty output folder
    check_writable(args.output_dir, "--output_dir")
    prefix, max_diff = export_model(cfg, weights, os.path.join(args.output_dir, run_name(args.config)))
    folder, stem = os.path.split(prefix)
    files = ", ".join(sorted(f for f in os.listdir(folder or ".") if f.startswith(stem + ".")))
    print(f"exported {prefix} ({files}); reloaded predictions match (max |diff| {max_diff:.3g})")


def _average(argv):
    parser = _parser("Average checkpoints (SWA after the fact), uniformly or with weights.", config_required=False)
    parser.add_argument("checkpoints", nargs="+", help=".pdparams files to average")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per checkpoint")
    parser.add_argument("--bn", choices=("average", "recompute", "first"), default=None,
                        help="BatchNorm statistics: average them, recompute them on the training data (needs -c), "
                             "or take the first checkpoint's; required when the checkpoints hold BatchNorm layers")
    parser.add_argument("--output", required=True, help="the averaged .pdparams file")
    args = parser.parse_args(argv)
    from .checkpoint_averaging import average_checkpoint_files
    from .checkpoint_files import check_weights_output

    cfg = _config(args) if args.config else None
    if os.path.isdir(args.output):
        raise ConfigError(f"--output: {args.output} is a folder; give the averaged .pdparams file's path")
    check_weights_output(args.output, "--output")  # before anything is loaded: never a training checkpoint's file
    check_writable(os.path.dirname(os.path.abspath(args.output)), "--output")
    summary = average_checkpoint_files(args.checkpoints, args.weights, args.bn, args.output, cfg)
    print(summary)


def _posthoc(argv):
    parser = _parser("Synthesise EMA weights of any length from a run's post-hoc snapshots (ema_posthoc: true).")
    parser.add_argument("--sigma-rel", "--sigma_rel", dest="sigma_rel", type=float, nargs="+",
                        help="relative EMA widths (Karras et al. 2023); default: a sweep 0.02..0.25")
    parser.add_argument("--gamma", type=float, nargs="+", help="power-function exponents instead of sigma_rel")
    parser.add_argument("--snapshots", default=None, help="snapshot folder (default <output>/<name>/posthoc)")
    parser.add_argument("--at", type=int, default=None, help="synthesise at this update (default: the last snapshot)")
    parser.add_argument("--update_bn", action="store_true", help="recompute BatchNorm statistics for each")
    parser.add_argument("--eval", action="store_true", help="evaluate each and report the best")
    args = parser.parse_args(argv)
    cfg = _config(args)
    from .builders import run_name
    from .posthoc_tool import parse_profiles, posthoc_weights

    run_dir = os.path.join(cfg["output_dir"], run_name(args.config))
    snapshots = args.snapshots or os.path.join(run_dir, "posthoc")
    profiles, explicit = parse_profiles(args.sigma_rel, args.gamma)
    results, left_out = posthoc_weights(cfg, run_dir, snapshots, profiles, args.at, args.update_bn, args.eval,
                                        explicit)
    if left_out:
        print(f"left out of the sweep (beyond what the snapshots express): sigma_rel "
              f"{', '.join(f'{s:g}' for s in left_out)}")
    print(f"{'sigma_rel':>9}  {'gamma':>7}  {'accuracy':>8}  weights (synthesised at update {results[0][4]})")
    for sigma_rel, gamma, path, accuracy, _ in results:
        shown = f"{accuracy:>8.4f}" if accuracy is not None else f"{'-':>8}"
        print(f"{sigma_rel:>9.4g}  {gamma:>7.2f}  {shown}  {path}")
    if args.eval:
        best = max(results, key=lambda r: r[3])
        print(f"best: sigma_rel {best[0]:.4g} (gamma {best[1]:.2f}), accuracy {best[3]:.4f}: {best[2]}")


def train_main(argv=None):
    return _run(_train, argv)


def eval_main(argv=None):
    return _run(_eval, argv)


def export_main(argv=None):
    return _run(_export, argv)


def average_main(argv=None):
    return _run(_average, argv)


def posthoc_main(argv=None):
    return _run(_posthoc, argv)
