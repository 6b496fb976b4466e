"""Sinks that fail (a flaky logger, a full disk) and files that must not be harmed: training
goes on, the other sinks go on, records are retried, no torn line, no file emptied unasked."""
import errno
import gc
import json
import logging
import os
import warnings

import pytest
import torch
from monitor_helpers import ListSink, backward, poison, tiny_model

import gradstats
from gradstats.sinks import JsonlSink, fanout


class FlakySink(ListSink):
    """Fails on the calls listed in `failing` (1-based), with `error`."""

    def __init__(self, failing, error=ConnectionError("logging service unavailable")):
        super().__init__()
        self.failing, self.error, self.calls = set(failing), error, 0

    def write(self, record):
        self.calls += 1
        if self.calls in self.failing:
            raise self.error
        super().write(record)


def run_steps(monitor, model, steps, nan_from=None, max_norm=None):
    for step in range(steps):
        model.zero_grad()
        backward(model, step, scale=10.0)
        if nan_from is not None and step >= nan_from:
            poison(model, "0.weight")
        monitor.step(max_norm)


def test_a_raising_sink_is_reported_once_and_retried_while_training_goes_on():
    model = tiny_model()
    flaky, after = FlakySink(failing={3}), ListSink()
    monitor = gradstats.GradMonitor(model, sinks=[flaky, after])
    with pytest.warns(RuntimeWarning, match=r"sink FlakySink failed: ConnectionError: logging "
                                            r"service unavailable") as caught:
        run_steps(monitor, model, 6, max_norm=0.01)
    assert len(caught) == 1
    assert [r.step for r in after.records] == [0, 1, 2, 3, 4, 5]  # nothing lost for later sinks
    assert [r.step for r in flaky.records] == [0, 1, 2, 3, 4, 5]  # step 2 retried, in order
    assert all(r.clip_coef < 1 for r in after.records)
    monitor.close()


