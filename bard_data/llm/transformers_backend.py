"""Local transformers backend: batched ``generate`` on the CPU (tests, tiny demos).

Sampling is per row: each row draws from its own generator, seeded by its request
(``llm/seeded.py``), so a completion does not depend on the batch it lands in (another
``batch_size``, a resume after a kill). Measured on the CPU in float32 (tiny Qwen3, SmolLM2-135M):
a request alone and inside padded batches of other sizes and neighbours got the same text.
"""

from __future__ import annotations

import logging

from bard_data.errors import BackendError
from bard_data.llm.base import LLM, ChatRequest, Completion, SamplingConfig, request_seed

log = logging.getLogger(__name__)


class TransformersLLM(LLM):
    kind = "transformers"

    def __init__(self, model: str, model_path: str, dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 16, trust_remote_code: bool = False):
        super().__init__(model)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            self.hf_model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
            ).to(device)
        except Exception as exc:
            raise BackendError(f"transformers backend: cannot load model '{model}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        self.hf_model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        self.batch_size = batch_size

    def _generate(self, requests: list[ChatRequest], sampling: SamplingConfig, seed: int) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList

        from bard_data.llm.seeded import RowSeededSampler

        out: list[Completion] = []
        prompts = [
            self.tokenizer.apply_chat_template(r.message_dicts(), tokenize=False, add_generation_prompt=True)
            for r in requests
        ]
        eos_ids = self.hf_model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {self.tokenizer.eos_token_id}
        eos_ids.discard(None)
        # Sort by prompt length so each batch pads little; results go back in request order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: dict[int, Completion] = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [prompts[i] for i in idx]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            gen_kwargs = dict(
                max_new_tokens=sampling.max_tokens,
                do_sample=False,  # greedy, or the argmax of the seeded sampler's draw (below)
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(eos_ids),
                repetition_penalty=sampling.repetition_penalty,
            )
            if sampling.temperature > 0:
                # Each row samples from its own generator, seeded by its request (llm/seeded.py):
                # its draws do not depend on the batch it lands in.
                gen_kwargs["logits_processor"] = LogitsProcessorList([RowSeededSampler(
                    [request_seed(seed, requests[i]) for i in idx], sampling.temperature, sampling.top_p,
                    sampling.top_k)])
            try:
                with torch.inference_mode():
                    gen = self.hf_model.generate(**enc, **gen_kwargs)
            except Exception as exc:  # one failing batch becomes errored rows, not a dead run
                for i in idx:
                    results[i] = Completion(text="", finish_reason="error", error=f"{type(exc).__name__}: {exc}")
                self._report(len(idx))
                continue
            prompt_len = enc["input_ids"].shape[1]
            for row, i in enumerate(idx):
                new = gen[row, prompt_len:].tolist()
                n = len(new)
                finish = "length"
                for j, t in enumerate(new):
                    if t in eos_ids:
                        n, finish = j, "stop"
                        break
                text = self.tokenizer.decode(new[:n], skip_special_tokens=True)
                text, stopped = _apply_stop(text, sampling.stop)
                results[i] = Completion(
                    text=text,
                    prompt_tokens=int(enc["attention_mask"][row].sum()),
                    completion_tokens=n,
                    finish_reason="stop" if stopped else finish,
                )
            self._report(len(idx), sum(results[i].completion_tokens for i in idx))
        out = [results[i] for i in range(len(prompts))]
        return out


def _apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
