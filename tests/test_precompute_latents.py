"""precompute_latents.py on real sample photos and digits: content, resume, several processes, error messages."""

import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import CORRUPT_FILES, NUM_DIGITS, PHOTO_FILES, REPO_ROOT, free_port, run_precompute
from diffusers import AutoencoderKL
from PIL import Image

import dp_utils.data.encoding
import precompute_latents
from dp_utils.data.images import load_image, preprocess_image
from dp_utils.data.latent_cache import CACHE_INFO_NAME, CacheNotFoundError, load_latent_cache
from dp_utils.errors import UserError, run_script

GOOD_PHOTOS = [f for f in PHOTO_FILES if f not in CORRUPT_FILES]


def read_cache(path) -> tuple[dict, dict]:
    """All columns of a cache as numpy arrays / lists, and its metadata."""
    rows = datasets.load_from_disk(str(path)).with_format("numpy")[:]
    return rows, json.loads((path / CACHE_INFO_NAME).read_text())


def assert_same_rows(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    assert list(a["source"]) == list(b["source"])
    if "label" in a:
        np.testing.assert_array_equal(a["label"], b["label"])
    for name in ("mean", "std"):
        if name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        precompute_latents.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in [
        "--dataset_name",
        "--dataset_config_name",
        "--data_dir",
        "--split",
        "--image_column",
        "--label_column",
        "--train_data_dir",
        "--vae",
        "--pretrained_model_name_or_path",
        "--resolution",
        "--flip",
        "--mixed_precision",
        "--batch_size",
        "--dataloader_num_workers",
        "--output_dir",
        "--cache_dir",
        "--shard_size",
        "--strict",
        "--overwrite_output_dir",
    ]:
        assert flag in text


def test_photo_cache_contents(photo_cache, photo_dir):
    rows, info = read_cache(photo_cache)
    features = datasets.load_from_disk(str(photo_cache)).features
    assert features["mean"] == datasets.Array4D((2, 4, 16, 16), "float32")
    assert features["std"] == datasets.Array4D((2, 4, 16, 16), "float32")
    assert features["label"] == datasets.ClassLabel(names=["cat", "misc"])
    assert list(rows["source"]) == GOOD_PHOTOS
    assert rows["label"].tolist() == [0 if f.startswith("cat/") else 1 for f in GOOD_PHOTOS]
    assert rows["mean"].shape == (7, 2, 4, 16, 16) and rows["mean"].dtype == np.float32
    assert (rows["std"] > 0).all()
    assert info["num_rows"] == 7 and info["latent_shape"] == [4, 16, 16] and info["channels"] == 4
    assert info["conditional"] and info["num_classes"] == 2
    assert info["class_names"] == ["cat", "misc"] and info["class_to_index"] == {"cat": 0, "misc": 1}
    assert info["flip"] and info["num_views"] == 2 and info["resolution"] == 32
    assert info["scaling_factor"] == pytest.approx(0.18215) and not info["pixel_space"]
    assert [s["source"] for s in info["skipped"]] == CORRUPT_FILES and info["num_skipped"] == 2
    assert "truncated" in info["skipped"][0]["error"]
    assert "--train_data_dir" in info["command"]
    assert not (photo_cache / "shards").exists()


def test_latent_mean_and_std_equal_the_vae_encoding(photo_cache, photo_dir, tiny_vae_path):
    rows, info = read_cache(photo_cache)
    vae = AutoencoderKL.from_pretrained(tiny_vae_path)
    for name in ["cat/chelsea.jpg", "misc/astronaut_rgba.png", "misc/camera16.png"]:
        pixels = preprocess_image(load_image(photo_dir / name), 32)
        x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 127.5 - 1  # (1, 3, 32, 32)
        row = list(rows["source"]).index(name)
        with torch.no_grad():
            for view, image in enumerate([x, x.flip(-1)]):
                dist = vae.encode(image).latent_dist
                np.testing.assert_allclose(rows["mean"][row, view], dist.mean[0] * 0.18215, atol=1e-5)
                np.testing.assert_allclose(rows["std"][row, view], dist.std[0] * 0.18215, atol=1e-5)
    assert not np.allclose(rows["mean"][:, 0], rows["mean"][:, 1])  # the mirrored view is a different image


def test_resume_after_a_killed_run_gives_the_same_cache(tmp_path, photo_cache, photo_cache_args, monkeypatch):
    out = tmp_path / "cache"
    calls = []
    real_encode = dp_utils.data.encoding.encode_batch

    def crash_in_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # shard 0 took two batches of 2; die in shard 1
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(dp_utils.data.encoding, "encode_batch", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(photo_cache_args + ["--output_dir", out])
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000", "00000.done.json", "settings.json"]
    assert not (out / CACHE_INFO_NAME).exists()
    with pytest.raises(CacheNotFoundError, match="unfinished shards"):
        load_latent_cache(out)
    (out / "shards/00001.tmp").mkdir()  # a half-written shard: never counted as done
    (out / "shards/00001.tmp/junk.arrow").write_bytes(b"half")

    calls.clear()
    counted = lambda *a, **k: calls.append(1) or real_encode(*a, **k)  # noqa: E731
    monkeypatch.setattr(dp_utils.data.encoding, "encode_batch", counted)
    run_precompute(photo_cache_args + ["--output_dir", out])
    assert len(calls) == 4  # shard 0 was not encoded again; shards 1 and 2 took two batches each
    resumed, resumed_info = read_cache(out)
    reference, reference_info = read_cache(photo_cache)
    assert_same_rows(resumed, reference)
    assert resumed_info["skipped"] == reference_info["skipped"]
    assert resumed_info["settings"] == reference_info["settings"]

    run_precompute(photo_cache_args + ["--output_dir", out])  # finished: nothing to do, nothing encoded
    assert len(calls) == 4


def test_two_processes_give_the_same_cache(tmp_path, photo_cache, photo_cache_args):
    port = free_port()
    out = tmp_path / "cache"
    # `--cpu` would start a single process; on a machine without GPUs the script runs these on CPU with gloo.
    command = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(REPO_ROOT / "precompute_latents.py"),
        *photo_cache_args,
        "--output_dir",
        str(out),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process 1 of 2: shards [1]" in result.stderr
    rows, info = read_cache(out)
    reference, reference_info = read_cache(photo_cache)
    # Equal up to float rounding: the launcher gives each process fewer CPU threads, which reorders some sums.
    assert_same_rows(rows, reference, atol=1e-6)
    assert info["skipped"] == reference_info["skipped"] and info["num_rows"] == 7


def test_imagefolder_through_load_dataset_equals_the_folder_reader(tmp_path, photo_cache, photo_cache_args):
    argv = list(photo_cache_args)
    argv[argv.index("--train_data_dir")] = "--data_dir"
    run_precompute(
        [
            "--dataset_name",
            "imagefolder",
            *argv,
            "--cache_dir",
            tmp_path / "hf",
            "--output_dir",
            tmp_path / "cache",
            "--dataloader_num_workers",
            2,
        ]
    )  # rows decoded in worker processes
    rows, info = read_cache(tmp_path / "cache")
    reference, reference_info = read_cache(photo_cache)
    assert list(rows["source"]) == [f"train[{PHOTO_FILES.index(f)}]" for f in GOOD_PHOTOS]
    rows["source"] = reference["source"]
    assert_same_rows(rows, reference)
    assert [s["source"] for s in info["skipped"]] == ["train[3]", "train[7]"]
    assert info["class_names"] == reference_info["class_names"]


def test_string_labels_become_sorted_class_names(tmp_path, digits_dataset_dir):
    digits = datasets.load_from_disk(str(digits_dataset_dir)).select(range(6))
    names = ["even" if y % 2 == 0 else "odd" for y in digits["label"]]
    digits.remove_columns("label").add_column("parity", names).save_to_disk(str(tmp_path / "parity"))
    run_precompute(
        [
            "--dataset_name",
            tmp_path / "parity",
            "--label_column",
            "parity",
            "--vae",
            "none",
            "--resolution",
            8,
            "--output_dir",
            tmp_path / "cache",
        ]
    )
    rows, info = read_cache(tmp_path / "cache")
    assert info["class_names"] == ["even", "odd"]
    assert rows["label"].tolist() == [0 if n == "even" else 1 for n in names]


def test_digits_in_pixel_space(digits_cache, digits_dataset_dir):
    from sklearn.datasets import load_digits

    rows, info = read_cache(digits_cache)
    digits = load_digits()
    assert "std" not in rows and rows["mean"].shape == (NUM_DIGITS, 2, 3, 8, 8)
    expected = np.rint(digits.images[:NUM_DIGITS] * 255 / 16) / 127.5 - 1  # (N, 8, 8), as written to PNG
    np.testing.assert_allclose(rows["mean"][:, 0], np.repeat(expected[:, None], 3, axis=1), atol=1e-6)
    np.testing.assert_allclose(rows["mean"][:, 1], rows["mean"][:, 0, :, :, ::-1])
    assert rows["label"].tolist() == digits.target[:NUM_DIGITS].tolist()
    assert list(rows["source"][:2]) == ["train[0]", "train[1]"]
    assert info["pixel_space"] and info["vae"] is None and info["scaling_factor"] is None
    assert info["latent_shape"] == [3, 8, 8] and info["num_classes"] == 10 and info["class_names"][3] == "3"


def test_unconditional_folder_and_pipeline_vae(tmp_path, photo_dir, tiny_vae_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ["cat/chelsea.jpg", "misc/rocket.png"]:
        shutil.copy(photo_dir / name, images / name.split("/")[1])
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_vae_path, pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    out = tmp_path / "cache"
    run_precompute(
        [
            "--train_data_dir",
            images,
            "--pretrained_model_name_or_path",
            pipeline,
            "--resolution",
            32,
            "--output_dir",
            out,
        ]
    )
    rows, info = read_cache(out)
    assert "label" not in rows and list(rows["source"]) == ["chelsea.jpg", "rocket.png"]
    assert not info["conditional"] and info["class_names"] is None and info["num_classes"] == 0
    assert info["vae_subfolder"] == "vae" and rows["mean"].shape == (2, 1, 4, 16, 16)
    with pytest.raises(UserError, match="pipeline folder: pass it as --pretrained_model_name_or_path"):
        run_precompute(["--train_data_dir", images, "--vae", pipeline, "--output_dir", tmp_path / "other"])


def test_dataset_without_label_column_is_unconditional(tmp_path, digits_dataset_dir):
    images = datasets.load_from_disk(str(digits_dataset_dir)).select(range(5)).remove_columns("label")
    images.save_to_disk(str(tmp_path / "images"))
    run_precompute(
        ["--dataset_name", tmp_path / "images", "--vae", "none", "--resolution", 8, "--output_dir", tmp_path / "cache"]
    )
    rows, info = read_cache(tmp_path / "cache")
    assert not info["conditional"] and "label" not in rows and len(rows["source"]) == 5


def test_strict_makes_a_corrupt_image_an_error(tmp_path, photo_cache_args):
    with pytest.raises(UserError, match=r"Cannot read image cat/truncated\.jpg.*without --strict"):
        run_precompute(photo_cache_args + ["--strict", "--output_dir", tmp_path / "cache"])


@pytest.fixture
def no_encoding(monkeypatch):
    """Fail the test if anything gets encoded: input errors must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("encoded before validating the input")

    monkeypatch.setattr(dp_utils.data.encoding, "encode_batch", fail)
    monkeypatch.setattr(dp_utils.data.encoding, "to_model_input", fail)


def test_resolution_not_a_multiple_of_the_vae_factor(tmp_path, photo_dir, tiny_vae_path, no_encoding):
    with pytest.raises(UserError, match="--resolution 33 is not a multiple of the VAE's downsampling factor 2"):
        run_precompute(
            [
                "--train_data_dir",
                photo_dir,
                "--vae",
                tiny_vae_path,
                "--resolution",
                33,
                "--output_dir",
                tmp_path / "cache",
            ]
        )
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image_column", "picture"], r"--image_column 'picture' is not in .*columns: \['image', 'label'\]"),
        (["--label_column", "digit"], r"--label_column 'digit' is not in .*columns: \['image', 'label'\]"),
    ],
)
def test_missing_columns_name_the_available_ones(tmp_path, digits_dataset_dir, no_encoding, extra, message):
    with pytest.raises(UserError, match=message):
        run_precompute(
            [
                "--dataset_name",
                digits_dataset_dir,
                "--vae",
                "none",
                "--resolution",
                8,
                "--output_dir",
                tmp_path / "cache",
                *extra,
            ]
        )


def test_missing_split_names_the_available_ones(tmp_path, digits_dataset_dir, no_encoding):
    splits = datasets.DatasetDict({"train": datasets.load_from_disk(str(digits_dataset_dir)).select(range(3))})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(UserError, match=r"--split test is not in .*available splits: \['train'\]"):
        run_precompute(
            [
                "--dataset_name",
                tmp_path / "splits",
                "--split",
                "test",
                "--vae",
                "none",
                "--output_dir",
                tmp_path / "cache",
            ]
        )


def test_empty_inputs(tmp_path, digits_dataset_dir, no_encoding):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        run_precompute(["--train_data_dir", tmp_path / "empty", "--vae", "none", "--output_dir", tmp_path / "c"])
    (tmp_path / "none").mkdir()
    datasets.load_from_disk(str(digits_dataset_dir)).select([]).to_parquet(str(tmp_path / "none/train.parquet"))
    with pytest.raises(UserError, match="Could not load split 'train' of --dataset_name .*no data"):
        run_precompute(
            [
                "--dataset_name",
                tmp_path / "none",
                "--vae",
                "none",
                "--output_dir",
                tmp_path / "c",
                "--cache_dir",
                tmp_path / "hf_cache",
            ]
        )
    (tmp_path / "classes/a").mkdir(parents=True)
    (tmp_path / "classes/b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "classes/a/x.png")
    with pytest.raises(UserError, match="Class folder .*b has no images"):
        run_precompute(["--train_data_dir", tmp_path / "classes", "--vae", "none", "--output_dir", tmp_path / "c"])


def test_output_dir_with_other_settings_or_other_files(tmp_path, photo_cache, photo_cache_args, no_encoding):
    copy = tmp_path / "cache"
    shutil.copytree(photo_cache, copy)
    with pytest.raises(UserError, match=r"different settings \(resolution: 32 there, 64 now\).*another --output_dir"):
        run_precompute([*photo_cache_args, "--resolution", 64, "--output_dir", copy])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no latent cache"):
        run_precompute([*photo_cache_args, "--output_dir", tmp_path / "notes"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output_dir", "x"], "exactly one of --dataset_name or --train_data_dir"),
        (["--train_data_dir", "a", "--dataset_name", "b", "--output_dir", "x"], "exactly one of"),
        (
            ["--train_data_dir", "a", "--vae", "v", "--pretrained_model_name_or_path", "p", "--output_dir", "x"],
            "not both",
        ),
        (["--train_data_dir", "a", "--resolution", "0", "--output_dir", "x"], "--resolution must be positive"),
    ],
)
def test_bad_flag_combinations(argv, message):
    with pytest.raises(UserError, match=message):
        precompute_latents.parse_args(argv)


# The input is fingerprinted by content: a changed input is never taken for the cached one, nor mixed with it.


def save_digits(digits_dataset_dir, rows, path, labels=None) -> None:
    """Rows `rows` of the digits dataset saved to `path` (same count, same 8x8 size), with other labels if given."""
    subset = datasets.load_from_disk(str(digits_dataset_dir)).select(rows)
    if labels is not None:
        subset = (
            subset.remove_columns("label").add_column("label", labels).cast_column("label", subset.features["label"])
        )
    shutil.rmtree(path, ignore_errors=True)
    subset.save_to_disk(str(path))


def digit_pixels(rows) -> np.ndarray:
    """The digits as the pixel cache stores them at 8x8: (N, 3, 8, 8) in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images[rows] * 255 / 16) / 127.5 - 1  # (N, 8, 8), as written to PNG
    return np.repeat(images[:, None], 3, axis=1)


def test_rerun_after_the_dataset_changed_is_refused_then_overwritten(tmp_path, digits_dataset_dir, monkeypatch):
    data, out = tmp_path / "digits", tmp_path / "cache"
    argv = ["--dataset_name", data, "--vae", "none", "--resolution", 8, "--output_dir", out]
    save_digits(digits_dataset_dir, range(12), data)
    run_precompute(argv)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    save_digits(digits_dataset_dir, range(12, 24), data)  # other images, same count and size: a new input
    with pytest.raises(
        UserError,
        match=r"finished cache of a different input \(the images, names or labels changed "
        r"in 1 of 1 shards .*train\[0\] \.\. train\[11\]\).*--overwrite_output_dir",
    ):
        run_precompute(argv)
    labels = datasets.load_from_disk(str(digits_dataset_dir)).select(range(12))["label"]
    save_digits(digits_dataset_dir, range(12), data, labels=labels[::-1])  # the same images, other labels
    with pytest.raises(UserError, match="finished cache of a different input"):
        run_precompute(argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before writing anything

    save_digits(digits_dataset_dir, range(12, 24), data)
    run_precompute([*argv, "--overwrite_output_dir"])
    rows, info = read_cache(out)
    np.testing.assert_allclose(rows["mean"][:, 0], digit_pixels(range(12, 24)), atol=1e-6)
    assert rows["label"].tolist() == datasets.load_from_disk(str(data))["label"]
    assert info["num_inputs"] == 12 and len(info["shard_fingerprints"]) == 1

    monkeypatch.setattr(dp_utils.data.encoding, "to_model_input", lambda *a: pytest.fail("encoded an unchanged input"))
    run_precompute([*argv, "--overwrite_output_dir"])  # the cache matches its input: kept, even with the flag

    info = json.loads((out / CACHE_INFO_NAME).read_text())
    for key in ("num_inputs", "input_fingerprint", "shard_fingerprints"):
        del info[key]
    (out / CACHE_INFO_NAME).write_text(json.dumps(info))  # as written before caches recorded their content
    with pytest.raises(UserError, match="made before caches recorded their input's content.*--overwrite_output_dir"):
        run_precompute(argv)


def test_settings_change_needs_overwrite_and_never_touches_other_files(tmp_path, digits_dataset_dir):
    out = tmp_path / "cache"
    argv = ["--dataset_name", digits_dataset_dir, "--vae", "none", "--output_dir", out]
    run_precompute([*argv, "--resolution", 8])
    with pytest.raises(UserError, match=r"different settings \(resolution: 8 there, 16 now\).*--overwrite_output_dir"):
        run_precompute([*argv, "--resolution", 16])
    run_precompute([*argv, "--resolution", 16, "--overwrite_output_dir"])
    rows, info = read_cache(out)
    assert info["resolution"] == 16 and rows["mean"].shape == (NUM_DIGITS, 1, 3, 16, 16)
    assert sorted(p.name for p in out.iterdir()) == [
        CACHE_INFO_NAME,
        "data-00000-of-00001.arrow",
        "dataset_info.json",
        "state.json",
    ]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no latent cache"):
        run_precompute([*argv, "--resolution", 8, "--output_dir", tmp_path / "notes", "--overwrite_output_dir"])
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


PHOTOS = {  # 40x40 crops of scikit-image's photos, written as BMP: a file's size depends only on the image size
    "a/1.bmp": lambda d: d.astronaut()[100:140, 200:240],
    "a/2.bmp": lambda d: d.coffee()[100:140, 200:240],
    "a/3.bmp": lambda d: d.chelsea()[100:140, 200:240],
    "b/4.bmp": lambda d: d.rocket()[100:140, 200:240],
    "b/5.bmp": lambda d: np.repeat(d.camera()[100:140, 200:240, None], 3, axis=-1),
    "b/6.bmp": lambda d: d.astronaut()[300:340, 100:140],
}


def write_photos(root) -> None:
    from skimage import data

    for name, crop in PHOTOS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop(data)).save(root / name)


def edit_in_place(path) -> None:
    """Another photo into `path`, of the same size in bytes."""
    from skimage import data

    size = path.stat().st_size
    Image.fromarray(data.coffee()[250:290, 400:440]).save(path)
    assert path.stat().st_size == size


def count_encoded(monkeypatch, crash_at: int | None = None) -> list:
    """Count the batches encoded (one per shard here); raise KeyboardInterrupt at batch `crash_at`."""
    calls, real = [], dp_utils.data.encoding.to_model_input

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dp_utils.data.encoding, "to_model_input", counted)
    return calls


def test_resume_after_images_were_edited_in_place_never_mixes_them(tmp_path, monkeypatch, capsys):
    write_photos(tmp_path / "photos")
    out = tmp_path / "cache"
    argv = ["--train_data_dir", tmp_path / "photos", "--vae", "none", "--resolution", 8, "--shard_size", 2]
    calls = count_encoded(monkeypatch, crash_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_precompute([*argv, "--output_dir", out])  # shards 0 and 1 finished, killed in shard 2
    edit_in_place(tmp_path / "photos/a/1.bmp")  # in shard 0

    calls = count_encoded(monkeypatch)
    run_precompute([*argv, "--output_dir", out])
    assert len(calls) == 2  # shard 0 again (its image changed) and shard 2; shard 1 kept
    assert "finished shards [0] changed since they were encoded" in capsys.readouterr().err
    run_precompute([*argv, "--output_dir", tmp_path / "fresh"])
    resumed, fresh = read_cache(out)[0], read_cache(tmp_path / "fresh")[0]
    assert_same_rows(resumed, fresh)


def test_images_changed_during_the_run_are_caught(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos")
    out = tmp_path / "cache"
    argv = ["--train_data_dir", tmp_path / "photos", "--vae", "none", "--resolution", 8, "--shard_size", 2]
    real = precompute_latents.encode_shard

    def edit_before_shard_1(source, start, *args):
        if start == 2:
            edit_in_place(tmp_path / "photos/a/3.bmp")  # after the fingerprint was taken
        return real(source, start, *args)

    monkeypatch.setattr(precompute_latents, "encode_shard", edit_before_shard_1)
    with pytest.raises(UserError, match=r"Images among a/3\.bmp \.\. b/4\.bmp changed while they were being encoded"):
        run_precompute([*argv, "--output_dir", out])
    assert not (out / CACHE_INFO_NAME).exists()

    monkeypatch.setattr(precompute_latents, "encode_shard", real)
    calls = count_encoded(monkeypatch)
    run_precompute([*argv, "--output_dir", out])
    assert len(calls) == 0  # shard 1 was encoded from the edited bytes and recorded with their fingerprint
    run_precompute([*argv, "--output_dir", tmp_path / "fresh"])
    assert_same_rows(read_cache(out)[0], read_cache(tmp_path / "fresh")[0])


def test_a_class_with_no_readable_image_is_refused(tmp_path, digits_dataset_dir):
    write_photos(tmp_path / "photos")
    for name in ("b/4.bmp", "b/5.bmp", "b/6.bmp"):
        (tmp_path / "photos" / name).write_bytes(b"not an image")
    out = tmp_path / "cache"
    argv = ["--train_data_dir", tmp_path / "photos", "--vae", "none", "--resolution", 8, "--output_dir", out]
    with pytest.raises(
        UserError,
        match=r"Class 'b' has no readable image \(e\.g\. b/4\.bmp: UnidentifiedImageError"
        r".*remove its folder",
    ):
        run_precompute(argv)
    assert not (out / CACHE_INFO_NAME).exists() and (out / "shards").is_dir()
    shutil.rmtree(tmp_path / "photos/b")
    run_precompute(argv)
    rows, info = read_cache(out)
    assert info["class_names"] == ["a"] and rows["label"].tolist() == [0, 0, 0]

    shutil.rmtree(tmp_path / "photos/a")
    (tmp_path / "photos/c").mkdir()
    (tmp_path / "photos/c/x.png").write_bytes(b"not an image either")
    with pytest.raises(UserError, match=r"None of the 1 input images could be read, e\.g\. c/x\.png"):
        run_precompute([*argv[:-1], tmp_path / "other"])

    # A ClassLabel's classes without any row are not unreadable: they keep their index (fine-tuning on a subset).
    save_digits(digits_dataset_dir, [0, 1, 2, 10, 11, 12], tmp_path / "three")
    run_precompute(
        ["--dataset_name", tmp_path / "three", "--vae", "none", "--resolution", 8, "--output_dir", tmp_path / "subset"]
    )
    rows, info = read_cache(tmp_path / "subset")
    assert info["num_classes"] == 10 and sorted(set(rows["label"].tolist())) == [0, 1, 2]


def test_a_folder_of_every_image_mode_is_encoded_faithfully(tmp_path):
    """Each mode's file, through the script in pixel space, against the 8-bit original's preprocessing."""
    from skimage import data

    camera, coffee = data.camera(), data.coffee()
    folder = tmp_path / "modes"
    folder.mkdir()
    files = {
        "I16.png": (Image.fromarray(camera.astype(np.uint16) * 257), camera),
        "int32.tif": (Image.fromarray(camera.astype(np.int32) * 1000), camera),
        "int16.tif": (Image.fromarray(camera.astype(np.int16) - 1024), camera),
        "float.tif": (Image.fromarray(camera.astype(np.float32) / 255), camera),
        "float_any.tif": (Image.fromarray(camera.astype(np.float32) * 3.5 - 400), camera),
        "onebit.png": (Image.fromarray(camera > 128), np.where(camera > 128, 255, 0).astype(np.uint8)),
        "palette.png": (Image.fromarray(coffee).quantize(64), coffee),
        "cmyk.jpg": (Image.fromarray(coffee).convert("CMYK"), coffee),
        "cmyk.tif": (Image.fromarray(coffee).convert("CMYK"), coffee),
        "grey_alpha.png": (Image.fromarray(camera).convert("LA"), camera),
    }
    for name, (image, _) in files.items():
        image.save(folder / name)
    run_precompute(["--train_data_dir", folder, "--vae", "none", "--resolution", 32, "--output_dir", tmp_path / "c"])
    rows, info = read_cache(tmp_path / "c")
    assert info["num_skipped"] == 0 and sorted(rows["source"]) == sorted(files)
    for name, (_, original) in files.items():
        expected = preprocess_image(Image.fromarray(original), 32).astype(np.float64) / 127.5 - 1  # (32, 32, 3)
        got = rows["mean"][list(rows["source"]).index(name), 0].transpose(1, 2, 0)  # (32, 32, 3)
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99, name
        assert np.abs(got - expected).mean() < 0.03, name  # right brightness too, not only the right shape


# Every user mistake: exit code 2, one line `error: ...`, no traceback, nothing written.


def run_cli(argv, capsys) -> tuple[int, str]:
    """The script's `__main__` path in-process: its exit code and stderr."""
    code = run_script(lambda: run_precompute(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_output_dir", r"the following arguments are required: --output_dir \(see --help\)"),
        ("bad_int", r"argument --resolution: invalid int value: 'abc'"),
        ("bad_choice", r"argument --mixed_precision: invalid choice: 'fp8'"),
        ("negative_workers", r"--dataloader_num_workers must be in 0\.\.\d+ \(4 per CPU here.*got -1"),
        ("missing_folder", r"--train_data_dir .*nowhere is not a directory"),
        ("missing_dataset", r"Could not load split 'train' of --dataset_name .*nowhere"),
        ("missing_vae", r"Could not load the VAE .*no_vae.*--vae none for pixels"),
        ("output_is_a_file", r"--output_dir .*file\.txt: .*file\.txt is a file, not a folder"),
        ("output_under_a_file", r"--output_dir .*file\.txt/cache: .*file\.txt is a file, not a folder"),
        ("no_images", r"--train_data_dir .*empty holds no images"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, photo_dir, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("mine")
    photos = ["--train_data_dir", photo_dir, "--vae", "none", "--resolution", 8]
    out = ["--output_dir", tmp_path / "cache"]
    argv = {
        "no_output_dir": photos,
        "bad_int": [*photos, "--resolution", "abc", *out],
        "bad_choice": [*photos, "--mixed_precision", "fp8", *out],
        "negative_workers": [*photos, "--dataloader_num_workers", -1, *out],
        "missing_folder": ["--train_data_dir", tmp_path / "nowhere", *out],
        "missing_dataset": ["--dataset_name", tmp_path / "nowhere", "--cache_dir", tmp_path / "hf", *out],
        "missing_vae": ["--train_data_dir", photo_dir, "--vae", tmp_path / "no_vae", *out],
        "output_is_a_file": [*photos, "--output_dir", tmp_path / "file.txt"],
        "output_under_a_file": [*photos, "--output_dir", tmp_path / "file.txt/cache"],
        "no_images": ["--train_data_dir", tmp_path / "empty", "--vae", "none", *out],
    }[case]
    code, err = run_cli(argv, capsys)
    *logged, last = err.splitlines()
    assert code == 2 and last.startswith("error: ") and re.search(message, last), err
    assert all(re.match(r"\d{4}-\d\d-\d\d .* - (INFO|WARNING) - ", line) for line in logged), err  # no traceback
    assert not (tmp_path / "cache").exists() and (tmp_path / "file.txt").read_text() == "mine"


def test_the_script_exits_2_without_a_traceback(tmp_path, photo_dir):
    """The real command line: `python precompute_latents.py` with a bad path."""
    script = str(REPO_ROOT / "precompute_latents.py")
    result = subprocess.run(
        [sys.executable, script, "--train_data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"error: --train_data_dir {tmp_path / 'nowhere'} is not a directory."
    assert not (tmp_path / "c").exists()
