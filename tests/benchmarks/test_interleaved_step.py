"""interleaved_step.py: the modes take turns in blocks, settling steps untimed; a real run on CPU prints the ratios."""

import pytest
import torch

from benchmarks import interleaved_step


def test_modes_take_turns_in_blocks_and_the_first_round_and_settling_steps_are_not_timed(monkeypatch):
    calls = []

    def fake_step(args, model, device):
        mode = args.mode
        return (lambda: calls.append(mode)), 0, 0

    monkeypatch.setattr(interleaved_step, "build_model", lambda args, device: None)
    monkeypatch.setattr(interleaved_step, "training_step", fake_step)
    args = interleaved_step.parse_args(["--rounds", "3", "--block", "4", "--settle", "1"])
    times = interleaved_step.interleaved_times(args, torch.device("cpu"))
    assert calls == (["non_private"] * 4 + ["flash_bk"] * 4) * 3
    assert {mode: len(t) for mode, t in times.items()} == {"non_private": 6, "flash_bk": 6}


def test_a_real_run_prints_each_mode_against_non_private(capsys):
    flags = ["--model", "XL-proxy", "--latent_size", "4", "--batch_size", "1", "--threads", "1"]
    interleaved_step.main(interleaved_step.parse_args(flags + ["--rounds", "2", "--block", "2", "--settle", "1"]))
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["non_private", "flash_bk"]
    assert float(rows[0][2]) == 1.0 and float(rows[1][2]) > 0


@pytest.mark.parametrize("flags", [["--rounds", "1"], ["--block", "2", "--settle", "2"]])
def test_a_schedule_that_times_nothing_is_refused(flags, capsys):
    with pytest.raises(SystemExit):
        interleaved_step.parse_args(flags)
    assert "need --rounds >= 2" in capsys.readouterr().err
