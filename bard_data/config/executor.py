"""Where the shards of an LLM stage run; not part of any fingerprint (it cannot change an output)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from bard_data.config.base import Strict
from bard_data.config.safety import ray_init_kwargs_problem


class ExecutorConfig(Strict):
    kind: Literal["local", "ray"] = "local"
    address: Optional[str] = Field(None, description="Ray cluster address ('auto', 'ray://host:10001'); none starts a local one")
    num_workers: int = Field(2, gt=0, description="Ray actors per LLM stage (e.g. one per GPU)")
    num_cpus_per_worker: float = Field(1.0, gt=0)
    num_gpus_per_worker: float = Field(0.0, ge=0, description="e.g. the tensor-parallel size of the stage's vLLM engine")
    max_in_flight: int = Field(2, gt=0, description="shards queued per worker")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra ray.init arguments (not runtime_env, "
                                        "job_config or dashboard_host: they install or run code, or open the cluster)")

    @field_validator("init_kwargs")
    @classmethod
    def _no_code_in_init_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        problem = ray_init_kwargs_problem(v)
        if problem:
            raise ValueError(problem)
        return v
