"""llama.cpp (llama-cpp-python) as a test client, run by the Python of a separate venv (not by the test process).

``python llamacpp_client.py nll MODEL.gguf WINDOWS.json OUT.json``: ``OUT.json`` gets ``{"nll": mean −log p over
positions 1.. of every window}`` from llama.cpp's own logits (``logits_all``).
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["nll", "tokenize"])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    args = p.parse_args()
    data = json.loads(open(args.data).read())
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