def test_the_nan_warning_names_the_right_step_when_its_record_failed():
    model = tiny_model()
    monitor = gradstats.GradMonitor(model, sinks=[FlakySink(failing={2}, error=OSError("gone"))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_steps(monitor, model, 4, nan_from=1)
    alarms = [w for w in caught if issubclass(w.category, gradstats.NonFiniteGradientWarning)]
    assert [w.message.step for w in alarms] == [1]
    monitor.close()


def test_a_raising_sink_does_not_break_an_attached_optimizer_step():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradstats.GradMonitor(model, sinks=[FlakySink(failing={1, 2})]).attach(optimizer)
    with pytest.warns(RuntimeWarning, match="sink FlakySink failed"):
        for step in range(3):
            before = model[0].weight.detach().clone()
            backward(model, step)
            optimizer.step()
            optimizer.zero_grad()
            assert not torch.equal(before, model[0].weight)
    monitor.close()


def test_keyboard_interrupt_in_a_sink_is_not_swallowed():
    model = tiny_model()
    interrupted = FlakySink(failing={1}, error=KeyboardInterrupt())
    monitor = gradstats.GradMonitor(model, sinks=[interrupted])
    backward(model, 0)
    with pytest.raises(KeyboardInterrupt):
        monitor.step()


def test_a_lasting_failure_keeps_the_last_records_and_counts_the_dropped(monkeypatch, caplog):
    monkeypatch.setattr(fanout, "BACKLOG_LIMIT", 3)
    monkeypatch.setattr(fanout, "MAX_RETRY_GAP", 2)
    model = tiny_model()
    flaky = FlakySink(failing=range(1, 8))
    monitor = gradstats.GradMonitor(model, sinks=[flaky])
    with pytest.warns(RuntimeWarning, match="sink FlakySink failed"), \
            caplog.at_level(logging.WARNING, logger="gradstats"):
        run_steps(monitor, model, 12)
    monitor.close()
    steps = [r.step for r in flaky.records]
    assert steps == sorted(steps) and steps[-1] == 11 and len(steps) < 12
    assert flaky.calls < 12 + 7  # backed off: not every record retried at every step
    assert any("works again" in m and "dropped" in m for m in caplog.messages)


class FullDisk:
    """A raw file that takes `room` more bytes, then fails with ENOSPC (room=None: no limit)."""

    def __init__(self, real, room):
        self.real, self.room = real, room

    def write(self, data):
        if self.room is None:
            return self.real.write(data)
        if self.room == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = self.real.write(bytes(data[:self.room]))
        self.room -= written
        return written

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()


def monitor_on_a_disk_filling_up(path, steps, room):
    """A monitor writing `path` whose disk, after `steps` steps, takes `room` more bytes."""
    model = tiny_model()
    monitor = gradstats.GradMonitor(model, sinks=[f"jsonl:{path}"])
    run_steps(monitor, model, steps)
    [sink] = monitor.sinks
    disk = sink._file._file = FullDisk(sink._file._file, room=room)
    return model, monitor, disk


def test_jsonl_disk_full_part_way_through_a_line_leaves_whole_lines_and_catches_up(tmp_path):
    path = tmp_path / "g.jsonl"
    model, monitor, disk = monitor_on_a_disk_filling_up(path, steps=2, room=40)
    with pytest.warns(RuntimeWarning, match=r"JsonlSink\('.*g.jsonl'\) failed: OSError: "
                                            r"\[Errno 28\] No space left"):
        run_steps(monitor, model, 3)  # steps 2, 3, 4
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]  # the torn 40 bytes cut off
    disk.room = None  # space again
    run_steps(monitor, model, 1)
    monitor.close()
    assert [r.step for r in gradstats.read_jsonl(path)] == [0, 1, 2, 3, 4, 5]


def test_jsonl_torn_line_that_cannot_be_cut_off_stays_a_line_of_its_own(tmp_path, monkeypatch):
    from gradstats.sinks import files

    def refuse(fd, length):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(files.os, "ftruncate", refuse)
    path = tmp_path / "g.jsonl"
    model, monitor, disk = monitor_on_a_disk_filling_up(path, steps=1, room=25)
    with pytest.warns(RuntimeWarning, match="No space left"):
        run_steps(monitor, model, 1)
    disk.room = None
    run_steps(monitor, model, 1)
    monitor.close()
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable line\(s\) .* \(line 2\)"):
        records = gradstats.read_jsonl(path)
    assert [r.step for r in records] == [0, 1, 2]  # every record, the held one too


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_really_full_disk_never_stops_training_nor_close():
    model = tiny_model()
    table = ListSink()
    with pytest.warns(RuntimeWarning) as caught:
        monitor = gradstats.GradMonitor(model, sinks=["jsonl+append:/dev/full", table])
        run_steps(monitor, model, 5, max_norm=1.0)
        monitor.close()
    assert [r.step for r in table.records] == [0, 1, 2, 3, 4]
    failed = [str(w.message) for w in caught if "failed" in str(w.message)]
    assert len(failed) == 1 and "No space left on device" in failed[0]
    assert any("lost its last" in str(w.message) for w in caught)


def test_close_reports_a_sink_that_fails_to_close_and_closes_the_others():
    class BadClose(ListSink):
        def close(self):
            raise OSError(errno.EIO, "Input/output error")

    other = ListSink()
    monitor = gradstats.GradMonitor(tiny_model(), sinks=[BadClose(), other])
    with pytest.warns(RuntimeWarning, match="closing sink BadClose failed: OSError"):
        monitor.close()
    assert other.closed


# -- files this run did not create ----------------------------------------------------------
def test_an_existing_file_is_not_emptied_and_the_error_says_what_to_do(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02 a checkpoint" * 100)
    with pytest.raises(FileExistsError, match=r"append=True .* overwrite=True .*"
                                              r"'KIND\+append:PATH'.*model.pt"):
        gradstats.GradMonitor(tiny_model(), sinks=[f"jsonl:{path}"])
    assert path.stat().st_size == 1500


def test_no_file_is_touched_when_a_later_sink_cannot_start(tmp_path):
    previous = tmp_path / "previous_run.jsonl"
    previous.write_text('{"step": 0}\n' * 100)
    with pytest.raises(OSError, match="/proc/not"):
        gradstats.GradMonitor(tiny_model(), sinks=[f"jsonl+overwrite:{previous}",
                                                   "csv:/proc/not/writable.csv"])
    assert previous.read_text() == '{"step": 0}\n' * 100


def test_an_existing_empty_file_is_used(tmp_path):
    path = tmp_path / "g.jsonl"
    path.touch()
    sink = JsonlSink(path)
    sink.close()
    assert sink.path == path


def test_two_sinks_on_one_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="two sinks write the same file"):
        gradstats.GradMonitor(tiny_model(), sinks=[f"jsonl:{tmp_path}/g.jsonl",
                                                   f"jsonl+append:{tmp_path}/./g.jsonl"])


def test_two_monitors_on_the_default_path_write_separate_files(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    generator, discriminator = tiny_model(), tiny_model()
    with caplog.at_level(logging.INFO, logger="gradstats"):
        first = gradstats.GradMonitor(generator)
        run_steps(first, generator, 3)
        second = gradstats.GradMonitor(discriminator)
        run_steps(second, discriminator, 2)
        run_steps(first, generator, 1)
    first.close()
    second.close()
    [first_path], [second_path] = first.paths, second.paths
    assert first_path != second_path
    assert first_path.parent == second_path.parent == tmp_path / "runs" or \
        first_path.parent.name == "runs"
    assert first_path.name.startswith("gradstats-") and first_path.suffix == ".jsonl"
    assert [r.step for r in gradstats.read_jsonl(first_path)] == [0, 1, 2, 3]
    assert [r.step for r in gradstats.read_jsonl(second_path)] == [0, 1]
    assert any(str(first_path) in message for message in caplog.messages)


def test_two_monitors_given_one_new_path_are_refused_before_they_interleave(tmp_path):
    path = tmp_path / "shared.jsonl"
    first = gradstats.GradMonitor(tiny_model(), sinks=[f"jsonl:{path}"])
    with pytest.raises(FileExistsError, match="another gradstats sink of this process"):
        gradstats.GradMonitor(tiny_model(), sinks=[f"jsonl+append:{path}"])
    first.close()
    gradstats.GradMonitor(tiny_model(), sinks=[f"jsonl+append:{path}"]).close()  # free again


def test_the_overflow_flag_is_copied_before_the_fence_that_covers_it(monkeypatch):
    """On a GPU the fence (an event) covers only the copies queued before it: GradScaler's
    overflow flag read after the fence could be a value not yet written."""
    from gradstats import record_queue

    calls = []
    monkeypatch.setattr(record_queue, "_host_copy",
                        lambda tensor: calls.append("copy") or tensor)
    monkeypatch.setattr(record_queue, "copy_fence",
                        lambda device: calls.append("fence") or ((lambda: True), (lambda: None)))
    model = tiny_model()
    backward(model, 0)
    stats = gradstats.grad_stats(model)
    queue = record_queue.RecordQueue(lambda record: None, lambda: None)
    queue.push(0, stats, logged=True, clipped=False, overflow=torch.tensor(0.0))
    assert calls[-1] == "fence" and calls.count("copy") >= 2


def test_a_sink_dropped_without_close_lets_its_path_go(tmp_path):
    path = tmp_path / "dropped.jsonl"
    sink = JsonlSink(path)
    del sink
    gc.collect()
    JsonlSink(path, append=True).close()


def test_closing_a_sink_twice_keeps_a_later_sinks_hold_on_the_path(tmp_path):
    path = tmp_path / "held.jsonl"
    first = JsonlSink(path)
    first.close()
    second = JsonlSink(path, append=True)
    first.close()
    with pytest.raises(FileExistsError, match="another gradstats sink"):
        JsonlSink(path, append=True)
    second.close()
