"""The CUDA path's launch metadata, checked on the CPU (csrc/launch_plan.h through _C._launch_plan).

The CUDA kernels get their tensor lists by value in the kernel arguments: a host planner cuts a
list into launches of at most ``capacity`` tensors, packs each launch's addresses, sizes and
first chunks, and every thread block finds its chunk with ``locate()``. All of that is host code
(``locate`` is the very function the kernels call), so it runs here on fake addresses: every
element of every tensor must belong to exactly one block, in order, and the Gramian's
per-tensor finishing ranges must name each tensor's own chunk slots.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eupmu_kernels.backends.native_backend import load_extension

EXT = load_extension()
REQUIRED = os.environ.get("EUPMU_REQUIRE_EXT") == "1"
pytestmark = pytest.mark.skipif(EXT is None and not REQUIRED, reason="eupmu_kernels._C is not built")

KERNEL_ARG_LIMIT = 4096  # bytes of arguments any kernel may take on every CUDA toolkit and driver


def fake_rows(rows: int, numels: list[int]) -> list[list[int]]:
    """Distinct fake addresses per row and tensor."""
    return [[(r + 1) << 40 | (t << 8) for t in range(len(numels))] for r in range(rows)]


def check_plan(rows: int, numels: list[int]) -> dict:
    addresses = fake_rows(rows, numels)
    plan = EXT._launch_plan(addresses, numels)
    chunk, cap = plan["chunk"], plan["capacity"]
    assert plan["arg_bytes"] <= KERNEL_ARG_LIMIT - 512  # room for the launch's other arguments
    covered = []  # (tensor, start, n) over all launches, in launch and block order
    next_tensor, next_chunk = 0, 0
    for launch in plan["launches"]:
        assert launch["first_tensor"] == next_tensor and launch["chunk_base"] == next_chunk
        assert 1 <= launch["ntensors"] <= cap
        assert len(launch["blocks"]) == launch["nchunks"]
        for r in range(rows):
            assert launch["addresses"][r] == addresses[r][next_tensor:next_tensor + launch["ntensors"]]
        for tensor, _, _ in launch["blocks"]:
            assert next_tensor <= tensor < next_tensor + launch["ntensors"]
        covered += launch["blocks"]
        next_tensor += launch["ntensors"]
        next_chunk += launch["nchunks"]
    assert next_tensor == len(numels)  # every tensor, empty ones too (their step counts advance)
    # every element of every tensor exactly once, in order, in full chunks but the last
    expected = [(t, s, min(chunk, n - s)) for t, n in enumerate(numels) for s in range(0, n, chunk)]
    assert covered == expected
    # a launch is cut only when it is full
    assert all(launch["ntensors"] == cap for launch in plan["launches"][:-1])
    # the Gramian's per-tensor finishing ranges: each non-empty tensor's own slots, in order
    first_slot = {}
    for index, (tensor, _, _) in enumerate(covered):
        first_slot.setdefault(tensor, index)
    ranges = [r for launch_ranges in plan["ranges"] for r in launch_ranges]
    assert all(0 < len(lr) <= plan["range_capacity"] for lr in plan["ranges"])
    assert ranges == [(first_slot[t], -(-n // chunk), t) for t, n in enumerate(numels) if n > 0]
    return plan


@pytest.mark.parametrize("rows", [2, 6])
def test_small_lists(rows):
    chunk = EXT._launch_plan([[1], [2]], [1])["chunk"]
    check_plan(rows, [1])
    check_plan(rows, [0])  # one empty tensor: a launch with no block (the update advances its step)
    check_plan(rows, [chunk, chunk + 1, 0, 7, 3 * chunk - 1, 0])


@pytest.mark.parametrize("rows", [2, 6])
def test_lists_over_capacity_are_cut_into_full_launches(rows):
    cap = EXT._launch_plan(fake_rows(rows, [1]), [1])["capacity"]
    plan = check_plan(rows, [(t * 9973) % 70000 for t in range(3 * cap + 5)])
    assert [launch["ntensors"] for launch in plan["launches"]] == [cap, cap, cap, 5]


def test_capacities_fit_the_kernel_arguments():
    gram = EXT._launch_plan(fake_rows(2, [1]), [1])
    update = EXT._launch_plan(fake_rows(6, [1]), [1])
    assert gram["capacity"] > update["capacity"] >= 48  # a transformer block's tensors in one launch
    assert max(gram["arg_bytes"], update["arg_bytes"]) <= KERNEL_ARG_LIMIT - 512


def test_a_tensor_over_two_to_the_31_elements():
    """int64 sizes and offsets: the last block of a 2^31 + 4099 element tensor starts past 2^31."""
    n = (1 << 31) + 4099
    plan = check_plan(2, [5, n, 3])
    blocks = [b for launch in plan["launches"] for b in launch["blocks"]]
    last = [b for b in blocks if b[0] == 1][-1]
    assert last == (1, (n // plan["chunk"]) * plan["chunk"], 4099)


def test_many_tensors_need_several_finishing_launches():
    cap = EXT._launch_plan(fake_rows(2, [1]), [1])["range_capacity"]
    plan = check_plan(2, [3] * (cap + 2))
    assert [len(r) for r in plan["ranges"]] == [cap, 2]


def test_bad_inputs_are_refused():
    with pytest.raises(RuntimeError, match="2 .* or 6"):
        EXT._launch_plan(fake_rows(3, [1]), [1])
    with pytest.raises(RuntimeError, match="one address per tensor"):
        EXT._launch_plan([[1, 2], [3]], [1, 1])
    with pytest.raises(ValueError, match="negative"):
        EXT._launch_plan(fake_rows(2, [1]), [-1])


@settings(max_examples=60, deadline=None)
@given(numels=st.lists(st.one_of(st.just(0), st.integers(1, 5), st.integers(1, 300_000)), max_size=300),
       rows=st.sampled_from([2, 6]))
def test_any_list_is_covered_exactly_once(numels, rows):
    if not numels:
        assert EXT._launch_plan([[] for _ in range(rows)], [])["launches"] == []
        return
    check_plan(rows, numels)
