"""The demo (``make demo``) runs end to end and writes one JSON record per step."""
import json

from gradstats import demo


def test_demo_prints_the_profile_and_writes_every_step(tmp_path, capsys):
    log = tmp_path / "grads.jsonl"
    demo.main(["--steps", "3", "--depth", "4", "--width", "16", "--log", str(log)])
    out = capsys.readouterr().out
    assert "slope" in out and "per-layer gradient norm" in out
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "hist" in records[2] and records[2]["clip_coef"] <= 1.0


def test_demo_runs_twice_on_its_own_log(tmp_path, capsys):
    log = tmp_path / "grads.jsonl"
    for _ in range(2):  # the demo owns its log: a second run replaces it, as `make demo` does
        demo.main(["--steps", "2", "--depth", "2", "--width", "8", "--log", str(log)])
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1]
