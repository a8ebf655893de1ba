"""llama.cpp (llama-cpp-python) as a test client, run by the Python of a separate venv (not by the test process).

``python llamacpp_client.py nll MODEL.gguf WINDOWS.json OUT.json``: ``OUT.json`` gets ``{"nll": mean −log p over
positions 1.. of every window}`` from llama.cpp's own logits (``logits_all``).
``python llamacpp_client.py logprobs MODEL.gguf WINDOWS.json OUT.npy``: log-softmax of llama.cpp's logits,
``float32 (windows, T − 1, vocab)`` (positions 0 … T − 2 predicting tokens 1 … T − 1).
``python llamacpp_client.py quantize F32.gguf TYPE OUT.gguf``: llama.cpp's own quantizer (``llama_model_quantize``)
with every tensor of type ``TYPE`` (``pure``; e.g. ``Q4_K_S``, the all-Q4_K mix) except the token embeddings and
the output head, kept F32 (as bitsmith leaves them); no importance matrix (llama-cpp-python exposes none).
``python llamacpp_client.py tokenize MODEL.gguf LINES.json OUT.json``: ``OUT.json`` gets
``{"ids": [token ids of each line, no BOS], "bos": first id of tokenize(b"hi")}`` (vocabulary only).
"""

import argparse
import json
import math


def _nll(model: str, windows: list) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=max(len(w) for w in windows), logits_all=True, n_threads=1, verbose=False)
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        for pos, tok in enumerate(w[1:]):
            row = [float(v) for v in llm.scores[pos]]
            top = max(row)
            total += top + math.log(sum(math.exp(v - top) for v in row)) - row[tok]
            count += 1
    return total / count


def _logprobs(model: str, windows: list, out: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=max(len(w) for w in windows), logits_all=True, n_threads=1, verbose=False)
    rows = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        z = np.array(llm.scores[: len(w) - 1], dtype=np.float64)
        z = z - z.max(-1, keepdims=True)
        rows.append((z - np.log(np.exp(z).sum(-1, keepdims=True))).astype(np.float32))
    np.save(out, np.stack(rows))


def _quantize(src: str, kind: str, out: str) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.pure = True
    params.output_tensor_type = params.token_embedding_type = 0  # GGML_TYPE_F32
    params.nthread = 1
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["nll", "logprobs", "quantize", "tokenize"])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    args = p.parse_args()
    if args.mode == "quantize":
        return _quantize(args.model, args.data, args.out)
    data = json.loads(open(args.data).read())
    if args.mode == "logprobs":
        return _logprobs(args.model, data, args.out)
    if args.mode == "nll":
        body = {"nll": _nll(args.model, data)}
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=args.model, vocab_only=True, verbose=False)
        body = {"ids": [llm.tokenize(line.encode(), add_bos=False) for line in data],
                "bos": llm.tokenize(b"hi")[0]}
    with open(args.out, "w") as f:
        json.dump(body, f)


if __name__ == "__main__":
    main()
