"""bench_step.py's flags: a value it cannot time is refused by argparse (exit code 2) before any model is built."""

import json
import types

import pytest
import torch

from benchmarks import bench_step, interleaved_step

REFUSED = {
    "--batch_size 0": "--batch_size: must be an integer >= 1, got 0",
    "--latent_size 0": "--latent_size: must be an integer >= 2, got 0",
    "--latent_size 5": "--latent_size must be even",
    "--steps 0": "--steps: must be an integer >= 1, got 0",
    "--warmup -1": "--warmup: must be an integer >= 0, got -1",
    "--threads -1": "--threads: must be an integer >= 0, got -1",
    "--batch_size two": "--batch_size: invalid integer value: 'two'",
}
if not torch.cuda.is_available():
    REFUSED["--cuda_graphs"] = "--cuda_graphs needs a CUDA device"


@pytest.mark.parametrize("parse_args", [bench_step.parse_args, interleaved_step.parse_args])
@pytest.mark.parametrize("flags", REFUSED)
def test_flags_it_cannot_time_are_refused(capsys, parse_args, flags):
    with pytest.raises(SystemExit) as exit:
        parse_args(flags.split())
    assert exit.value.code == 2 and REFUSED[flags] in capsys.readouterr().err


def test_the_table_takes_records_as_a_gpu_writes_them(monkeypatch, capsys):
    """A GPU's name as the device, peak memory from CUDA, and no op counts for graph replays."""

    def gpu_record(mode: str, graphs: bool) -> dict:
        record = dict(mode=mode, device="NVIDIA H200", cuda_graphs=graphs, s_per_step=0.25, samples_per_s=128.0)
        record.update(peak_gib=30.0, trainable=675_000_000)
        if not graphs:
            record.update(matmul_gflop={"bfloat16": 900.0, "float32": 10.0}, aten_ops=5000)
        return record

    for graphs in (True, False):
        outputs = iter(json.dumps(gpu_record(mode, graphs)) for mode in ("non_private", "flash_bk"))

        def run(cmd, outputs=outputs, **kwargs):  # the mode's process
            return types.SimpleNamespace(returncode=0, stdout=next(outputs), stderr="")

        monkeypatch.setattr(bench_step.subprocess, "run", run)
        bench_step.main(bench_step.parse_args(["--modes", "non_private", "flash_bk"]))
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| flash_bk")]
        counts = "- (graph replays) | -" if graphs else "910.0 (1%) | 5000"
        assert rows == [f"| flash_bk | 0.250 | 128.0 | 1.00 | 30.00 | 1.00 | {counts} |"]
