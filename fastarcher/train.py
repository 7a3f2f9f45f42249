"""Entry point: parse the config, build the trainer, run, save, clean up.

    python -m fastarcher.train --help
    python -m fastarcher.train --algo archer --config configs/tiny_cpu.yaml
    torchrun --standalone --nproc_per_node=2 -m fastarcher.train --algo archer --config configs/tiny_cpu.yaml

A `--config` preset supplies the defaults; every other flag overrides it. The config is validated
before any work starts (before the process group, the model and the run folder): a bad value stops
the run with one line naming the field, printed by rank 0 only, and exit status 1.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import sys
import time
import traceback

import tyro
import yaml

from fastarcher.config import TrainConfig, load_preset, to_dict


def launch_rank() -> int:
    """This process's rank under torchrun (0 without it), known before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def preset_path(argv: list[str]) -> str | None:
    """The value of --config in argv (both `--config X` and `--config=X`), read before tyro parses.

    One preset only: with two, one would apply while the run's config.yaml named the other."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    if len(paths) > 1:
        raise ValueError(f"--config is given {len(paths)} times ({', '.join(paths)}): pass one preset and "
                         f"override its values with flags")
    return paths[0] if paths else None


def rank0_output_only() -> contextlib.AbstractContextManager:
    """Every rank parses the same argv to the same verdict: only rank 0 prints help and usage errors."""
    stack = contextlib.ExitStack()
    if launch_rank() != 0:
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def flag_given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def parse_config(argv: list[str]) -> TrainConfig:
    path = preset_path(argv)
    default = load_preset(path) if path else TrainConfig()
    with rank0_output_only():
        cfg = tyro.cli(TrainConfig, default=default, args=argv, description=__doc__.split("\n\n")[0])
    if cfg.algo == "sft" and flag_given(argv, "--iterations"):
        raise ValueError("iterations has no effect with algo 'sft' (it runs warm_start.steps supervised steps, then "
                         "one evaluation): drop --iterations and set --warm-start.steps")
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Every check that needs no model: fields and cross-field rules, then the chosen env's longest
    observation and action in tokens of the policy's tokenizer (built in, or read from model.path)."""
    from fastarcher.envs import token_sizes
    from fastarcher.chat import dialogue_format, stop_id_of
    from fastarcher.dist import wants_cuda
    from fastarcher.model import attention_implementation, encode, load_tokenizer

    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    # refuses flash-attn where it cannot run, before any work
    attention_implementation(cfg.model.attn_implementation, "cuda" if wants_cuda(cfg.device) else "cpu")
    try:
        tokenizer = load_tokenizer(cfg.model)
        fmt = dialogue_format(tokenizer, cfg.model.chat_template, cfg.model.system_prompt)
        stop_id_of(tokenizer, fmt)
    except (OSError, ValueError, ImportError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"model.path ({cfg.model.path!r}): cannot use its tokenizer: {reason}") from None
    cfg.check_env_fits(token_sizes(cfg.env, lambda text: encode(tokenizer, text), fmt.wrap_encoder(tokenizer)))


def config_exit(error: Exception) -> SystemExit:
    """Exit status 1 with the message on rank 0; the other ranks, which reached the same verdict, exit
    without repeating it, after rank 0 (under torchrun)."""
    from fastarcher.dist import let_rank0_report_first

    let_rank0_report_first()
    return SystemExit(f"config error: {error}" if launch_rank() == 0 else 1)


def main(argv: list[str] | None = None) -> dict:
    from fastarcher.dist import exit_with_launcher

    exit_with_launcher()  # first: a worker must never outlive a killed torchrun
    if not faulthandler.is_enabled():
        faulthandler.enable()  # a crash in native code (SIGSEGV, SIGABRT) prints where Python was
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        check_config(cfg)
    except ValueError as error:
        raise config_exit(error) from None

    import torch.distributed

    from fastarcher.dist import init_distributed, shutdown_distributed

    info = init_distributed(cfg.device)
    try:
        summary = run(cfg, info)
    except BaseException as error:
        if info.distributed and torch.distributed.is_initialized():  # peers may wait in a collective
            stop_every_rank(error, info.rank)  # never returns
        raise
    shutdown_distributed()  # success only: a barrier here would hang beside a failed peer
    return summary


