"""Fine-tuning with train_dp_dit.py: what is trained (full, attention, LoRA), the fixed variance half, kept classes."""

import json
import shutil

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.loaders.peft import PeftAdapterMixin
from oracle import dit_batch, dit_losses, naive_clipped_sum, private_update, relative_error, tiny_dit
from safetensors.torch import load_file
from test_train_dp_dit import pixel_args, run_in_process, transformer_weights

import train_dp_dit
from dp_utils.errors import UserError
from dp_utils.training.adapters import load_lora_weights, lora_config, select_trainable
from dp_utils.training.variance import variance_row_indices

STEPS = ["--max_train_steps", 2, "--report_to", "none", "--checkpointing_steps", 0]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, pixel_pipeline, digits_cache):
    """A model the trainer saved (label table padded to 1000 rows, the cache's class names saved with it)."""
    out = tmp_path_factory.mktemp("trained_once") / "out"
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, out, "--noise_multiplier", 1, *STEPS))
    return out


def class_table(model):
    return model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.detach()


def test_lora_dit_of_the_trainer_equals_naive_loop(tmp_path):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_out_2"]
    args = train_dp_dit.parse_args(
        ["--model_config", "DiT-S/2", "--latent_cache", "unused", "--noise_multiplier", "1", "--trainable", "lora"]
        + ["--lora_rank", "3", "--lora_alpha", "6", "--lora_target_modules", *targets]
    )

    def lora_dit():
        model = tiny_dit(tmp_path, dtype=torch.float64)
        lora = lora_config(args.lora_rank, args.lora_alpha, args.lora_target_modules)
        select_trainable(model, args.trainable, args.embedders == "train", lora)
        torch.manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
                p.data.normal_(0, 0.1)
        return model

    rows, max_grad_norm = 4, 0.01
    batch = dit_batch(rows, dtype=torch.float64)
    expected, norms = naive_clipped_sum(lora_dit(), dit_losses, batch, max_grad_norm, torch.arange(rows))
    model = lora_dit()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * (2 * 5 + 1) and all(".lora_" in n for n in trained)  # A and B of 5 per block + head
    update, engine_norms = private_update(model, dit_losses, batch, max_grad_norm, "flash_bk", rows)
    torch.testing.assert_close(engine_norms, norms, rtol=1e-10, atol=0)
    assert relative_error(update, {n: e / rows for n, e in expected.items()}) < 1e-10
    for name in expected:  # and each parameter on its own scale
        torch.testing.assert_close(update[name], expected[name] / rows, rtol=1e-9, atol=1e-12 * norms.max().item())


