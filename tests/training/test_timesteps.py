"""The training timestep range: sampled within it, refused before any compute when it is not a range."""

import argparse

import pytest
import torch

from dp_utils.errors import UserError
from dp_utils.training.timesteps import sample_timesteps, timestep_range


def test_timesteps_stay_in_the_range_and_cover_it():
    torch.manual_seed(0)
    t = sample_timesteps(20000, 200, 999, torch.device("cpu"))
    assert t.min() == 200 and t.max() == 999
    assert timestep_range(argparse.Namespace(timestep_min=0, timestep_max=None), 1000) == (0, 999)


def test_a_range_beyond_the_schedule_is_refused():
    with pytest.raises(UserError, match="beyond the scheduler's 1000 timesteps"):
        timestep_range(argparse.Namespace(timestep_min=0, timestep_max=1000), 1000)
