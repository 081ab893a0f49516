"""The trainer that `train` and `finetune` share: the command's start-up (config, refusals, ranks),
resume checks, and the loop (`Trainer`: resume, preemption, checkpoints, metrics, ledger). What is
trained comes from a task: `pretrain.Pretrain` (llara-dist train), `retrieval.finetune.Finetune`.

Ranks come from whichever launcher started the process (distributed.dist_env). The global
batch (rows per optimizer step) is split into micro_batch x grad_accum x world; a split
that does not divide is refused before any heavy work.

Starting in a run folder that holds a checkpoint resumes from `latest`. SIGTERM or
SIGUSR1 make every rank save at the next step boundary and exit with status 42
(preempt.PREEMPTED_EXIT: "checkpoint saved, requeue me"), rank 0 leaving run_dir/PREEMPTED
for launchers that do not pass the status on (launch/torchrun.sh). Exit 2: refused configuration.
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llara_dist import patches
from llara_dist.config import RunConfig, config_help, load_config, save_config, to_dict
from llara_dist.errors import UserError
from llara_dist.train.checkpoint import UNIVERSAL
from llara_dist.train.distributed import BatchPlan, batch_plan, dist_env
from llara_dist.train.trackers import check_installed


def configure(parser, config_cls=RunConfig) -> None:
    parser.epilog = config_help(config_cls)
    parser.add_argument("--config", help="run config YAML (train: RunConfig, finetune: FinetuneRunConfig); "
                                         "key=value overrides follow")
    parser.add_argument("--ledger", action="store_true",
                        help="record the document keys each rank consumed at each step (ledger-rankN.jsonl)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=2e-5")


def start(args, config_cls, task_cls, command: str) -> int:
    """Shared by `train` and `finetune`: load and check the config, join the ranks, fit the task."""
    # Refusals (UserError) reach the command line, which prints them and exits 2: all of them before any
    # process group, so that no rank waits in a collective for one that is gone.
    cfg = load_config(config_cls, args.config, args.overrides)
    found = patches.problems()
    if found:  # before any work: a renamed third-party internal would otherwise fail deep in a step
        raise UserError("the installed packages lack what llara_dist/patches.py relies on:\n  - "
                        + "\n  - ".join(found))
    if args.ledger:
        cfg.train.ledger = True
    env = dist_env()
    plan = batch_plan(cfg.train.global_batch, cfg.train.micro_batch, env.world)
    require_inputs(cfg)
    tokenizer_path(cfg)
    check_attention(cfg)
    check_installed(cfg.train.trackers)
    if env.rank == 0:
        for caveat in caveats(cfg):
            print(f"llara-dist {command}: warning: {caveat}", file=sys.stderr)
    saved_world = check_resume(cfg, plan)
    task = task_cls(cfg, plan)  # reads and checks its data: a refusal comes before a long conversion
    universal_checkpoint(cfg, plan, env.rank, saved_world)
    from llara_dist.train.distributed import init_distributed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed's ZeRO-3 calls torch.distributed functions that torch marks deprecated, once per call
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)
    init_distributed(env, cfg.train.collective_timeout_s)
    return Trainer(cfg, env.rank, plan, task).fit()


def require_inputs(cfg) -> None:
    """Name what a run needs and lacks, before the tokenizer search looks past it."""
    problems = []
    if not cfg.model.path:
        problems.append("model.path: not set (a local model folder, or a config .json for a random model; "
                        "`llara-dist init-model` writes a small one)")
    elif not Path(cfg.model.path).exists():
        problems.append(f"model.path={cfg.model.path}: no such folder or file")
    data = getattr(cfg, "data", None)  # fine-tuning reads finetune.data, checked as it is read
    if data is not None and not data.shards:
        problems.append("data.shards: not set (the folder `llara-dist prep --out` wrote)")
    elif data is not None and "://" not in data.shards and not data.shards.startswith("pipe:") \
            and not (Path(data.shards) / "manifest.json").is_file():
        problems.append(f"data.shards={data.shards}: no manifest.json there (not a folder `llara-dist prep` wrote)")
    if problems:
        raise UserError("cannot start:\n  - " + "\n  - ".join(problems))


def check_attention(cfg) -> None:
    """The attention path must run forward and backward on this device (flex has no CPU backward)."""
    from llara_dist.kernels import registry
    from llara_dist.model.decoder import default_device, resolve_dtype

    device = default_device()
    registry.check_path(cfg.model.attn, device, backward=True, dtype=resolve_dtype(cfg.model.dtype, device))


def caveats(cfg) -> list[str]:
    """Settings that are valid but cannot do what they seem to."""
    t = cfg.train
    out = []
    if t.warmup_steps >= t.steps:
        out.append(f"train.warmup_steps={t.warmup_steps} >= train.steps={t.steps}: the learning rate never "
                   f"reaches train.lr={t.lr:g} (it ends at {t.lr * t.steps / (t.warmup_steps + 1):.2g}); "
                   f"set train.warmup_steps below {t.steps}")
    if t.ckpt_every > t.steps:
        out.append(f"train.ckpt_every={t.ckpt_every} > train.steps={t.steps}: the only checkpoint is the last "
                   f"step's, so a preemption before it loses the whole run")
    return out


def checkpoints(cfg: RunConfig, rank: int = 0):
    from llara_dist.train.checkpoint import CheckpointManager

    return CheckpointManager(Path(cfg.run_dir) / "checkpoints", cfg.train.keep_checkpoints, rank)


def check_resume(cfg: RunConfig, plan: BatchPlan) -> int | None:
    """Refuse to resume a checkpoint this start cannot take up (another global batch or ZeRO stage; another
    world size without logical data streams); the number of ranks that wrote it (None: a fresh run)."""
    manager = checkpoints(cfg)
    tag = manager.latest()
    if tag is None:
        return None
    loop = manager.read_loop_state(tag, rank=0)
    stage = loop["config"]["train"].get("zero_stage", 3)  # checkpoints from before train.zero_stage: ZeRO-3
    if stage != cfg.train.zero_stage:
        raise UserError(f"{manager.folder / tag}: written with train.zero_stage={stage}, and this start has "
                         f"train.zero_stage={cfg.train.zero_stage}: DeepSpeed lays out its shards differently "
                         f"per stage, so it is refused. Start with train.zero_stage={stage}, or use a new run_dir")
    saved = loop["plan"]
    written = (f"{manager.folder / tag}: written by {saved['world']} rank(s) with global batch "
               f"{saved['global_batch']} (micro_batch {saved['micro_batch']} x grad_accum {saved['grad_accum']} "
               f"x world {saved['world']})")
    if saved["global_batch"] != plan.global_batch:
        raise UserError(f"{written}; this start has global batch {plan.global_batch}. Resuming would change the "
                        f"per-step batch, so it is refused: start with train.global_batch={saved['global_batch']}, "
                        f"or use a new run_dir")
    data = getattr(cfg, "data", None)  # fine-tuning: a cursor over examples per rank
    if saved["world"] != plan.world and (data is None or not (data.streams or data.reset_cursor)):
        how = ("fine-tuning resumes on the world size that saved" if data is None else
               "its data cursor is one reader's per rank and worker, which another world size cannot take up: "
               "a run with data.streams can (docs/data-stream.md), or set data.reset_cursor=true to restart "
               "the data order")
        raise UserError(f"{written}; this start has {plan.world} rank(s): {how}; start {saved['world']} rank(s), "
                        f"or use a new run_dir")
    return saved["world"]


def universal_checkpoint(cfg, plan: BatchPlan, rank: int, saved_world: int | None) -> None:
    """Resuming on another world size: the latest checkpoint in DeepSpeed's universal layout. Rank 0
    converts it (once; `llara-dist convert-checkpoint` may have done it ahead) while the others wait for
    the folder, before any process group (a conversion of a large model outlasts a collective's timeout)."""
    import time

    if saved_world is None or saved_world == plan.world:
        return
    manager = checkpoints(cfg, rank)
    tag = manager.latest()
    if rank == 0:
        print(f"llara-dist: converting {manager.folder / tag} for {plan.world} rank(s) (DeepSpeed universal "
              f"checkpoint)", file=sys.stderr)
        manager.to_universal(tag)
        return
    deadline = time.monotonic() + cfg.train.collective_timeout_s
    while not (manager.folder / (tag + UNIVERSAL)).is_dir():
        if time.monotonic() > deadline:
            raise UserError(f"{manager.folder / (tag + UNIVERSAL)}: not written by rank 0 within "
                            f"train.collective_timeout_s={cfg.train.collective_timeout_s}")
        time.sleep(1.0)


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # real tokens consumed, all ranks
    docs: int = 0  # documents consumed, all ranks


class Trainer:
    def __init__(self, cfg, rank: int, plan: BatchPlan, task):
        self.cfg, self.rank, self.plan = cfg, rank, plan
        self.task = task
        self.run_dir = Path(cfg.run_dir)

    def fit(self) -> int:
        from llara_dist.model.decoder import default_device, load_model, resolve_dtype
        from llara_dist.prompts import add_special_tokens, prompt_tokens, resolve_preset
        from llara_dist.tokenizer import load_tokenizer, pad_id
        from llara_dist.train.checkpoint import rng_state
        from llara_dist.train.engine import build_engine, deepspeed_config, zero3_loading
        from llara_dist.train.metrics import Console, MetricsLog, StepTimer, flop_rates, peak_flops
        from llara_dist.train.preempt import PREEMPTED_EXIT, Preemption, clear_preempted, mark_preempted

        cfg, plan, rank, task = self.cfg, self.plan, self.rank, self.task
        console = Console(self.run_dir, enabled=rank == 0)  # stderr, and run_dir/train.log
        preemption = Preemption()  # before the slow start: a signal during loading is not lost
        if rank == 0:
            clear_preempted(self.run_dir)  # this run's own exit status decides from here
        seed_everything(cfg.train.seed)
        preset = resolve_preset(cfg.objective)
        tokenizer = load_tokenizer(tokenizer_path(cfg))
        add_special_tokens(tokenizer, preset)
        prompt = prompt_tokens(tokenizer, preset)
        # the data first: bad data fails before the model loads
        loader = task.loader(tokenizer, prompt, pad_id(tokenizer), plan, rank)
        ds_config = deepspeed_config(cfg.train, plan, resolve_dtype(cfg.model.dtype, default_device()))
        manager = checkpoints(cfg, rank)
        tag = manager.latest()
        before = manager.read_loop_state(tag, rank=0)["plan"] if tag is not None else vars(plan)
        if before["world"] != plan.world:  # another world size: DeepSpeed re-partitions a universal checkpoint
            ds_config["checkpoint"] = {"load_universal": True}
        with zero3_loading(ds_config):
            model = load_model(cfg.model, tokenizer, preset)  # resized for the preset's tokens
        engine = build_engine(model, task.engine_train, ds_config)

        state = LoopState()
        if tag is not None:
            saved = manager.load(engine, tag, before["world"], plan.world)
            state = LoopState(**saved["loop"])
            loader.load_state_dict(saved.get("data_all", saved["data"]))
            console.print(f"resumed from {manager.folder / tag} at step {state.step}{plan_change(before, plan)}")
        if rank == 0:
            self._describe_run(tokenizer, task.data_identity(loader))
        ledger = self._open_ledger(state.step) if cfg.train.ledger else None
        log = MetricsLog(cfg, console, enabled=rank == 0, resume_step=state.step, task_metrics=task.METRICS)
        peak = peak_flops(cfg.train.peak_tflops)
        rates = flop_rates(engine)  # which weights train (LoRA) decides what a token costs

        def save() -> None:
            loop = {"loop": vars(state), "data": loader.state_dict(), "rng": rng_state(),
                    "plan": vars(plan), "config": to_dict(cfg)}
            manager.save(engine, state.step, loop)

        saved_step = state.step if tag is not None else -1
        batches = iter(loader)
        timer = StepTimer()
        try:
            while state.step < cfg.train.steps:
                if preemption.should_stop(engine.device):
                    if saved_step != state.step:
                        save()
                    if rank == 0:
                        mark_preempted(self.run_dir, state.step)  # for launchers that lose the status
                        if preemption.interrupted:
                            console.print(f"Ctrl-C: saved step {state.step}; the same command resumes from it "
                                          f"(exit {PREEMPTED_EXIT})")
                        else:
                            console.print(f"{preemption.signal_name or 'a signal on another rank'}: saved step "
                                          f"{state.step}, exiting with {PREEMPTED_EXIT} (requeue to resume)")
                    return PREEMPTED_EXIT
                micro = [next(batches) for _ in range(plan.grad_accum)]
                lr = engine.get_lr()[0]
                result = task.step(engine, micro, preset, plan.world)
                state.step += 1
                state.tokens += int(result["real_tokens"])
                state.docs += int(result["docs"])
                dt = timer.lap()
                flops = rates.step(int(result["real_tokens"]), int(result["pairs"]),
                                   int(result.get("head_positions", 0)))  # 0: a task without the LM head
                log.log({"step": state.step, "loss": result["loss"], **{k: result[k] for k in task.METRICS},
                         "lr": lr, "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                         "docs": int(result["docs"]), "real_tokens": int(result["real_tokens"]),
                         "fill": result["real_tokens"] / result["slots"], "tokens_per_s": result["real_tokens"] / dt,
                         "mfu": flops / (dt * plan.world * peak) if peak else None,
                         "tokens_total": state.tokens, "docs_total": state.docs, "step_s": dt})
                if ledger is not None:
                    ledger.write(json.dumps({"step": state.step, "rank": rank,
                                             "keys": [k for b in micro for k in b.keys]}) + "\n")
                    ledger.flush()
                if state.step % cfg.train.ckpt_every == 0 or state.step == cfg.train.steps:
                    save()
                    saved_step = state.step
                preemption.step_done(state.step)
        finally:
            preemption.ignore_from_now()
            log.close()
            if ledger is not None:
                ledger.close()
        return 0

    def _describe_run(self, tokenizer, data_identity: dict) -> None:
        """Make the run folder self-describing: resolved config, tokenizer, data identity."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        tokenizer.save_pretrained(self.run_dir / "tokenizer")
        info = {"plan": vars(self.plan), **data_identity, "model": self.cfg.model.path}
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")

    def _open_ledger(self, resume_step: int):
        from llara_dist.train.metrics import torn_line_dropped, truncate_after

        path = self.run_dir / f"ledger-rank{self.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = truncate_after(path, resume_step)  # steps after the checkpoint are redone
        if torn is not None:  # every rank keeps its own ledger, so each says so itself
            print(f"llara-dist: {torn_line_dropped(path, torn)}", file=sys.stderr, flush=True)
        return open(path, "a")


def plan_change(before: dict, plan: BatchPlan) -> str:
    """What a resume changed of the batch split, said in a clause ('' for nothing)."""
    changes = [f"{name} {before[key]} -> {getattr(plan, key)}" for name, key in
               (("world", "world"), ("micro-batch", "micro_batch"), ("grad accumulation", "grad_accum"))
               if before[key] != getattr(plan, key)]
    if not changes:
        return ""
    return f": {', '.join(changes)}; the same {plan.global_batch}-row global batches continue"


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _is_tokenizer_dir(path: str) -> bool:
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def tokenizer_path(cfg: RunConfig) -> str:
    """The tokenizer: train.tokenizer, else the model folder, else the one the manifest names."""
    from llara_dist.data.shards import read_manifest

    if cfg.train.tokenizer and not _is_tokenizer_dir(cfg.train.tokenizer):
        what = "holds no tokenizer (tokenizer.json or tokenizer_config.json)" if Path(cfg.train.tokenizer).is_dir() \
            else "no such folder"
        raise UserError(f"train.tokenizer={cfg.train.tokenizer}: {what}")
    candidates = [cfg.train.tokenizer, cfg.model.path]
    if getattr(cfg, "data", None) is not None and cfg.data.shards:  # finetune configs have no shards
        try:
            candidates.append(read_manifest(cfg.data.shards).get("tokenizer", {}).get("name_or_path", ""))
        except (FileNotFoundError, ValueError):
            pass
    for c in candidates:
        if c and _is_tokenizer_dir(c):
            return c
    raise UserError(f"no tokenizer found in {' or '.join(filter(None, candidates))}: set train.tokenizer to "
                    f"the tokenizer folder the shards were prepared with")

