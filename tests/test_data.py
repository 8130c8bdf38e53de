"""fbalign.data: IDX files read exactly, helpful errors, Debian's Fashion-MNIST when installed."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from fbalign.data import load_mnist_format, read_idx


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def fake_mnist(folder, n_train=6, n_test=4, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, (n,), dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", x, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y, compress)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, compress)
    path = tmp_path / "a.idx"
    if compress:
        path.rename(tmp_path / "a.idx.gz")
        path = tmp_path / "a.idx.gz"
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and (out == np.arange(24).reshape(2, 3, 4)).all()


def test_read_idx_rejects_bad_and_truncated_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout", ["flat", "flat-gz", "torchvision"])
def test_load_mnist_format_layouts(tmp_path, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = fake_mnist(folder, compress=layout == "flat-gz")
    data = load_mnist_format(tmp_path, "mnist")
    assert data.train_x.shape == (6, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_y.dtype == torch.int64
    torch.testing.assert_close(data.train_x[:, 0] * 255, torch.from_numpy(arrays["train"][0]).float())
    assert torch.equal(data.test_y, torch.from_numpy(arrays["t10k"][1]).long())


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_mnist_format(tmp_path, "fashion-mnist")
    with pytest.raises(FileNotFoundError, match="MNIST IDX files"):
        load_mnist_format(tmp_path, "mnist")
    with pytest.raises(ValueError, match="choose one of"):
        load_mnist_format(tmp_path, "cifar")


def test_debian_fashion_mnist(fashion_mnist_dir):
    data = load_mnist_format(fashion_mnist_dir)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert set(data.train_y.unique().tolist()) == set(range(10))
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0


# --- the other data sets and preparation --------------------------------------------------------------------

from fbalign import data as fbdata  # noqa: E402


def test_torchvision_root_with_both_data_sets_picks_the_right_one(tmp_path):
    mnist = fake_mnist(tmp_path / "MNIST" / "raw")
    fashion = fake_mnist(tmp_path / "FashionMNIST" / "raw", n_train=5)
    assert len(load_mnist_format(tmp_path, "mnist").train_y) == len(mnist["train"][1]) == 6
    assert len(load_mnist_format(tmp_path, "fashion-mnist").train_y) == len(fashion["train"][1]) == 5


def test_mnist_needs_a_directory():
    with pytest.raises(FileNotFoundError, match="no directory given; download the four MNIST"):
        fbdata.load("mnist")


def test_digits_is_a_seeded_disjoint_split():
    a, b = fbdata.load_digits(seed=1), fbdata.load_digits(seed=1)
    assert a.train_x.shape == (1797 - 360, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert torch.equal(a.test_x, b.test_x) and not torch.equal(a.test_x, fbdata.load_digits(seed=2).test_x)
    assert a.train_x.max() == 1.0 and a.num_classes == 10 and a.is_classification
    train_rows = {tuple(r) for r in a.train_x.flatten(1).tolist()}
    assert sum(tuple(r) in train_rows for r in a.test_x.flatten(1).tolist()) < 5  # digits has a few duplicates


def test_linear_teacher_is_lillicraps_task():
    d = fbdata.linear_teacher(n_train=200, n_test=50, seed=3)
    teacher = d.extras["T"]
    assert teacher.shape == (10, 30) and teacher.abs().max() <= 1.0 and teacher.min() < -0.5 < 0.5 < teacher.max()
    assert d.train_x.shape == (200, 30) and d.test_y.shape == (50, 10) and d.num_classes is None
    torch.testing.assert_close(d.train_y, d.train_x @ teacher.T, rtol=1e-5, atol=1e-5)
    assert abs(float(d.train_x.std()) - 1.0) < 0.1
    assert torch.equal(d.train_x, fbdata.linear_teacher(n_train=200, n_test=50, seed=3).train_x)
    assert not torch.equal(d.train_x, fbdata.linear_teacher(n_train=200, n_test=50, seed=4).train_x)


def test_nonlinear_teacher_computes_the_stated_formula():
    d = fbdata.nonlinear_teacher(n_train=100, n_test=20, seed=0)
    e = d.extras
    assert [e[f"W{i}"].shape for i in range(3)] == [(20, 30), (10, 20), (10, 10)]
    x = d.test_x
    y = torch.tanh(torch.tanh(x @ e["W0"].T + e["b0"]) @ e["W1"].T + e["b1"]) @ e["W2"].T + e["b2"]
    torch.testing.assert_close(d.test_y, y, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least 1"):
        fbdata.nonlinear_teacher(n_train=0)


def test_teachers_in_float64_keep_the_exact_relation():
    d = fbdata.linear_teacher(n_train=100, n_test=20, seed=3, dtype=torch.float64)
    assert d.train_x.dtype == d.train_y.dtype == d.extras["T"].dtype == torch.float64
    # the float32 task rounds x and y separately, so its relation holds to ~1e-7 only; float64 holds to rounding
    assert (d.train_y - d.train_x @ d.extras["T"].T).abs().max() < 1e-13
    single = fbdata.linear_teacher(n_train=100, n_test=20, seed=3)
    assert (single.train_y.double() - single.train_x.double() @ single.extras["T"].double().T).abs().max() > 1e-9
    torch.testing.assert_close(single.train_x, d.train_x.float())  # one task, two precisions
    n = fbdata.load("nonlinear-teacher", n_train=10, n_test=5, dtype="float64")  # as a TOML config gives it
    assert n.test_y.dtype == n.extras["W0"].dtype == torch.float64
    with pytest.raises(ValueError, match="dtype='int8' is not a floating-point type"):
        fbdata.linear_teacher(n_train=10, n_test=5, dtype="int8")


def test_load_checks_names_and_options():
    with pytest.raises(ValueError, match="unknown data set 'cifar'; choose one of fashion-mnist"):
        fbdata.load("cifar")
    with pytest.raises(ValueError, match="no option 'size'; its options are: n_train, n_test"):
        fbdata.load("linear-teacher", size=3)


def test_prepare_pads_resizes_splits_and_normalizes():
    d = fbdata.load_digits()
    padded = fbdata.prepare(d, size=12, resize="pad")
    assert padded.train_x.shape[-2:] == (12, 12)
    assert torch.equal(padded.train_x[..., 2:10, 2:10], d.train_x) and padded.train_x[..., :2, :].abs().sum() == 0
    assert fbdata.prepare(d, size=32).test_x.shape == (360, 1, 32, 32)
    with pytest.raises(ValueError, match="use resize='bilinear'"):
        fbdata.prepare(d, size=11, resize="pad")

    split = fbdata.prepare(d, validation=100, train_size=1000, normalize=True, seed=5)
    assert split.val_x.shape[0] == 100 and split.train_x.shape[0] == 1000 and list(split.splits()) == [
        "train", "val", "test"]
    assert abs(float(split.train_x.mean())) < 1e-5 and abs(float(split.train_x.std()) - 1) < 1e-3
    again = fbdata.prepare(d, validation=100, seed=5)
    raw_val = again.val_x
    assert torch.equal(fbdata.prepare(d, validation=100, seed=5).val_x, raw_val)
    train_rows = {tuple(r) for r in again.train_x.flatten(1).tolist()}
    held_out = [tuple(r) in train_rows for r in raw_val.flatten(1).tolist()]
    assert sum(held_out) < 3  # disjoint up to the data set's own duplicates
    with pytest.raises(ValueError, match="between 1 and"):
        fbdata.prepare(d, validation=len(d.train_x))
    with pytest.raises(ValueError, match="resizes images"):
        fbdata.prepare(fbdata.linear_teacher(n_train=10, n_test=5), size=32)


def test_dataset_moves_every_tensor():
    d = fbdata.prepare(fbdata.load_digits(), validation=10)
    moved = d.to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in (moved.train_x, moved.val_y, moved.test_x))
    assert d.train_x.device.type == "cpu"


def test_the_old_name_of_data_splits_still_works():
    from fbalign import data

    assert data.TensorDataset is data.DataSplits  # deprecated alias, kept for one release
    assert isinstance(data.load_digits(), data.TensorDataset)
# --- CIFAR-10 / CIFAR-100: the python-pickle release -------------------------------------------------------------

import pickle  # noqa: E402

from fbalign import data as data_module  # noqa: E402
from fbalign.config import Config  # noqa: E402


def fake_cifar(root, name="cifar10", per_file=20, seed=0):
    """A small release in the real format: pickled dicts with b'data' (N, 3072) uint8 and b'labels' (a list) or
    b'fine_labels'/b'coarse_labels' (CIFAR-100), in the release's folder and file names."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, key, classes = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], b"labels", 10
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train", "test"], b"fine_labels", 100
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for file in files:
        n = per_file * (5 if name == "cifar100" and file == "train" else 1)
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, n)]
        batch = {b"batch_label": file.encode(), b"data": images, key: labels,
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        if name == "cifar100":
            batch[b"coarse_labels"] = [v // 5 for v in labels]
        with open(folder / file, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[file] = (images, labels)
    return folder, written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_reads_the_release_exactly(tmp_path, name):
    folder, written = fake_cifar(tmp_path, name)
    data = data_module.load_cifar(tmp_path, name, val_size=0)
    train_files = [f for f in written if f not in ("test_batch", "test")]
    images = np.concatenate([written[f][0] for f in train_files])
    labels = np.concatenate([written[f][1] for f in train_files])
    assert data.train_x.shape == (len(images), 3, 32, 32) and data.train_x.dtype == torch.float32
    # Row-major 3072 = 3 channel planes of 32×32, red first, as the release documents.
    assert torch.equal(data.train_x * 255, torch.from_numpy(images.reshape(-1, 3, 32, 32).astype(np.float32)))
    assert torch.equal(data.train_y, torch.from_numpy(labels))
    test = "test_batch" if name == "cifar10" else "test"
    assert torch.equal(data.test_y, torch.tensor(written[test][1]))
    assert data.num_classes == (10 if name == "cifar10" else 100)
    # The release folder itself works as the directory too.
    assert torch.equal(data_module.load_cifar(folder, name, val_size=0).test_x, data.test_x)


def test_load_cifar_validation_split_and_registry(tmp_path):
    fake_cifar(tmp_path)
    data = data_module.load("cifar10", dir=tmp_path, val_size=30, seed=1)
    assert len(data.val_x) == 30 and len(data.train_x) == 70
    whole = data_module.load_cifar(tmp_path, val_size=0)
    together = torch.cat([data.train_x, data.val_x]).flatten(1)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, whole.train_x.flatten(1).tolist()))
    again = data_module.load("cifar10", dir=tmp_path, val_size=30, seed=1)
    assert torch.equal(again.val_y, data.val_y)


def test_load_cifar_from_environment_variable(tmp_path, monkeypatch):
    fake_cifar(tmp_path)
    monkeypatch.setenv(data_module.CIFAR_ENV, str(tmp_path))
    assert len(data_module.load_cifar(val_size=0).train_x) == 100


def test_cifar_missing_directory_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv(data_module.CIFAR_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        data_module.load_cifar(tmp_path / "nowhere")
    message = str(e.value)
    print(message)
    assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message and "FBALIGN_CIFAR_DIR" in message
    with pytest.raises(FileNotFoundError, match="no directory given"):
        data_module.load_cifar()
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        data_module.load_cifar(tmp_path, "cifar100")


def test_cifar_missing_file_is_named(tmp_path):
    folder, _ = fake_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing") as e:
        data_module.load_cifar(tmp_path)
    print(e.value)


def test_cifar_truncated_or_corrupt_file_is_named(tmp_path):
    folder, _ = fake_cifar(tmp_path)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="data_batch_2 is truncated or corrupt") as e:
        data_module.load_cifar(tmp_path)
    print(e.value)
    (folder / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_2"):
        data_module.load_cifar(tmp_path)
    fake_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:  # whole, but the wrong content
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(ValueError, match=r"test_batch: b'data' should be uint8 of shape \(N, 3072\)"):
        data_module.load_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="4 images but 2 labels"):
        data_module.load_cifar(tmp_path)


def test_cifar_pickle_may_not_run_code(tmp_path):
    folder, _ = fake_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": print, b"labels": []}, f)
    with pytest.raises(ValueError, match="test_batch is truncated or corrupt.*builtins.print"):
        data_module.load_cifar(tmp_path)


def test_augment_crops_and_flips_each_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    same = data_module.augment(x, crop_padding=0, flip=False)
    assert torch.equal(same, x)
    gen = torch.Generator().manual_seed(0)
    out = data_module.augment(x.repeat(64, 1, 1, 1), crop_padding=2, generator=gen)
    assert out.shape == (128, 3, 8, 8)
    padded = torch.nn.functional.pad(x.repeat(64, 1, 1, 1), (2, 2, 2, 2))
    flips = 0
    for i in range(len(out)):  # every output is one window of the padded image, possibly mirrored
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        mirrored = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 30 < flips < 98  # about half mirrored
    with pytest.raises(ValueError, match="images"):
        data_module.augment(torch.zeros(4, 10))


def test_augment_batch_hook_is_off_by_default_and_reproducible():
    x = torch.rand(5, 3, 32, 32)
    assert data_module.augment_batch(x, False, seed=0, step=3) is x
    a = data_module.augment_batch(x, True, seed=0, step=3)
    assert torch.equal(a, data_module.augment_batch(x, True, seed=0, step=3))
    assert not torch.equal(a, data_module.augment_batch(x, True, seed=0, step=4))


def test_cifar_config_trains_with_augmentation(tmp_path):
    from fbalign.train import train

    fake_cifar(tmp_path, per_file=16)
    config = Config.model_validate({"epochs": 1, "batch_size": 16, "rule": "fa", "threads": 1,
                                    "model": {"name": "mlp", "hidden": [8]},
                                    "data": {"name": "cifar10", "dir": str(tmp_path), "val_size": 16,
                                             "normalize": True, "augment": True},
                                    "log": {"progress": False}}).check()
    result = train(config)
    assert result.final["epoch"] == 1 and math.isfinite(result.final["test_loss"])
    assert "val_loss" in result.final


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_cifar10_resnet20_benchmark_configs(name, tmp_path):
    """configs/cifar10_resnet20_*.toml: BioTorch's protocol, and the model is He et al.'s CIFAR ResNet-20
    (3 stages of 3 basic blocks, 16/32/64 channels, ~0.27M parameters)."""
    from pathlib import Path

    from fbalign import models
    from fbalign.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / f"cifar10_resnet20_{name}.toml")
    assert (config.epochs, config.batch_size, config.data.name, config.data.augment) == (250, 128, "cifar10", True)
    assert config.optimizer.name == name and config.optimizer.options["weight_decay"] == 1e-4
    assert config.optimizer.lr == (0.1 if name == "sgd" else 1e-3)
    assert config.schedule.options == {"milestones": [100, 150, 200], "gamma": 0.1}
    model = models.build("resnet", input_shape=(3, 32, 32), num_outputs=10, **config.model.options)
    blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 9 and [b.conv2.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
