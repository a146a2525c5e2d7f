"""bench_step.py's flags: a value it cannot time is refused by argparse (exit code 2) before any model is built."""

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
