"""The suite: its small form on CPU end to end (fresh processes, JSON lines, PNGs, resume), the largest-batch search,
and a CPU memory limit that fails a step as out of memory."""

import json

import pytest

from benchmarks import run_config, suite

SMALL = ["--models", "DiT-S/2", "--latent_sizes", "4", "--batch_sizes", "1", "2", "--steps", "1", "--warmup", "0"]
SMALL += ["--modes", "non_private", "flash_bk", "--threads", "1", "--cpu"]


def test_small_suite_on_cpu_writes_json_lines_and_plots_and_resumes(tmp_path, capsys):
    args = suite.parse_args(SMALL + ["--output_dir", str(tmp_path)])
    suite.main(args)
    records = suite.load_results(tmp_path / "results.jsonl")
    assert [(r["mode"], r["batch_size"], r["status"]) for r in records] == [
        ("non_private", 1, "ok"),
        ("non_private", 2, "ok"),
        ("flash_bk", 1, "ok"),
        ("flash_bk", 2, "ok"),
    ]
    for r in records:
        assert r["device"] == "cpu" and r["threads"] == 1 and r["torch"] and r["opacus"] and r["commit"]
        assert r["samples_per_s"] > 0
        parts = sum(r[f"{k}_mib"] for k in ("parameters", "optimizer_state", "activations", "gradients"))
        parts += r["backward_extra_mib"] + r["optimizer_step_mib"]
        assert parts == pytest.approx(r["peak_mib"])  # the breakdown is the composition of the peak
        assert r["parameters_mib"] == pytest.approx(r["trainable_parameters"] * 4 / 2**20)
        assert r["optimizer_state_mib"] == pytest.approx(2 * r["parameters_mib"], rel=1e-4)  # AdamW: 2 moments, steps
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"DiT-S-2_latent4_fp32_full_{kind}.png" for kind in ("breakdown", "memory", "throughput")]
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*.png"))
    tables = (tmp_path / "tables.md").read_text()
    assert "| flash_bk | 2 |" in tables and "| non-private | 1 |" in tables
    suite.main(args)  # resumed: nothing runs again
    assert len(suite.load_results(tmp_path / "results.jsonl")) == 4


def test_largest_batch_doubles_then_bisects_and_resumes(tmp_path, monkeypatch):
    tried = []

    def fake_process(self, settings, steps):  # a model that fits up to batch 11
        tried.append(settings["batch_size"])
        fits = settings["batch_size"] <= 11
        return dict(settings, status="ok" if fits else "oom", samples_per_s=1.0, peak_mib=1.0)

    monkeypatch.setattr(suite.Suite, "_run_process", fake_process)
    args = suite.parse_args(["--cpu", "--max_batch", "--memory_limit", "1", "--output_dir", str(tmp_path)])
    config = suite.configurations(args)[0]
    summary = suite.Suite(args).largest_batch(config, 1, 4096, 1.0)
    assert summary["max_batch"] == 11 and summary["stopped_by"] == "oom"
    assert tried == [1, 2, 4, 8, 16, 12, 10, 11]
    tried.clear()
    assert suite.Suite(args).largest_batch(config, 1, 4096, 1.0)["max_batch"] == 11 and tried == []  # all reused
    summaries = [r for r in suite.load_results(tmp_path / "results.jsonl") if r["kind"] == "max_batch"]
    assert len(summaries) == 1


def test_cpu_max_batch_needs_a_memory_limit(capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--cpu", "--max_batch"])
    assert "--memory_limit" in capsys.readouterr().err


def test_a_step_over_the_cpu_memory_limit_is_out_of_memory():
    common = [
        "--mode",
        "flash_bk",
        "--latent_size",
        "4",
        "--trainable",
        "lora",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--cpu",
    ]
    fits = run_config.run(run_config.parse_args(common + ["--batch_size", "2"]))
    assert fits["status"] == "ok"
    limit = (fits["peak_mib"] - 0.5 * fits["activations_mib"]) / 1024  # below what the step needs
    over = run_config.run(run_config.parse_args(common + ["--batch_size", "2", "--memory_limit_gib", str(limit)]))
    assert over["status"] == "oom" and "GiB of live tensors" in over["error"]
    json.dumps(over)  # a JSON line
