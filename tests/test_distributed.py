"""DDP and FSDP2 (two gloo processes on CPU) against a single process on the concatenated batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers

pytestmark = pytest.mark.distributed
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    mp.spawn(dist_workers.worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_matches_single_process_on_concatenated_batch(results, wrapper, mode):
    single = dist_workers.single_process_result(mode)
    got = results[f"{wrapper}_{mode}"]
    for p, q in zip(got["params"], single["params"]):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
    if mode == "explicit":
        # the Gramian of the last step is the global one, not a shard-local value
        torch.testing.assert_close(got["gramian"], single["gramian"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_multiplier_is_identical_on_every_rank(results, wrapper):
    w = results[f"{wrapper}_implicit"]["w_per_rank"]
    assert torch.equal(w, w[0].expand_as(w))
    single = dist_workers.single_process_result("implicit")
    torch.testing.assert_close(w[0], single["w"], rtol=1e-5, atol=1e-7)


def test_zero_style_sharded_gramian_is_global(results):
    r = results["zero_gramian"]
    torch.testing.assert_close(r["gramian"], r["expected"], rtol=1e-13, atol=0)  # float64 both ways
