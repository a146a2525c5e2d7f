"""The public model as a free prior: a finisher for the last sampling steps and weight interpolation, both computed
from the saved DP pipeline and the public pipeline only (post-processing, no privacy cost)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler

import interpolate_weights
from dp_utils.errors import run_script
from dp_utils.training.generation import generate, sample_pixel_pipeline
from dp_utils.training.interpolation import interpolate_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, patch_size=2, num_embeds_ada_norm=10)


def tiny_pipeline(path: Path, seed: int, names=("a", "b")) -> Path:
    torch.manual_seed(seed)
    DiTTransformer2DModel(in_channels=3, out_channels=6, sample_size=8, **TINY).save_pretrained(path / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    index = {"_class_name": "DiTPipeline", "id2label": {str(i): n for i, n in enumerate(names)}}
    (path / "model_index.json").write_text(json.dumps(index))
    (path / "privacy_report.json").write_text(json.dumps({"epsilon": 10.0, "dataset_size": 40}))
    (path / "README.md").write_text("---\nlicense: other\n---\n\n# A DP model\n")
    return path


def counting(model: DiTTransformer2DModel, calls: list, name: str) -> DiTTransformer2DModel:
    model.register_forward_pre_hook(lambda *_: calls.append(name))
    return model


def test_the_last_steps_are_the_finishers(tmp_path):
    dp, public = (tiny_pipeline(tmp_path / n, s) for n, s in (("dp", 0), ("public", 1)))
    calls = []
    transformer = counting(DiTTransformer2DModel.from_pretrained(dp / "transformer").eval(), calls, "dp")
    finisher = counting(DiTTransformer2DModel.from_pretrained(public / "transformer").eval(), calls, "public")
    scheduler = DPMSolverMultistepScheduler.from_pretrained(dp / "scheduler")
    run = dict(null_label=10, num_inference_steps=5)
    generate(transformer, scheduler, [0, 1], **run, finisher=finisher, finisher_steps=2)
    assert calls == ["dp"] * 3 + ["public"] * 2

    def sample(model, **kwargs):
        return generate(model, scheduler, [0, 1], **run, generator=torch.Generator().manual_seed(0), **kwargs)

    torch.testing.assert_close(sample(transformer, finisher=finisher, finisher_steps=5), sample(finisher))
    torch.testing.assert_close(sample(transformer, finisher=finisher, finisher_steps=0), sample(transformer))


def test_the_finisher_comes_from_the_two_pipeline_folders_and_must_name_the_same_classes(tmp_path):
    dp, public = tiny_pipeline(tmp_path / "dp", 0), tiny_pipeline(tmp_path / "public", 1)
    finished = sample_pixel_pipeline(dp, [0, 1], num_inference_steps=3, finisher_dir=public, finisher_steps=1)
    assert finished.shape == (2, 3, 8, 8)
    assert not torch.equal(finished, sample_pixel_pipeline(dp, [0, 1], num_inference_steps=3))
    other = tiny_pipeline(tmp_path / "other", 1, names=("b", "a"))
    with pytest.raises(ValueError, match="other classes"):
        sample_pixel_pipeline(dp, [0], num_inference_steps=3, finisher_dir=other, finisher_steps=1)


def test_interpolation_is_a_function_of_the_two_pipelines_only(tmp_path):
    dp, public = tiny_pipeline(tmp_path / "dp", 0), tiny_pipeline(tmp_path / "public", 1)
    (dp / "checkpoint-5").mkdir()  # what a run keeps beside its model: as secret as the data, never copied
    (dp / "checkpoint-5" / "random_states_0.pkl").write_bytes(b"secret")
    out = interpolate_pipeline(dp, public, 0.25, tmp_path / "mix")
    weights = [DiTTransformer2DModel.from_pretrained(f / "transformer").state_dict() for f in (dp, public, out)]
    for name, mixed in weights[2].items():
        torch.testing.assert_close(mixed, 0.25 * weights[0][name] + 0.75 * weights[1][name], rtol=1e-6, atol=1e-7)
    assert not (out / "checkpoint-5").exists()
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["epsilon"] == 10.0  # post-processing: the guarantee is the DP model's
    assert report["post_processing"] == [
        f"weights interpolated: 0.25 x the DP model + 0.75 x the public model {public}"
    ]
    assert "0.25 x the DP model + 0.75 x the public model" in (out / "README.md").read_text()


def test_interpolate_weights_refuses_bad_input_in_one_line(tmp_path, capfd):
    dp, public = tiny_pipeline(tmp_path / "dp", 0), tiny_pipeline(tmp_path / "public", 1)
    argv = [str(dp), str(public), "--alpha", "1.5", "--output_dir", str(tmp_path / "x")]
    result = subprocess.run(  # the script as a user runs it
        [sys.executable, str(REPO_ROOT / "interpolate_weights.py"), *argv], capture_output=True, text=True
    )
    assert (
        result.returncode == 2 and result.stderr.startswith("error: ") and "--alpha must be in [0, 1]" in result.stderr
    )
    assert "Traceback" not in result.stderr
    for argv, message in [  # the same entry point in this process
        ([str(dp), str(tmp_path), "--output_dir", str(tmp_path / "x")], "is not a pipeline folder"),
        ([str(dp), str(public), "--output_dir", str(public)], "one of the input pipelines"),
        ([str(dp), str(public), "--output_dir", str(tmp_path)], "exists"),
    ]:
        assert run_script(lambda: interpolate_weights.main(interpolate_weights.parse_args(argv))) == 2  # noqa: B023
        err = capfd.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