def run(cfg: TrainConfig, info) -> dict:
    """Validate, claim the run folder, train, save, write the summary; raises SystemExit(message) for the
    errors every rank meets alike (config, run folder, checkpoint, numerical, stop signal)."""
    from fastarcher.checkpoint import CheckpointError
    from fastarcher.dist import broadcast_object, let_rank0_report_first
    from fastarcher.guards import NonFiniteLossError
    from fastarcher.run_folder import RunLock, run_folder_problem
    from fastarcher.trainer import Trainer

    try:
        cfg.validate(world_size=info.world_size)
    except ValueError as error:
        raise SystemExit(f"config error: {error}") from None
    # Rank 0 checks and locks the folder before the model is built; every rank learns the outcome.
    lock = RunLock(cfg.log.run_dir)
    problem = (run_folder_problem(cfg.log.run_dir) or lock.acquire()) if info.is_main else None
    problem = broadcast_object(problem)
    if problem:
        let_rank0_report_first()
        raise SystemExit(f"run folder error: {problem}")
    try:
        try:
            trainer = Trainer(cfg, info)
        except ValueError as error:
            raise config_exit(error) from None
        if info.is_main:
            (trainer.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        started = time.perf_counter()
        try:
            summary = trainer.fit()
            trainer.save_final()
        except BaseException as error:
            trainer.logger.close()  # stop the progress display before the error is printed
            if isinstance(error, (CheckpointError, NonFiniteLossError)):  # raised on every rank alike
                kind = "checkpoint" if isinstance(error, CheckpointError) else "numerical"
                raise SystemExit(f"{kind} error: {error}") from None
            raise
        trainer.finish(summary)
        summary["wall_seconds"] = time.perf_counter() - started
        if info.is_main:
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            trainer.logger.print(format_summary(summary, str(trainer.run_dir)))
        return summary
    finally:
        lock.release()


def stop_every_rank(error: BaseException, rank: int) -> None:
    """One line for `error`, then end this rank without waiting for the others.

    A SystemExit message is met by every rank alike and printed by rank 0 only. Anything else happened on
    this rank alone (its traceback is printed for a bug), or is a collective failing because a peer went
    away; the peer said why, this rank only says that it stops.
    """
    from fastarcher.dist import exit_now, peer_failure

    if isinstance(error, SystemExit):
        message, status = (error.code, 1) if isinstance(error.code, str) else (None, error.code or 0)
        if message and rank == 0:
            print(message, file=sys.stderr)
    elif isinstance(error, KeyboardInterrupt):
        print(f"[rank {rank}] interrupted (SIGINT); nothing saved", file=sys.stderr)
        status = 130
    elif peer_failure(error):
        print(f"[rank {rank}] stopping: another process of the run failed (its message is above): "
              f"{_last_line(error)}", file=sys.stderr)
        status = 1
    else:
        traceback.print_exception(error)
        print(f"error on rank {rank}: {type(error).__name__}: {_last_line(error)}; stopping every process",
              file=sys.stderr)
        status = 1
    exit_now(status)


def _last_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else ""


def format_summary(summary: dict, run_dir: str) -> str:
    lines = ["", "[bold]summary[/bold]"]
    for key, value in summary.items():
        lines.append(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    lines.append(f"  run folder: {run_dir} (metrics.jsonl, learning_curve.png, config.yaml, checkpoints/)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    # Everything is written and closed by now. Skip the interpreter's teardown: destroying the process
    # group's C++ objects at exit sometimes aborted a finished run under torchrun ("terminate called
    # without an active exception", SIGABRT, 2 of ~40 runs of the slow suite), which fails the launch.
    from fastarcher.dist import exit_now

    exit_now(0)
