"""Memory accounting (utils/memory.py): per-phase RSS peaks, activation stores, the block estimate; the CLI's size
parsing (cli/scale.py)."""

from __future__ import annotations

import gc

import pytest
import torch

from bitsmith.cli.main import UsageError
from bitsmith.cli.scale import parse_max_memory, parse_size
from bitsmith.utils.memory import (
    ActivationStore,
    MemoryMeter,
    block_need,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)

MiB = 2**20


def test_meter_gives_each_phase_its_own_peak():
    if not reset_peak_rss():
        pytest.skip("this system cannot reset the RSS high-water mark (no /proc/self/clear_refs)")
    meter = MemoryMeter("cpu")
    meter.start()
    x = torch.ones(64 * MiB // 4)  # 64 MiB, touched
    x.add_(1)
    del x
    gc.collect()
    big = meter.stop()
    meter.start()
    small = meter.stop()
    total = meter.summary()
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 48  # the second phase does not inherit the first's peak
    assert total["peak_rss_mb"] >= big["peak_rss_mb"] and total["peak_rss_resettable"]
    assert big["peak_accelerator_mb"] is None and total["peak_accelerator_mb"] is None
    assert peak_rss_bytes() >= rss_bytes() > 0


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_activation_store_round_trips_and_cleans_up(tmp_path, placement):
    tensors = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    store = ActivationStore("cpu", placement, tmp_path)
    store.extend(tensors)
    copy = store.copy()
    out = store.new()
    for t in store:
        out.append(t * 2)
    assert len(store) == 3 and all(torch.equal(a, b) for a, b in zip(store, tensors))
    assert torch.equal(store[1], tensors[1]) and torch.equal(out[2], tensors[2] * 2)
    assert [t.shape for t in store[0:2]] == [(2, 5, 8)] * 2
    files = len(list(tmp_path.iterdir()))
    assert files == (6 if placement == "disk" else 0)
    del store, out
    gc.collect()
    assert len(list(tmp_path.iterdir())) == (3 if placement == "disk" else 0)  # the copy still holds its files
    assert torch.equal(copy[0], tensors[0])
    del copy
    gc.collect()
    assert not list(tmp_path.iterdir())


def test_block_need_counts_the_gptq_hessians_and_the_attention_scores():
    base = dict(weight_bytes=1000, linears=[(8, 16), (16, 8)], hidden=8, intermediate=16, heads=2, batch=1,
                seqlen=4, elem=4)
    rtn = block_need(**base)
    gptq = block_need(**base, gptq=True)
    assert rtn["weights"] == 1000 and rtn["quantized copies"] == 1000 + 256
    assert rtn["per-layer temporaries"] == 3 * 4 * 128
    assert rtn["forward (one batch)"] == 4 * (4 * 8 + 3 * 16) * 4 + 2 * 4 * 4 * 4
    # worst step: solving the first linear (in 16) with the second's Hessian (in 8) still pending
    assert (gptq["GPTQ Hessians"], gptq["GPTQ solver"]) == (4 * 8 * 8, 5 * 4 * 16 * 16 + 3 * 4 * 8 * 16)
    trained = block_need(**base, trained=True, rounding=True)
    assert trained["trained parameters (+grad, AdamW)"] == 16 * 256
    assert trained["backward (saved activations)"] == 2 * 4 * (4 * 8 + 3 * 16) * 4
    both = block_need(**base, trained=True, rounding=True, gptq=True)  # a GPTQ start, then training: the larger
    assert both == gptq and sum(gptq.values()) > sum(trained.values())


def test_sizes_parse_with_decimal_and_binary_units():
    assert parse_size("5GB", "--x") == 5 * 10**9
    assert parse_size("1.5GiB", "--x") == int(1.5 * 2**30)
    assert parse_size("512 MiB", "--x") == 512 * MiB
    assert parse_size("1000", "--x") == 1000
    for bad in ("5 gigs", "-1GB", "GB", "0"):
        with pytest.raises(UsageError, match="--x"):
            parse_size(bad, "--x")


def test_max_memory_names_the_compute_device_or_both_pools():
    assert parse_max_memory("2GiB").resolve(accelerator=False).host == 2 * 2**30
    assert parse_max_memory("2GiB").resolve(accelerator=True).device == 2 * 2**30
    limits = parse_max_memory("cpu=8GiB,0=70GiB").resolve(accelerator=True)
    assert (limits.host, limits.device) == (8 * 2**30, 70 * 2**30)
    assert parse_max_memory("cpu=8GiB,device=2GiB").resolve(accelerator=False).host == 2 * 2**30  # one pool
    with pytest.raises(UsageError, match="unknown key 'disk'"):
        parse_max_memory("disk=1GB")