def test_variance_rows_stay_fixed_and_noise_rows_train(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    run_in_process(
        *pixel_args(pixel_pipeline, digits_cache, out, "--noise_multiplier", 1, "--adam_weight_decay", 0.1, *STEPS)
    )
    start = DiTTransformer2DModel.from_pretrained(pixel_pipeline / "transformer").proj_out_2
    end = DiTTransformer2DModel.from_pretrained(out / "transformer").proj_out_2
    variance = variance_row_indices(patch_size=2, out_channels=6, channels=3)
    noise = torch.tensor([r for r in range(24) if r not in variance.tolist()])
    for name in ("weight", "bias"):
        before, after = getattr(start, name).detach(), getattr(end, name).detach()
        assert torch.equal(after[variance], before[variance])  # no update, no noise, no weight decay
        assert (after[noise] != before[noise]).flatten().all()  # every noise-half weight moved
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["fixed_rows"] == ["proj_out_2.weight", "proj_out_2.bias"]
    assert report["trained_parameters"] == report["total_parameters"] - len(variance) * (start.in_features + 1)


def test_attention_mode_trains_attention_only(tmp_path, pixel_pipeline, digits_cache):
    out = tmp_path / "out"
    run_in_process(
        *pixel_args(pixel_pipeline, digits_cache, out, "--noise_multiplier", 1, "--trainable", "attention", *STEPS)
    )
    start = DiTTransformer2DModel.from_pretrained(pixel_pipeline / "transformer").state_dict()
    end = transformer_weights(out)
    changed = {k for k in end if "class_embedder" not in k and not torch.equal(end[k], start[k])}
    attention = {k for k in start if ".attn1." in k}
    assert changed == attention and len(attention) == 2 * 8  # q, k, v, out: weight and bias, two blocks
    table = end["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    assert (table == table[1000]).all()  # frozen: the 10 new classes (no names to match) are the null row
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["trainable"] == "attention" and report["trained"] == [
        f"transformer_blocks.*.attn1.{m}.{p}" for m in ("to_q", "to_k", "to_v", "to_out.0") for p in ("weight", "bias")
    ]


def test_fine_tuning_a_trained_model_keeps_its_class_rows(trained_once, digits_cache, caplog):
    saved = class_table(DiTTransformer2DModel.from_pretrained(trained_once / "transformer"))
    args = train_dp_dit.parse_args(
        [str(a) for a in pixel_args(trained_once, digits_cache, trained_once.parent / "next", "--noise_multiplier", 1)]
    )
    with caplog.at_level("INFO"):
        model = train_dp_dit.open_data_and_model(args)[0]
    table = class_table(model)
    assert table.shape[0] == 11 and torch.equal(table[:10], saved[:10]) and torch.equal(table[10], saved[1000])
    assert not (saved[:10] == saved[1000]).all(dim=1).any()  # the kept rows are trained classes, not null rows
    assert "10 of 10 classes kept from the checkpoint by name" in caplog.text


def lora_args(checkpoint, cache, out, *extra):
    targets = ["--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "proj_out_2"]
    return pixel_args(checkpoint, cache, out, "--noise_multiplier", 1, "--trainable", "lora", *targets, *extra, *STEPS)


def test_lora_adapter_loads_on_the_checkpoint_as_merged(tmp_path, trained_once, digits_cache):
    out = tmp_path / "out"
    run_in_process(*lora_args(trained_once, digits_cache, out, "--save_merged", "--lora_rank", 2))
    merged = DiTTransformer2DModel.from_pretrained(out / "transformer")
    x, t, y, _ = dit_batch(3, classes=10)
    x = x[:, :3]
    with torch.no_grad():
        expected = merged(x, timestep=t, class_labels=y).sample
    ours = load_lora_weights(DiTTransformer2DModel.from_pretrained(trained_once / "transformer"), out)

    class DiTWithAdapters(DiTTransformer2DModel, PeftAdapterMixin):  # what diffusers' LoRA loader needs
        pass

    theirs = DiTWithAdapters.from_pretrained(trained_once / "transformer")
    theirs.load_lora_adapter(out, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    for model in (ours, theirs):
        with torch.no_grad():
            torch.testing.assert_close(model(x, timestep=t, class_labels=y).sample, expected, rtol=0, atol=1e-5)
    base = DiTTransformer2DModel.from_pretrained(trained_once / "transformer")
    variance = variance_row_indices(patch_size=2, out_channels=6, channels=3)
    assert torch.equal(merged.proj_out_2.weight[variance], base.proj_out_2.weight[variance])
    assert not torch.equal(merged.proj_out_2.weight, base.proj_out_2.weight)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["trainable"] == "lora" and report["lora"]["rank"] == 2
    lora_numel = sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n)
    assert report["trained_parameters"] == lora_numel - len(variance) * 2  # B's variance rows of proj_out_2 fixed
    assert "pytorch_lora_weights.safetensors" in (out / "README.md").read_text()


def test_lora_saves_the_adapter_alone_unless_it_cannot_reproduce_the_model(
    tmp_path, trained_once, pixel_pipeline, digits_cache
):
    alone = tmp_path / "alone"
    run_in_process(*lora_args(trained_once, digits_cache, alone))  # same classes, same rows: the adapter suffices
    assert (alone / "pytorch_lora_weights.safetensors").is_file() and not (alone / "transformer").exists()
    merged = tmp_path / "merged"
    run_in_process(*lora_args(pixel_pipeline, digits_cache, merged))  # new classes: a refitted label table
    assert (merged / "pytorch_lora_weights.safetensors").is_file() and (merged / "transformer").is_dir()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trainable", "lora", "--embedders", "train"], "--embedders train with --trainable lora"),
        (["--save_merged"], "--save_merged merges LoRA adapters: it needs --trainable lora"),
        (["--trainable", "lora", "--lora_rank", "0"], "--lora_rank must be >= 1"),
        (["--trainable", "lora", "--lora_alpha", "nan"], "--lora_alpha must be finite and > 0"),
    ],
)
def test_bad_adapter_flags_are_refused(flags, message):
    with pytest.raises(UserError, match=message):
        train_dp_dit.parse_args(
            ["--model_config", "DiT-S/2", "--latent_cache", "c", "--noise_multiplier", "1", *flags]
        )


def test_embedders_default_to_trained_in_full_mode_only():
    base = ["--model_config", "DiT-S/2", "--latent_cache", "c", "--noise_multiplier", "1"]
    assert train_dp_dit.parse_args(base).embedders == "train"
    assert train_dp_dit.parse_args([*base, "--trainable", "attention"]).embedders == "freeze"
    assert train_dp_dit.parse_args([*base, "--trainable", "attention", "--embedders", "train"]).embedders == "train"


def test_lora_run_with_ema_resumes_exactly(tmp_path, pixel_pipeline, digits_cache):
    flags = ["--noise_multiplier", 1, "--trainable", "lora", "--use_ema", "--report_to", "none"]
    flags += ["--max_train_steps", 2, "--checkpointing_steps", 1]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, full, *flags))
    checkpoint = full / "checkpoint-1"
    assert (checkpoint / "transformer" / "pytorch_lora_weights.safetensors").is_file()  # the adapter, loadable
    shutil.copytree(checkpoint, resumed / "checkpoint-1")
    run_in_process(*pixel_args(pixel_pipeline, digits_cache, resumed, *flags, "--resume_from_checkpoint", "latest"))
    expected, got = (load_file(d / "pytorch_lora_weights.safetensors") for d in (full, resumed))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
