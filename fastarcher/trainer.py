"""The training loop: rollout → algorithm update → log → evaluate → save.

    torchrun --standalone --nproc_per_node=2 -m fastarcher.train --algo archer --config configs/tiny_cpu.yaml

Each iteration plays `rollout.num_envs` episodes with the current policy (each rank its share), turns
them into transitions and hands both to the algorithm chosen by `--algo` (fastarcher/algos/registry.py):
ArCHer (off-policy critic from a replay buffer, then actor steps; fastarcher/algos/archer.py), REINFORCE
or filtered BC. The loop never looks inside the algorithm: the algorithm gets an `AlgoContext` (policy
side, guard, random streams) and gives back its checkpoint parts. Policy (and critic) are FSDP2-sharded
when there are several ranks.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastarcher.actor import Actor
from fastarcher.algos.base import AlgoContext, IterationBatch
from fastarcher.algos.filtered_bc import masked_bc_loss
from fastarcher.algos.on_policy import policy_step
from fastarcher.algos.registry import build_algorithm
from fastarcher.checkpoint import CheckpointError, Checkpointer, ModelState, OptimizerState
from fastarcher.config import TrainConfig, to_dict
from fastarcher.dist import DistInfo, on_main, seed_everything
from fastarcher.envs import make_env, token_sizes
from fastarcher.envs.runner import BatchedEnvRunner
from fastarcher.guards import StepGuard
from fastarcher.logging import RunLogger, plot_learning_curves
from fastarcher.metrics import MetricBag, reduce_metrics
from fastarcher.chat import dialogue_format, stop_id_of
from fastarcher.model import encode, enable_activation_checkpointing, load_policy, transformer_blocks
from fastarcher.lora import apply_lora
from fastarcher.parallel import data_parallel_mesh, mixed_precision_policy, parallelize
from fastarcher.random_streams import RandomStreams
from fastarcher.rollout.base import ActionConstraint
from fastarcher.rollout.collect import RolloutResult, oracle_picker, play_episodes, random_picker
from fastarcher.rollout.hf_engine import HFEngine
from fastarcher.traces.trainer_hooks import TraceRecorder

EVAL_SEED_OFFSET = 1_000_000_007
"""Evaluation episodes use seeds far from the training stream, the same ones at every evaluation."""


@dataclass
class Progress:
    """Where the run stands (a run-wide checkpoint part): iterations done, the random-policy baseline,
    the evaluation before training and the latest evaluation."""

    iteration: int = 0
    random_baseline: dict[str, float] | None = None
    start_metrics: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None

    checkpoint_scope = "run"

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "random_baseline": self.random_baseline,
                "start_metrics": self.start_metrics, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict) -> None:
        if type(state["iteration"]) is not int or state["iteration"] < 0:
            raise ValueError(f"progress iteration must be a non-negative integer, got {state['iteration']!r}")
        for key in ("random_baseline", "start_metrics", "last_eval"):
            value = state[key]
            if value is not None and not (isinstance(value, dict) and all(
                    isinstance(k, str) and isinstance(v, (int, float)) for k, v in value.items())):
                raise ValueError(f"progress {key} is not a mapping of metric names to numbers")
        self.iteration, self.random_baseline = state["iteration"], state["random_baseline"]
        self.start_metrics, self.last_eval = state["start_metrics"], state["last_eval"]


class Trainer:
    """The loop: rollout → `algorithm.update` → log → evaluate → save. What is learned and how lives in
    the algorithm (fastarcher/algos/); the loop owns the policy side (`Actor`), the environments, the
    random streams, evaluation, logging and checkpoints."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.run_dir = Path(cfg.log.run_dir)
        cfg.validate(world_size=info.world_size)  # the entry point's checks, for a Trainer built from Python
        # Identical init on every rank (FSDP2 keeps each rank's shard of its own full copy).
        seed_everything(cfg.seed)
        policy, tokenizer = load_policy(cfg.model, self.device.type)
        self.format = dialogue_format(tokenizer, cfg.model.chat_template, cfg.model.system_prompt)
        sizes = token_sizes(cfg.env, lambda text: encode(tokenizer, text), self.format.wrap_encoder(tokenizer))
        cfg.check_env_fits(sizes)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.stop_id = stop_id_of(tokenizer, self.format)
        engine_model = copy.deepcopy(policy)
        self.policy = policy.to(self.device)
        mesh = data_parallel_mesh(self.device, info.world_size) if info.distributed else None
        if cfg.model.lora.enabled:
            apply_lora(self.policy, cfg.model.lora)  # after the engine's copy: the engine keeps the plain model
        if cfg.model.activation_checkpointing:
            enable_activation_checkpointing(self.policy)  # the training copy only: the engine never backpropagates
        mixed = mixed_precision_policy(cfg.model.mixed_precision, self.device) if mesh is not None else None
        if mesh is not None:
            parallelize(self.policy, transformer_blocks(self.policy), mesh, mixed,
                        offload=cfg.model.cpu_offload and self.device.type == "cuda")
        self.policy.train()
        optim = cfg.optim
        trainable = [p for p in self.policy.parameters() if p.requires_grad]  # the adapters alone with LoRA
        self.actor_opt = torch.optim.AdamW(trainable, lr=optim.actor_lr, weight_decay=optim.weight_decay)
        self.progress = Progress()
        self.logger = RunLogger(
            self.run_dir, is_main=info.is_main, total_iterations=cfg.iterations, progress=cfg.log.progress,
            wandb_config=to_dict(cfg) if cfg.log.wandb else None, wandb_project=cfg.log.wandb_project,
        )
        if cfg.rollout.engine == "sglang":
            self.engine = self._sglang_engine(engine_model)
            del engine_model  # the engine loads its own copy: dummy weights, then the first sync
        else:
            if mixed is not None:  # sample in the dtype the policy computes in: half the copy's bytes
                engine_model.to(mixed.param_dtype)
            self.engine = HFEngine(engine_model, pad_id=self.pad_id, device=self.device, max_batch=cfg.rollout.max_batch)
        self.constraint = None
        if cfg.rollout.constrain_actions:
            choices = make_env(cfg.env).action_choices()
            sequences = [encode(tokenizer, a) + [self.stop_id] for a in choices]
            self.constraint = ActionConstraint(sequences, len(tokenizer))  # fits max_new_tokens (check_env_fits)
        self.actor = Actor(self.policy, self.actor_opt, self.engine, rollout_cfg=cfg.rollout, pad_id=self.pad_id,
                           stop_id=self.stop_id, constraint=self.constraint, device=self.device,
                           fused_head=cfg.model.fused_head)

        # Per-rank random streams, all derived from the one seed: fresh-action sampling, replay sampling,
        # demonstration picks, minibatch orders of on-policy updates.
        self.streams = RandomStreams(cfg.seed, info.rank, self.device)
        self.sample_gen, self.py_rng, self.cpu_gen = self.streams.sample_gen, self.streams.py_rng, self.streams.cpu_gen

        if cfg.model.mixed_precision == "bf16" and mesh is None:
            self.logger.print("note: model.mixed_precision bf16 applies under torchrun (FSDP2); this single process "
                              "trains in model.dtype")
        if cfg.model.cpu_offload and (mesh is None or self.device.type != "cuda"):
            self.logger.print("note: model.cpu_offload applies under torchrun on CUDA (FSDP2); ignored here")
        log = lambda message: self.logger.print(message)  # noqa: E731 - late-bound: a replaced logger.print is used
        self.guard = StepGuard(cfg.guard, log=log)
        def make_policy() -> torch.nn.Module:
            with torch.random.fork_rng(devices=[]):  # building must not move the run's random streams
                model, _ = load_policy(cfg.model, self.device.type)
            return model.to(self.device)

        def shard(module: torch.nn.Module, blocks: list) -> torch.nn.Module:
            return parallelize(module, blocks, mesh) if mesh is not None else module

        self.algo_ctx = AlgoContext(cfg=cfg, actor=self.actor, guard=self.guard, streams=self.streams, info=info,
                                    vocab_size=len(tokenizer), mesh=mesh, log=log, make_policy=make_policy,
                                    shard=shard)
        self.algorithm = build_algorithm(self.algo_ctx)

        self.envs_per_rank = cfg.rollout.num_envs // info.world_size
        self.runner = BatchedEnvRunner(cfg.env, self.envs_per_rank)
        self.eval_runner = BatchedEnvRunner(cfg.env, cfg.eval.episodes // info.world_size, split="eval")
        wants_greedy = getattr(self.algorithm, "greedy_baseline", False)
        self.greedy_runner = (BatchedEnvRunner(cfg.env, self.envs_per_rank // cfg.rollout.group_size)
                              if wants_greedy else None)
        parts = {
            "policy": ModelState(self.policy, trainable_only=cfg.model.lora.enabled), "actor_opt": OptimizerState(self.policy, self.actor_opt, "actor_opt", log),
            **(self.algorithm.parts() if self.algorithm is not None else {}),
            "rng": self.streams, "runner": self.runner, "eval_runner": self.eval_runner,
            **({"greedy_runner": self.greedy_runner} if self.greedy_runner is not None else {}),
            "progress": self.progress, "guard": self.guard, "logger": self.logger,
        }
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, parts, config=to_dict(cfg),
                                         device=self.device.type, rank=info.rank, world_size=info.world_size, log=log)
        # Influence / entropy traces of the actor step (docs/traces.md); inert, no hooks, when both are off.
        self.actor.traces = TraceRecorder(cfg.trace, self.policy, self.run_dir, info, tokenizer, pad_id=self.pad_id,
                                          constraint=self.constraint, log=log)

    @property
    def iteration(self) -> int:
        return self.progress.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.progress.iteration = value

    # ----------------------------------------------------------------------------------------------
    # playing

    def train_seeds(self) -> list[int]:
        """This rank's env seeds for the iteration: rollout.group_size episodes share each seed (a group)."""
        size = self.cfg.rollout.group_size
        # Dataset envs read a seed as a place in their record order, which must have no gaps.
        stride = self.cfg.rollout.num_envs // size if getattr(self.runner.envs[0], "dense_seeds", False) else \
            self.cfg.rollout.num_envs
        base = self.cfg.seed * 10_000_019 + self.iteration * stride
        first = self.info.rank * self.envs_per_rank
        return [base + (first + k) // size for k in range(self.envs_per_rank)]

    def eval_seeds(self) -> list[int]:
        n = self.eval_runner.num_envs
        return [EVAL_SEED_OFFSET + self.cfg.seed * 100_003 + self.info.rank * n + k for k in range(n)]

    def play(self, runner: BatchedEnvRunner, seeds: list[int], greedy: bool) -> RolloutResult:
        engine = self.algorithm.acting_engine(self.engine) if self.algorithm is not None else self.engine
        return play_episodes(runner, seeds, tokenizer=self.tokenizer, stop_id=self.stop_id, engine=engine,
                             params=self.actor.sampling_params(greedy), generator=self.sample_gen,
                             context_tokens=self.cfg.rollout.context_tokens, kv_cache=self.cfg.rollout.kv_cache,
                             fmt=self.format)

    def sync_engine(self) -> float:
        return self.actor.sync_engine()

    def _sglang_engine(self, plain_policy):
        """One sglang engine on this rank's GPU. It reads the architecture from a config-only folder (its
        weights start as dummies and arrive by sync) and receives the plain policy's parameter names."""
        from fastarcher.rollout.buckets import tied_output_names
        from fastarcher.rollout.sglang_engine import build_sglang_engine

        folder = self.run_dir / f"engine_model_rank{self.info.rank}"
        config = copy.deepcopy(plain_policy.config)
        config.architectures = [type(plain_policy).__name__]
        config.save_pretrained(folder)
        dtype = torch.bfloat16 if self.cfg.model.mixed_precision != "off" else next(plain_policy.parameters()).dtype
        return build_sglang_engine(str(folder), weight_names=[n for n, _ in plain_policy.named_parameters()],
                                   skip_names=tied_output_names(plain_policy), dtype=dtype, device=self.device,
                                   mem_fraction=self.cfg.rollout.sglang_mem_fraction, seed=self.cfg.seed,
                                   log=lambda line: self.logger.print(line))

    # ----------------------------------------------------------------------------------------------
    # phases of a run

    def warm_start(self) -> None:
        """Supervised steps on demonstrations (random valid actions or the oracle) before RL."""
        ws = self.cfg.warm_start
        picker = oracle_picker if ws.demos == "oracle" else random_picker(self.py_rng)
        runner = BatchedEnvRunner(self.cfg.env, ws.episodes)
        seeds = [-(1 + self.info.rank * ws.episodes + k) for k in range(ws.episodes)]
        demos = play_episodes(runner, seeds, tokenizer=self.tokenizer, stop_id=self.stop_id, picker=picker,
                              context_tokens=self.cfg.rollout.context_tokens, fmt=self.format)
        transitions = demos.transitions(self.cfg.archer.gamma, self.pad_id)
        optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=ws.lr)
        keep = torch.ones(len(transitions))
        self.logger.print(f"warm start: {ws.steps} steps on {len(transitions)} {ws.demos} demonstration turns per rank")
        for step in range(ws.steps):
            bag = MetricBag()
            rows = torch.randint(len(transitions), (ws.batch_size,), generator=self.cpu_gen)
            policy_step(self.algo_ctx, transitions, rows, keep, bag, masked_bc_loss, optimizer, 1.0, sampled=False,
                        iteration=self.iteration)
            if (step + 1) % max(ws.steps // 5, 1) == 0 or step + 1 == ws.steps:
                m = reduce_metrics(bag.means(), self.info.world_size)
                self.logger.print(f"  warm start step {step + 1}/{ws.steps}  nll {m['actor/bc_loss']:.3f}")
        self.sync_engine()
        if ws.to_replay:  # validate() allows it only for an algorithm with a replay buffer
            self.algorithm.add_demonstrations(transitions)
            self.logger.print(f"warm start: {len(transitions)} demonstration turns per rank written to the replay buffer")

    def evaluate(self) -> dict[str, float]:
        was_gen = self.sample_gen.get_state()
        result = self.play(self.eval_runner, self.eval_seeds(), greedy=True)
        self.sample_gen.set_state(was_gen)  # greedy eval must not shift the training sampling stream
        return {k: v for k, v in result.stats("eval").items() if not k.startswith("count/")}

    def evaluate_random(self) -> dict[str, float]:
        rng = random.Random(self.cfg.seed + 31 * self.info.rank)
        n = self.cfg.eval.random_episodes // self.info.world_size
        seeds = [EVAL_SEED_OFFSET + self.cfg.seed * 100_003 + self.info.rank * n + k for k in range(n)]
        result = play_episodes(BatchedEnvRunner(self.cfg.env, n, split="eval"), seeds, tokenizer=self.tokenizer,
                               stop_id=self.stop_id, picker=random_picker(rng), fmt=self.format)
        stats = result.stats("random")
        return reduce_metrics({k: v for k, v in stats.items() if not k.startswith("count/")}, self.info.world_size)

    def iterate(self) -> dict[str, float]:
        """One iteration: play the training episodes, then the algorithm's update; returns its metrics."""
        bag = MetricBag()
        scale = self.cfg.optim.lr_multiplier(self.iteration, self.cfg.iterations)
        for group in self.actor_opt.param_groups if self.cfg.optim.scheduled else ():  # the critic's: its algorithm
            group["lr"] = self.cfg.optim.actor_lr * scale
        t0 = time.perf_counter()
        seeds = self.train_seeds()
        rollout = self.play(self.runner, seeds, greedy=False)
        transitions = rollout.transitions(self.cfg.archer.gamma, self.pad_id)
        greedy = None
        if self.greedy_runner is not None:  # the baseline rollout: one greedy episode per distinct seed
            greedy = self.play(self.greedy_runner, list(dict.fromkeys(seeds)), greedy=True)
        if not self.algorithm.samples_in_update:
            self.engine.sleep()  # the update trains and syncs before anything generates again
        t_rollout = time.perf_counter() - t0
        metrics = rollout.stats("rollout")
        metrics["perf/tokens_per_s"] = rollout.generated_tokens / max(t_rollout, 1e-9)
        metrics["count/rollout_engine_forwards"] = float(rollout.engine_calls)
        metrics["count/rollout_reused_tokens"] = float(rollout.reused_tokens)
        metrics["count/rollout_generated_tokens"] = float(rollout.generated_tokens)
        if greedy is not None:  # environment episodes a sample-efficiency count must include
            metrics["count/greedy_episodes"] = float(len(greedy.episodes))
        metrics.update({"time/rollout_s": t_rollout, "time/critic_s": 0.0, "time/actor_s": 0.0, "time/sync_s": 0.0})
        metrics.update(self.algorithm.update(IterationBatch(self.iteration, rollout, transitions, greedy), bag))
        metrics.update(bag.means())
        metrics.update({f"engine/{k}": v for k, v in self.engine.timings.items()})  # sglang's phases (HF: none)
        metrics.update(self.guard.metrics())
        metrics["optim/lr_scale"] = scale
        metrics["time/iteration_s"] = time.perf_counter() - t0  # the whole iteration: rollout, update, sync
        return metrics

    def fit(self) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        self.logger.print(f"fastarcher: algo={cfg.algo} env={cfg.env.name} ranks={info.world_size} "
                          f"device={self.device} policy={_count(self.policy):,} params")
        if hasattr(self.algorithm, "describe"):
            self.logger.print(self.algorithm.describe())
        resumed = self.checkpointer.restore() is not None
        if resumed:
            self.sync_engine()  # the rollout engine's copy of the restored policy
        else:
            on_main(lambda: self.logger.start_fresh(keep_earlier=cfg.checkpoint.resume == "none"),
                    f"cannot start the metrics file in {self.run_dir}", CheckpointError)
            if not self.engine.weights_valid:  # an engine that starts from dummy weights (sglang)
                self.sync_engine()
        if cfg.warm_start.steps and not resumed:
            self.warm_start()
        if self.algorithm is not None:
            self.algorithm.start(resumed)
        if cfg.algo == "sft":
            final = reduce_metrics(self.evaluate(), info.world_size)
            self.logger.log(0, final, advance=False)
            return final
        if not resumed:
            if cfg.eval.random_baseline:
                baseline = self.progress.random_baseline = self.evaluate_random()
                self.logger.print("random valid-action policy: success {:.3f} return {:+.3f}".format(
                    baseline["random/success_rate"], baseline["random/return_mean"]))
            self.progress.start_metrics = self.progress.last_eval = reduce_metrics(self.evaluate(), info.world_size)
            self.logger.log(self.iteration, self.progress.start_metrics, advance=False)
        start = self.progress.start_metrics
        run_start = time.perf_counter()
        while self.iteration < cfg.iterations:
            metrics = self.iterate()
            self.iteration += 1
            if cfg.eval.every and self.iteration % cfg.eval.every == 0 or self.iteration == cfg.iterations:
                metrics.update(self.evaluate())
            metrics = reduce_metrics(metrics, info.world_size)
            if "eval/success_rate" in metrics:
                self.progress.last_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            self.logger.log(self.iteration, metrics)
            self.checkpointer.maybe_save(self.iteration, last=self.iteration >= cfg.iterations)
        last_eval = self.progress.last_eval
        summary = {
            "start/eval_success_rate": start["eval/success_rate"],
            "final/eval_success_rate": last_eval["eval/success_rate"],
            "start/eval_return": start["eval/return_mean"],
            "final/eval_return": last_eval["eval/return_mean"],
            "train_seconds": time.perf_counter() - run_start,
        }
        if self.progress.random_baseline:
            summary["random/success_rate"] = self.progress.random_baseline["random/success_rate"]
            summary["random/return_mean"] = self.progress.random_baseline["random/return_mean"]
        return summary

    def save_final(self) -> None:
        """The end of a run: a checkpoint of the last iteration (if not saved already) and the HF export."""
        self.checkpointer.save_final(self.iteration)
        if self.cfg.checkpoint.export_hf:
            from fastarcher.export import export_policy

            out = export_policy(self.policy, self.tokenizer, self.run_dir / "hf_policy", run_config=to_dict(self.cfg))
            self.logger.print(f"export: policy saved as a Hugging Face folder in {out}")

    def finish(self, summary: dict[str, float]) -> None:
        if self.info.is_main and self.logger.history:
            rb = self.progress.random_baseline or {}
            plot_learning_curves(self.logger.history, self.run_dir / "learning_curve.png",
                                 random_success=rb.get("random/success_rate"), random_return=rb.get("random/return_mean"),
                                 title=f"{self.cfg.algo} on {self.cfg.env.name}")
        self.actor.traces.close()
        self.logger.close()


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())

