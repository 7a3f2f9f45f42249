"""Entry point: parse the config, build the trainer, run, save, clean up.

    python -m fastarcher.train --help
    python -m fastarcher.train --algo archer --config configs/tiny_cpu.yaml
    torchrun --standalone --nproc_per_node=2 -m fastarcher.train --algo archer --config configs/tiny_cpu.yaml

A `--config` preset supplies the defaults; every other flag overrides it. The config is validated
before any work starts.
"""

from __future__ import annotations

import json
import sys
import time

import tyro
import yaml

from fastarcher.config import TrainConfig, load_preset, to_dict


def preset_path(argv: list[str]) -> str | None:
    """The value of --config in argv (both `--config X` and `--config=X`), read before tyro parses."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_config(argv: list[str]) -> TrainConfig:
    path = preset_path(argv)
    default = load_preset(path) if path else TrainConfig()
    return tyro.cli(TrainConfig, default=default, args=argv, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
    except ValueError as error:
        raise SystemExit(f"config error: {error}") from None

    from fastarcher.checkpoint import CheckpointError
    from fastarcher.dist import init_distributed, shutdown_distributed
    from fastarcher.guards import NonFiniteLossError
    from fastarcher.trainer import Trainer

    info = init_distributed(cfg.device)
    try:
        try:
            cfg.validate(world_size=info.world_size)
            trainer = Trainer(cfg, info)
        except ValueError as error:
            raise SystemExit(f"config error: {error}") from None
        if info.is_main:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            (trainer.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        started = time.perf_counter()
        try:
            summary = trainer.fit()
        except (CheckpointError, NonFiniteLossError) as error:  # raised on every rank alike
            kind = "checkpoint" if isinstance(error, CheckpointError) else "numerical"
            raise SystemExit(f"{kind} error: {error}") from None
        trainer.save_final()
        trainer.finish(summary)
        summary["wall_seconds"] = time.perf_counter() - started
        if info.is_main:
            (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            trainer.logger.print(format_summary(summary, str(trainer.run_dir)))
        return summary
    finally:
        shutdown_distributed()


def format_summary(summary: dict, run_dir: str) -> str:
    lines = ["", "[bold]summary[/bold]"]
    for key, value in summary.items():
        lines.append(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    lines.append(f"  run folder: {run_dir} (metrics.jsonl, learning_curve.png, config.yaml, checkpoints/)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
