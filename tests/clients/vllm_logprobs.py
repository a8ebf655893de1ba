"""Prompt log-probabilities from vLLM, run by the Python of a separate vLLM venv (not by the test process).

``python vllm_logprobs.py WINDOWS.json MODEL_DIR OUT.json [--dtype float32]``: ``WINDOWS.json`` is a list of
token id lists; ``OUT.json`` gets ``{"nll": [sum over positions 1.. of −log p(token), …], "tokens": [count, …]}`` and the
quantization method vLLM chose. Only vLLM's public ``LLM`` API is used; the model is read with
``skip_tokenizer_init`` (token ids in, no tokenizer needed).
"""

import argparse
import json
import os


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("windows")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    score(args.model, json.loads(open(args.windows).read()), args.out, args.dtype)


def score(model: str, windows: list, out: str, dtype: str) -> None:
    """One engine, one model (a second engine in the same process aborts at exit in vLLM 0.32's CPU build)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=max(len(w) for w in windows) + 1, seed=0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, count = [], []
    for w, o in zip(windows, outs):
        total = 0.0
        for tok, lp in zip(w[1:], o.prompt_logprobs[1:]):
            total -= lp[tok].logprob
        nll.append(total)
        count.append(len(w) - 1)
    quant = getattr(llm.llm_engine.vllm_config.model_config, "quantization", None)
    with open(out, "w") as f:
        json.dump({"nll": nll, "tokens": count, "quantization": quant}, f)
    # vLLM 0.32's CPU build sometimes aborts in its interpreter-exit teardown ("terminate called without an active
    # exception") after all work is done: stop the engine explicitly, then leave without the atexit handlers
    shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
