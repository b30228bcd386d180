"""Executors: where the shards of an LLM stage are computed. Stages hold the logic; executors
receive stage objects and only decide where ``stage.process_shard(ctx, shard, i)`` runs.

- ``local``: in this process, one shard after another (the engine batches within a shard).
- ``ray``: on a Ray cluster (an existing one through ``address``, or a local one started here),
  through long-lived actors that each hold their own backend (one vLLM engine per GPU, or a
  transformers / vLLM-CPU engine per CPU worker), so an engine starts once per worker, not per
  shard. The driver keeps the bookkeeping: it writes every finished shard atomically, drives the
  progress bars and collects token counts and failures into the funnel and manifest. Workers
  share the run directory (and its completion cache), so on several machines RUN_DIR must be on
  a shared filesystem.

A killed Ray run resumes like a local one: finished shards are on disk and finished
completions in the cache, whichever worker computed them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import polars as pl

from bard_data.config.executor import ExecutorConfig
from bard_data.config.safety import HUB_TOKEN_VARS
from bard_data.pipeline.context import RunContext
from bard_data.pipeline.stage import ShardedStage, ShardResult

log = logging.getLogger(__name__)


class LocalExecutor:
    kind = "local"

    def __init__(self, cfg: ExecutorConfig | None = None):
        self.cfg = cfg or ExecutorConfig()

    def map_shards(self, ctx: RunContext, stage: ShardedStage,
                   items: list[tuple[int, pl.DataFrame]]) -> Iterator[tuple[int, ShardResult]]:
        for i, shard in items:
            yield i, stage.process_shard(ctx, shard, i)

    def close(self) -> None:
        pass


class _ShardWorker:
    """A Ray actor: its own RunContext (backend, tokenizer, cache handle) over the run directory."""

    def __init__(self, recipe_data: dict, source_file: str, base_dir: str, run_dir: str, invocation: str):
        from bard_data.config import parse_recipe

        recipe = parse_recipe(recipe_data, source_file, base_dir)
        # The driver's invocation id and a slot of its own: the worker's counters go to the same
        # ledger, so a killed driver's request accounting still covers the workers.
        self.ctx = RunContext(recipe, Path(run_dir), quiet=True, invocation=invocation,
                              slot_prefix=f"ray-{os.getpid()}-")

    def process(self, stage: ShardedStage, shard: pl.DataFrame, i: int):
        before = self.ctx.llm_stats()
        res = stage.process_shard(self.ctx, shard, i)
        return res, _stats_delta(before, self.ctx.llm_stats())

    def pid(self) -> int:
        return os.getpid()


def _stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for model, s in after.items():
        b = before.get(model, {})
        out[model] = {k: (v - b.get(k, 0)) if isinstance(v, (int, float)) else v for k, v in s.items()}
    return out


class RayExecutor:
    kind = "ray"

    def __init__(self, cfg: ExecutorConfig):
        import ray

        self.cfg = cfg
        self.ray = ray
        self._started_here = False
        if not ray.is_initialized():
            kwargs = dict(cfg.init_kwargs)
            kwargs.setdefault("log_to_driver", False)
            kwargs.setdefault("include_dashboard", False)
            # Workers need the same thread and vLLM settings as the driver.
            # Never the Hub token: the cluster may be another machine; its workers use their own login.
            env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_", "HF_", "TOKENIZERS_"))
                   and k not in HUB_TOKEN_VARS}
            kwargs.setdefault("runtime_env", {"env_vars": env})
            ray.init(address=cfg.address, **kwargs)
            self._started_here = True
        self._actors: list = []
        self._actor_key: Optional[str] = None

    def _actors_for(self, ctx: RunContext) -> list:
        # One set of actors per run: a backend config shared by several stages keeps its engine.
        key = str(ctx.run_dir)
        if self._actor_key != key:
            self._kill_actors()
            remote = self.ray.remote(_ShardWorker).options(
                num_cpus=self.cfg.num_cpus_per_worker, num_gpus=self.cfg.num_gpus_per_worker, max_restarts=0
            )
            r = ctx.recipe
            self._actors = [
                remote.remote(r.model_dump(mode="json"), r.source_file, r.base_dir, str(ctx.run_dir), ctx.invocation)
                for _ in range(self.cfg.num_workers)
            ]
            self._actor_key = key
        return self._actors

    def map_shards(self, ctx: RunContext, stage: ShardedStage,
                   items: list[tuple[int, pl.DataFrame]]) -> Iterator[tuple[int, ShardResult]]:
        if not items:
            return
        ray = self.ray
        actors = self._actors_for(ctx)
        queue = list(items)
        pending: dict[Any, int] = {}
        load = {k: 0 for k in range(len(actors))}
        owner: dict[Any, int] = {}

        def submit():
            while queue:
                a = min(load, key=load.get)
                if load[a] >= self.cfg.max_in_flight:
                    return
                i, shard = queue.pop(0)
                ref = actors[a].process.remote(stage, shard, i)
                pending[ref] = i
                owner[ref] = a
                load[a] += 1

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            i = pending.pop(ref)
            load[owner.pop(ref)] -= 1
            res, stats = ray.get(ref)
            ctx.add_remote_stats(stats)
            submit()
            yield i, res

    def _kill_actors(self) -> None:
        for a in self._actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self._actors = []
        self._actor_key = None

    def close(self) -> None:
        self._kill_actors()
        if self._started_here:
            self.ray.shutdown()


def make_executor(cfg: ExecutorConfig | None):
    cfg = cfg or ExecutorConfig()
    return RayExecutor(cfg) if cfg.kind == "ray" else LocalExecutor(cfg)
