"""gpu_table.py: the README's GPU table from bench_step.py's records (real ones on CPU, and as a GPU writes them)."""

import json

from benchmarks import bench_step, gpu_table


def test_the_table_of_real_records_compares_flash_bk_with_non_private():
    flags = ["--model", "XL-proxy", "--latent_size", "4", "--batch_size", "2", "--steps", "2", "--warmup", "1"]
    flags.append("--default_malloc")  # in this process: leave its malloc (and threads) as they are
    lines = [json.dumps(bench_step.run_mode(bench_step.parse_args([*flags, "--mode", m]))) for m in gpu_table.MODES]
    found = gpu_table.records(["| mode | s/step |", *lines, '{"mode": "flash", "error": "failed"}'])
    assert [r["mode"] for r in found] == list(gpu_table.MODES)  # the table's line and the failed mode skipped
    base, ours = found
    rows = gpu_table.table(found).splitlines()[2:]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[:5] == ["2", f"{base['samples_per_s']:.1f}", "-", f"{ours['samples_per_s']:.1f}", "-"]  # CPU: eager
    assert cells[5] == f"{ours['samples_per_s'] / base['samples_per_s']:.2f}"
    assert cells[6] == f"{ours['tensor_peak_mib'] / base['tensor_peak_mib']:.2f}"


def test_flash_bk_is_compared_with_the_faster_non_private_step():
    def record(batch, mode, graphs, samples, gib):
        return dict(
            mode=mode, batch_size=batch, cuda_graphs=graphs, samples_per_s=samples, peak_gib=gib, device="NVIDIA H200"
        )

    found = [
        record(128, "non_private", False, 420.0, 60.0),
        record(128, "flash_bk", False, 340.0, 58.0),
        record(64, "non_private", False, 300.0, 30.0),
        record(64, "non_private", True, 400.0, 32.0),
        record(64, "flash_bk", False, 200.0, 28.0),
        record(64, "flash_bk", True, 380.0, 33.0),
    ]
    assert gpu_table.table(found).splitlines()[2:] == [
        "| 64 | 300.0 | 400.0 | 200.0 | 380.0 | 0.95 | 1.03 |",
        "| 128 | 420.0 | - | 340.0 | - | 0.81 | 0.97 |",
    ]
