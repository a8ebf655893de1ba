"""Data-parallel calibration (torch.distributed, 2 gloo processes on the CPU) equals one process.

Unit level: two forked ranks check the collective helpers, the sample-count-weighted Hessian reduction, the
exact reduction of channel statistics (EMA of per-batch midpoints included), GPTQ's per-layer ownership and the
whole pipeline on a tiny model (GPTQ, AWQ with a row budget split across ranks, SmoothQuant, LET init with
shifts) against single-process references. End to end: ``torchrun --nproc-per-node 2 -m bitsmith quantize``
with GPTQ and OmniQuant on the aidreams260K fixture gives the perplexity (and weights) of one process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import shared_path
from safetensors.torch import load_file
from tiny_models import tiny_model

from bitsmith.algorithms import gptq_block as block_mod
from bitsmith.algorithms.gptq_block import collect_hessians
from bitsmith.cli.main import main
from bitsmith.config import QuantConfig
from bitsmith.formats import IntFormat, PerChannel, PerGroup, PerToken, QuantSpec
from bitsmith.models import get_architecture
from bitsmith.nn import QuantLinear
from bitsmith.pipeline import quantize_model
from bitsmith.transforms import collect_input_stats
from bitsmith.utils import dist

CPU = torch.device("cpu")
WORLD = 2


def test_assign_owners_balances_a_llama_block_by_solve_cost():
    shapes = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64), "gate": (172, 64), "up": (172, 64),
              "down": (64, 172)}
    costs = {n: block_mod.gptq_cost(o, i) for n, (o, i) in shapes.items()}
    owners = dist.assign_owners(costs, 2)
    assert list(owners) == list(costs) and set(owners.values()) == {0, 1}
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(2)]
    assert owners["down"] == 0  # the costliest solve (in² dominates) first, to the least-loaded rank
    names = list(costs)
    best = min(max(sum(costs[n] for j, n in enumerate(names) if (m >> j) & 1 == r) for r in range(2))
               for m in range(2 ** len(names)))
    assert max(loads) == best  # optimal here: down_proj alone against the six others
    eight = dist.assign_owners({f"l{i}": 1.0 for i in range(8)}, 4)
    assert sorted(eight.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert dist.assign_owners(costs, 1) == {n: 0 for n in costs}
    assert dist.assign_owners({"a": 1.0, "b": 1.0, "c": 1.0}, 3) == {"a": 0, "b": 1, "c": 2}


def test_single_process_helpers_are_identities():
    t = torch.arange(4.0)
    assert dist.world_size() == 1 and dist.is_main()
    assert dist.sum_scalars([1.5, 2]) == [1.5, 2.0] and dist.mean_scalar(torch.tensor(3.0)) == 3.0
    assert dist.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(4.0))
    ids = torch.arange(12).reshape(6, 2)
    assert dist.shard_samples(ids, 3) == (ids, 3)
    assert dist.local_row_budget(100, 16, 6) == 100
    assert dist.init_from_env(CPU) == CPU and not dist.is_initialized()  # no WORLD_SIZE: nothing started
    with pytest.raises(ValueError, match="--batch-size 1 is not a multiple of the 2 processes.*--batch-size 2"):
        dist.check_shardable(8, 1, 2)
    with pytest.raises(ValueError, match="--nsamples 6 is not a multiple of --batch-size 4"):
        dist.check_shardable(6, 4, 2)


# ---- two forked gloo ranks -------------------------------------------------------------------------------
_REF: dict = {}  # single-process references, computed before forking (the children inherit them)


def _pipeline_configs() -> dict[str, QuantConfig]:
    w = QuantSpec(IntFormat(3), PerGroup(16))
    a8 = QuantSpec(IntFormat(8), PerToken())
    common = dict(nsamples=4, seqlen=16, batch_size=2, calib="unused")
    return {
        "gptq": QuantConfig(method="gptq", weight=w, **common),
        "awq": QuantConfig.from_dict({**QuantConfig(method="awq", weight=w, **common).to_dict(),
                                      "options": {"grid": 5, "max_tokens": 24}}),  # 24 rows: rank 0 16, rank 1 8
        "smoothquant": QuantConfig(method="smoothquant", weight=QuantSpec(IntFormat(8), PerChannel()), act=a8,
                                   **common),
        "let_init": QuantConfig.from_dict({**QuantConfig(method="omniquant", weight=w, act=a8, **common).to_dict(),
                                           "options": {"let": True, "epochs": 0}}),  # LET scales + shifts
    }


def _toy_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 5, 8, generator=g) * (1 + i) for i in range(4)]


def _toy_layer() -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear(torch.nn.Linear(8, 6), QuantSpec(IntFormat(4), PerChannel()))


def _references() -> None:
    if _REF:
        return
    layer = _toy_layer()
    _REF["hessian"] = collect_hessians(layer, {"l": layer}, _toy_inputs(), [{}] * 4, lambda h, kw: layer(h))["l"]
    lin = torch.nn.Linear(8, 3)
    with collect_input_stats({"l": lin}) as st:
        for x in _stats_batches():
            lin(x)
    _REF["stats"] = st["l"]
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    _REF["ids"] = ids
    _REF["model"] = tiny_model("llama")
    for name, cfg in _pipeline_configs().items():
        model = copy.deepcopy(_REF["model"])
        res = quantize_model(model, get_architecture(model), cfg, ids, CPU, progress=False)
        _REF[name] = (model.state_dict(), res)


def _stats_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(2, 5, 8, generator=g) + 0.5 * i for i in range(3)]  # 3 global batches of 2 samples


def _check_helpers(rank: int) -> None:
    assert dist.world_size() == WORLD and dist.is_main() == (rank == 0)
    assert dist.sum_scalars([rank, 1.0]) == [1.0, 2.0]
    assert dist.mean_scalar(torch.tensor(float(rank))) == 0.5
    t = torch.tensor([float(rank), -float(rank)])
    assert torch.equal(dist.all_reduce_max_(t.clone()), torch.tensor([1.0, 0.0]))
    assert torch.equal(dist.all_reduce_min_(t.clone()), torch.tensor([0.0, -1.0]))
    mine = [torch.arange(6).reshape(2, 3), None, torch.ones(2, dtype=torch.float16)] if rank == 1 else None
    got, extra = dist.broadcast_tensors(mine, 1, CPU, extra={"loss": 2.5})
    assert torch.equal(got[0], torch.arange(6).reshape(2, 3)) and got[1] is None and got[2].dtype == torch.float16
    assert extra == {"loss": 2.5}
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank))
    dist.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 0.5))
    ids = torch.arange(16).reshape(8, 2)
    local, b = dist.shard_samples(ids, 4)
    assert b == 2 and torch.equal(local, ids[rank::2])
    for s in range(2):  # micro-batch s of both ranks = global batch s
        both = [torch.arange(16).reshape(8, 2)[r::2][s * 2:(s + 1) * 2] for r in range(2)]
        assert sorted(torch.cat(both)[:, 0].tolist()) == list(range(s * 8, (s + 1) * 8, 2))
    for k in (0, 10, 16, 17, 40, 1000):  # the ranks keep exactly the first k rows (4 samples of 8 rows)
        assert dist.sum_scalars([dist.local_row_budget(k, 8, 2)])[0] == min(k, 32)
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        dist.shard_samples(ids, 3)


def _check_hessian(rank: int) -> None:
    layer = _toy_layer()
    xs = _toy_inputs()
    mine = xs[:3] if rank == 0 else xs[3:]  # unequal shares: the reduction must weight by sample counts
    h = collect_hessians(layer, {"l": layer}, mine, [{}] * len(mine), lambda h, kw: layer(h))["l"]
    torch.testing.assert_close(h, _REF["hessian"], rtol=1e-6, atol=1e-6)


def _check_stats(rank: int) -> None:
    lin = torch.nn.Linear(8, 3)
    with collect_input_stats({"l": lin}) as st:
        for x in _stats_batches():
            lin(x[rank:rank + 1])  # this rank's micro-batch of each global batch
    got, ref = st["l"], _REF["stats"]
    for field in ("absmax", "min", "max", "mid_ema"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    assert got.count == ref.count == 3 and got.history is None


def _check_pipeline(rank: int) -> None:
    calls = []
    real = block_mod.gptq_solve

    def counting(w, *args, **kwargs):
        calls.append(tuple(w.shape))
        return real(w, *args, **kwargs)

    block_mod.gptq_solve = counting
    try:
        for name, cfg in _pipeline_configs().items():
            model = copy.deepcopy(_REF["model"])
            res = quantize_model(model, get_architecture(model), cfg, _REF["ids"], CPU, progress=False)
            ref_state, ref_res = _REF[name]
            for k, v in model.state_dict().items():
                torch.testing.assert_close(v, ref_state[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
            assert res.frozen.keys() == ref_res.frozen.keys()
            for k, qt in res.frozen.items():  # every rank holds the same frozen codes as one process
                assert torch.equal(qt.codes, ref_res.frozen[k].codes), f"{name}: codes of {k}"
            for b, rb in zip(res.blocks, ref_res.blocks):
                assert b["output_mse"] == pytest.approx(rb["output_mse"], rel=1e-4)
                if name == "awq":
                    assert b["awq_alpha"] == rb["awq_alpha"]
            if name == "gptq":
                solved = dist.sum_scalars([len(calls)])[0]
                assert 0 < len(calls) < solved == 2 * 7  # each rank solved some layers of both blocks, none twice
    finally:
        block_mod.gptq_solve = real


def _worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        _check_helpers(rank)
        _check_hessian(rank)
        _check_stats(rank)
        _check_pipeline(rank)
    finally:
        tdist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    _references()
    mp.start_processes(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, start_method="fork")


# ---- torchrun end to end -----------------------------------------------------------------------------------
def _quantize_args(out, method_args):
    return ["quantize", str(shared_path("models", "aidreams260K")), *method_args, "--wbits", "3",
            "--group-size", "32", "--calib", str(shared_path("data", "aidreams260K-samples")), "--nsamples", "8",
            "--seqlen", "64", "--batch-size", "2", "--ppl", str(shared_path("data", "aidreams260K-samples")),
            "--ppl-limit", "4", "--threads", "1", "-q", "-o", str(out)]


@pytest.mark.parametrize("method_args", [["--method", "gptq"], ["--method", "omniquant", "--epochs", "2"],
                                         ["--method", "bitsmith", "--steps", "4", "--e2e-steps", "6", "--stream"]],
                         ids=["gptq", "omniquant", "default-streamed-e2e"])
def test_torchrun_two_processes_match_one(tmp_path, method_args):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "bitsmith", *_quantize_args(two, method_args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tempfile.gettempdir())
    assert main(_quantize_args(one, method_args)) == 0  # one process, in this one, while torchrun runs
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "perplexity" in out and out.count("W3A16g32: 4 blocks") == 1  # only rank 0 prints the summary
    r1, r2 = (json.loads((d / "bitsmith.json").read_text()) for d in (one, two))
    (p1,), (p2,) = r1["ppl"].values(), r2["ppl"].values()
    assert p2 == pytest.approx(p1, rel=1e-3)
    assert r2["recipe"]["batch_size"] == 2  # global samples per step, recorded as given
    if "--stream" in method_args:  # each rank tunes its share of the sequences, blocks read back from disk
        assert r1["end_to_end"]["mode"] == r2["end_to_end"]["mode"] == "streamed" and r2["end_to_end"]["steps"] == 6
        assert r2["end_to_end"]["kl_after"] == pytest.approx(r1["end_to_end"]["kl_after"], rel=1e-3)
    a, b = (load_file(str(d / "model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_torchrun_batch_not_divisible_is_one_line_error_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before the process group is joined
    out = tmp_path / "q"
    assert main(_quantize_args(out, ["--method", "gptq"])[:-2] + ["-o", str(out), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("bitsmith: error: --batch-size 1 is not a multiple of the 2 processes (it counts samples per "
                       "step over all processes); pass --batch-size 2")
    assert not dist.is_initialized() and not any(tmp_path.iterdir())
