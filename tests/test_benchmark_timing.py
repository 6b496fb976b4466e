"""benchmarks/timing.py: the untimed reset between timed calls (a clipping benchmark must
time the same work on both sides: each call starting from the same gradients)."""
import torch

from benchmarks import timing
from benchmarks.run import cases_for
from benchmarks.workloads import make_params


def test_paired_ms_resets_before_every_call_of_either_side():
    log = []
    timing.paired_ms(lambda: log.append("ours"), lambda: log.append("baseline"),
                     torch.device("cpu"), before_each=lambda: log.append("reset"))
    calls = [i for i, entry in enumerate(log) if entry != "reset"]
    assert len(calls) >= 2 * timing.MIN_ROUNDS
    assert all(log[i - 1] == "reset" for i in calls)


def test_median_ms_resets_before_every_call():
    log = []
    timing.median_ms(lambda: log.append("call"), torch.device("cpu"),
                     before_each=lambda: log.append("reset"))
    assert log == ["reset", "call"] * (timing.MIN_ROUNDS + 1)


def test_clipping_cases_clip_by_half_on_every_call_on_both_sides():
    params = make_params([(64, 32), (100,)], torch.float32, torch.device("cpu"))
    start = [p.grad.clone() for p in params]
    clipping = [case for case in cases_for(params) if case.reset is not None]
    assert {case.name for case in clipping} == {"clip, clipping needed",
                                                "stats + histogram + clip"}
    for case in clipping:
        for side in (case.ours, case.baseline):
            for _ in range(2):  # a repeat clips again, from the same gradients
                case.reset()
                side()
                for grad, before in zip((p.grad for p in params), start):
                    torch.testing.assert_close(grad, before * 0.5, rtol=1e-4, atol=0)  # eps 1e-6
