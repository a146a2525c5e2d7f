"""train_dp_dit.py end to end through `accelerate launch` on CPU, on tiny pipelines saved to disk."""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from conftest import REPO_ROOT, TINY, free_port
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
from huggingface_hub import ModelCard
from PIL import Image

import train_dp_dit
from dp_utils.errors import UserError
from dp_utils.training.generation import generate


@pytest.fixture(scope="session")
def latent_pipeline(tmp_path_factory, tiny_vae_path):
    """A DiTPipeline (tiny transformer, the tiny VAE, DDPM) saved with save_pretrained, loaded back by path."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=16, **TINY)
    vae = AutoencoderKL.from_pretrained(tiny_vae_path)
    path = tmp_path_factory.mktemp("latent_pipeline")
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def launch(args, tmp_path, processes=1):
    """`accelerate launch train_dp_dit.py ...` on CPU; returns the finished process."""
    port = free_port()
    distributed = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1", "--cpu"]
    command = [
        "accelerate",
        "launch",
        *distributed,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(REPO_ROOT / "train_dp_dit.py"),
        "--report_to",
        "none",
        *[str(a) for a in args],
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def pixel_args(pipeline, cache, out, *extra):
    return [
        "--pretrained_model_name_or_path",
        pipeline,
        "--latent_cache",
        cache,
        "--output_dir",
        out,
        "--logical_batch_size",
        16,
        "--max_physical_batch_size",
        6,
        "--seed",
        3,
        *extra,
    ]


def transformer_weights(out):
    return DiTTransformer2DModel.from_pretrained(out / "transformer").state_dict()


def test_pixel_run_writes_model_samples_and_report(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    result = launch(
        pixel_args(
            pixel_pipeline,
            digits_cache,
            out,
            "--target_epsilon",
            8,
            "--max_train_steps",
            3,
            "--validation_steps",
            3,
            "--use_ema",
            "--noise_multiplicity",
            2,
            "--report_to",
            "tensorboard",
        ),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eps=" in result.stderr  # tqdm shows epsilon
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == 3 and report["dataset_size"] == 120 and report["noise_multiplicity"] == 2
    assert report["epsilon"] == pytest.approx(8, rel=0.02) and report["frozen"] == []
    assert report["sample_rate"] == pytest.approx(1 / 8)  # ceil(120 / 16) steps per epoch
    assert "one training image" in (out / "README.md").read_text()
    assert (out / "samples" / "step-000003.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # loss, epsilon and samples went to TensorBoard
    assert "Resizing the label table to the dataset's 10 classes" in result.stderr  # trained on 10 + null rows
    model = DiTTransformer2DModel.from_pretrained(out / "transformer")
    assert model.config.num_embeds_ada_norm == 1000  # saved padded: DiTPipeline's null class is id 1000
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert torch.equal(table[10], table[1000]) and torch.equal(table[999], table[1000])
    assert not torch.equal(table[9], table[1000])  # trained digit classes differ from the null row
    scheduler = DPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.thresholding and scheduler.config.sample_max_value == 1.0  # x0 kept in pixel range
    images = generate(model, scheduler, [0, 9], null_label=1000, num_inference_steps=2)
    assert images.shape == (2, 3, 8, 8)
    pipeline = DiTPipeline.from_pretrained(out)  # pixel space too: its VAE decodes to its input
    assert sorted(pipeline.labels) == [str(digit) for digit in range(10)]
    generator = torch.Generator().manual_seed(0)
    image = pipeline(pipeline.get_label_ids(["9"]), num_inference_steps=2, generator=generator, output_type="pt")
    images = image.images
    if not torch.is_tensor(images):  # diffusers 0.34's DiTPipeline returns "pt" output as numpy (B, H, W, C)
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(  # the same sampler and the same draws as the trainer's own sampling code
        images,
        generate(model, scheduler, [9], null_label=1000, num_inference_steps=2, generator=generator),
        rtol=0,
        atol=1e-4,
    )


def test_latent_run_loads_as_dit_pipeline_by_class_name(tmp_path, latent_pipeline, photo_cache):
    """photos/ -> precompute_latents.py (fixture) -> accelerate launch -> DiTPipeline.from_pretrained, by name."""
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", latent_pipeline, "--latent_cache", photo_cache, "--output_dir", out]
    args += ["--logical_batch_size", 4, "--max_physical_batch_size", 2, "--noise_multiplier", 1.0]
    args += ["--max_train_steps", 2, "--checkpointing_steps", 1, "--use_ema", "--validation_steps", 2]
    args += ["--num_validation_images", 2, "--num_inference_steps", 2, "--lr_scheduler", "linear"]
    result = launch(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "***** Running training *****" in result.stderr and "Num examples (N) = 7" in result.stderr
    assert "lr=" in result.stderr and "img/s=" in result.stderr

    pipeline = DiTPipeline.from_pretrained(out)
    assert pipeline.labels == {"cat": 0, "misc": 1}  # the image folder's class names, from model_index.json
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.get_label_ids(["dog"])
    image = pipeline(pipeline.get_label_ids(["misc"]), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)

    checkpoint = out / "checkpoint-1"
    for folder in ("transformer", "transformer_ema"):
        model = DiTTransformer2DModel.from_pretrained(checkpoint / folder)
        assert model.config.num_embeds_ada_norm == 2  # the label table as trained: two classes and the null row
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(latent_pipeline) and card.data.library_name == "diffusers"
    assert {"differential-privacy", "dit", "diffusers"} <= set(card.data.tags)
    assert card.text.lstrip().startswith(f"# {latent_pipeline} fine-tuned with DP-SGD")
    assert "`cat`" in card.text and "`misc`" in card.text and "](samples/step-000002.png)" in card.text
    grid = Image.open(out / "samples" / "step-000002.png")
    assert grid.height > 2 * 128 and grid.width > 2 * 128  # two rows (classes) of two upscaled, spaced samples


def test_two_processes_train_in_step(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    result = launch(
        pixel_args(
            pixel_pipeline,
            digits_cache,
            out,
            "--noise_multiplier",
            1.0,
            "--max_train_steps",
            4,
            "--logical_batch_size",
            4,
        ),
        tmp_path,
        processes=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]  # includes the check that both ranks hold equal weights
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 4


def test_resume_equals_uninterrupted_run_and_spent_budget_is_refused(tmp_path, pixel_pipeline, digits_cache):
    flags = ["--target_epsilon", 5, "--max_train_steps", 4, "--checkpointing_steps", 2, "--use_ema"]
    full = tmp_path / "full"
    result = launch(pixel_args(pixel_pipeline, digits_cache, full, *flags), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    result = launch(
        pixel_args(pixel_pipeline, digits_cache, resumed, *flags, "--resume_from_checkpoint", "latest"), tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = transformer_weights(full), transformer_weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # same batches, noise and draws: same weights
    reports = [json.loads((d / "privacy_report.json").read_text()) for d in (full, resumed)]
    assert reports[0] == reports[1]  # epsilon continued from the checkpoint, not from zero

    result = launch(
        pixel_args(pixel_pipeline, digits_cache, full, *flags, "--resume_from_checkpoint", full / "checkpoint-4"),
        tmp_path,
    )
    assert result.returncode != 0 and "privacy budget of this run is already spent" in result.stderr


def run_in_process(*args):
    train_dp_dit.main(train_dp_dit.parse_args([str(a) for a in args]))


def test_bad_inputs_fail_before_training(tmp_path, pixel_pipeline, latent_pipeline, digits_cache):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="No finished latent cache.*precompute_latents.py"):
        run_in_process(*pixel_args(pixel_pipeline, tmp_path / "nowhere", out, "--noise_multiplier", 1))
    with pytest.raises(ValueError, match="3-channel pixels.*in_channels=4"):
        run_in_process(
            "--pretrained_model_name_or_path",
            latent_pipeline,
            "--latent_cache",
            digits_cache,
            "--output_dir",
            out,
            "--noise_multiplier",
            1,
            "--report_to",
            "none",
        )
    assert not out.exists()  # nothing half-written
    tampered = tmp_path / "tampered"  # rows with labels 0..9, metadata that lists 4 classes
    shutil.copytree(digits_cache, tampered)
    info = json.loads((tampered / "cache_info.json").read_text())
    info.update(num_classes=4, class_names=list("0123"), class_to_index={c: k for k, c in enumerate("0123")})
    (tampered / "cache_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"Row \d+ of the cache .* has label [4-9] .*re-create it"):
        run_in_process(*pixel_args(pixel_pipeline, tampered, out, "--noise_multiplier", 1, "--report_to", "none"))
    assert not out.exists()
    if not torch.cuda.is_available():  # the static step's flags, on a machine that cannot run them
        for flags, message in (
            (["--cuda_graphs"], "cuda_graphs needs a CUDA device"),
            (["--attention_backend", "flash"], "runs on CUDA only"),
        ):
            with pytest.raises(UserError, match=message):
                run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, "--noise_multiplier", 1, *flags))
            assert not out.exists()
    with pytest.raises(ValueError, match="exactly one of --pretrained_model_name_or_path or --model_config"):
        train_dp_dit.parse_args(["--latent_cache", str(digits_cache), "--noise_multiplier", "1"])
    with pytest.raises(UserError, match="one of the arguments --target_epsilon --noise_multiplier is required"):
        train_dp_dit.parse_args(["--model_config", "DiT-S/2", "--latent_cache", str(digits_cache)])


def test_resume_with_other_privacy_flags_is_refused(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    result = launch(
        pixel_args(
            pixel_pipeline,
            digits_cache,
            out,
            "--noise_multiplier",
            1.0,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            1,
        ),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(ValueError, match="noise_multiplier.*resuming would break the privacy accounting"):
        run_in_process(
            *pixel_args(
                pixel_pipeline,
                digits_cache,
                out,
                "--noise_multiplier",
                2.0,
                "--max_train_steps",
                2,
                "--resume_from_checkpoint",
                out / "checkpoint-1",
                "--report_to",
                "none",
            )
        )


def test_noise_free_baseline_reports_no_guarantee(tmp_path, pixel_pipeline, digits_cache, capfd):
    """Also: a physical batch larger than the dataset is cut to N rows (past N there would only be padding)."""
    out = tmp_path / "out"
    flags = ["--noise_multiplier", 0, "--max_grad_norm", 1e6, "--max_train_steps", 2, "--report_to", "none"]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, *flags, "--max_physical_batch_size", 10**5))
    assert json.loads((out / "privacy_report.json").read_text())["epsilon"] is None
    assert "no privacy guarantee" in (out / "README.md").read_text()
    log = capfd.readouterr().err
    n = re.search(r"Num examples \(N\) = (\d+)", log).group(1)
    assert f"physical batches of at most {n} per process" in log


def test_the_cuda_graph_path_trains_as_the_eager_one(tmp_path, pixel_pipeline, digits_cache, cuda_graph_stand_ins):
    """The trainer's graphed physical and noisy steps (CPU stand-ins for the capture; SGD, as CPU Adam cannot be
    capturable; noise off and the batches drawn from one seed, so that both runs can be compared) give the eager
    run's weights."""
    flags = ["--optimizer", "sgd", "--noise_multiplier", 0, "--max_grad_norm", 1.0, "--max_train_steps", 5]
    flags += ["--report_to", "none", "--lr_scheduler", "linear", "--lr_warmup_steps", 2, "--noise_seed", 5]
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, tmp_path / "eager", *flags, "--no_cuda_graphs"))
    assert not cuda_graph_stand_ins
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, tmp_path / "graphed", *flags, "--cuda_graphs"))
    # the physical step once (no generator of its own), the noisy step at steps 4 and 5 (SGD's lr, a number baked
    # into the graph, changes every step of the linear schedule)
    assert len(cuda_graph_stand_ins) == 3 and cuda_graph_stand_ins[0] is None
    expected, got = transformer_weights(tmp_path / "eager"), transformer_weights(tmp_path / "graphed")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
