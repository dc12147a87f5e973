"""`--val-split authors`: the validation images of the authors' release (kaveena/myopic-oracle,
myopic-oracle/caffe-training-data/eval-index.txt), their mapping to the official training images,
and the split on the subset, computed here independently from the raw batch files."""
import json
import tomllib

import numpy as np
import pytest

from caffe_prune import cli, pruning
from caffe_prune.commands import options
from caffe_prune.data import validation
from caffe_prune.data.dataset import open_dataset, records_sha256
from caffe_prune.errors import DataError, InputError
from conftest import PUBLISHED, REPO, SUBSET

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"
SUBSET_BATCH = 1017          # the subset: the first 1017 records of each official training batch
PRESENT_ON_SUBSET = 508      # of the authors' 5,000 images, the subset holds 508


def raw_train():
    """The subset's training records straight from the bytes: (images RGB (N,3,32,32), labels)."""
    records = np.concatenate([np.fromfile(SUBSET / "cifar-10-batches-bin" / f"data_batch_{b}.bin", dtype=np.uint8)
                              .reshape(-1, 3073) for b in range(1, 6)])
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def authors_on_subset():
    """(position in the subset, the authors' label) of each of their images the subset holds, in
    their file's order: train-N.png is official image perm[N] (get.py's train_test_split,
    random_state 42), official image i is record i % 10000 of data_batch_{i // 10000 + 1}."""
    perm = np.random.RandomState(42).permutation(50_000)
    out = []
    for line in validation.AUTHORS_VAL_FILE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        n, label = map(int, line.split())
        batch, record = divmod(int(perm[n]), 10_000)
        if record < SUBSET_BATCH:
            out.append((batch * SUBSET_BATCH + record, label))
    return out


def one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text and text
    return text


# ---- the list ------------------------------------------------------------------------------------

def test_the_list_is_the_authors_file():
    """5,000 distinct images of the 50,000 with labels 0..9 (the released eval-index.txt has 5,000
    lines, though the paper's text says 10,000), its source named in the header, and the file it
    was transcribed from rebuilt to its stored length, 288,879 characters."""
    n, labels = validation.authors_validation()
    assert len(n) == 5_000 and len(np.unique(n)) == 5_000
    assert 0 <= n.min() and n.max() < 50_000 and set(np.unique(labels)) == set(range(10))
    header = validation.AUTHORS_VAL_FILE.read_text()
    for source in ("kaveena/myopic-oracle", "myopic-oracle/caffe-training-data/eval-index.txt",
                   "40e3abc995056338fd3f0513a8e8bb374c161c4d"):
        assert source in header
    rebuilt = "".join(f"/home/user/caffe-cifar-10-training/data/train-{i}.png {l}\n" for i, l in zip(n, labels))
    assert len(rebuilt) == 288_879
    assert (n[0], labels[0], n[-1], labels[-1]) == (18184, 6, 19357, 5)     # its first and last lines
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert validation.AUTHORS_VAL_FILE.name in package_data["caffe_prune.data"]
    assert validation.AUTHORS_VAL_FILE.parent == REPO / "caffe_prune" / "data"


def test_mapping_verified_on_the_subset():
    """Every one of the authors' images the subset holds (508) carries, in the official batches, the
    label their list gives it; reading train-N.png as official image N instead agrees at chance."""
    _, labels = raw_train()
    found = authors_on_subset()
    assert len(found) == PRESENT_ON_SUBSET
    assert all(labels[position] == label for position, label in found)
    n, authors_labels = validation.authors_validation()
    batch, record = np.divmod(n, 10_000)
    here = record < SUBSET_BATCH
    unshuffled = np.mean(labels[batch[here] * SUBSET_BATCH + record[here]] == authors_labels[here])
    assert unshuffled < 0.2


# ---- the indices ---------------------------------------------------------------------------------

def test_indices_on_the_full_set_and_on_partial_copies():
    perm = np.random.RandomState(42).permutation(50_000)
    n, _ = validation.authors_validation()
    np.testing.assert_array_equal(validation.authors_validation_indices(50_000), np.sort(perm[n]))
    counts = [SUBSET_BATCH] * 5
    np.testing.assert_array_equal(validation.authors_validation_indices(5085, counts),
                                  sorted(p for p, _ in authors_on_subset()))
    # an uneven copy: the first 10,000 of batch 1 and nothing of the others
    only_first = validation.authors_validation_indices(10_000, [10_000, 0, 0, 0, 0])
    np.testing.assert_array_equal(only_first, np.sort(perm[n][perm[n] < 10_000]))


def test_open_dataset_authors_split_on_the_subset(caffe):
    """open_dataset(..., val_split="authors") gives exactly the subset's records the independent
    computation picks (positions, labels and the sha256 of the records); seeded stays the default."""
    from caffe_prune.session import Network
    network = Network.open("LeNet-5")
    dataset = open_dataset(network, str(SUBSET), progress=False, val_split="authors")
    images, labels = raw_train()
    positions = np.array(sorted(p for p, _ in authors_on_subset()))
    assert len(dataset.validation.y) == PRESENT_ON_SUBSET
    np.testing.assert_array_equal(dataset.validation.y, labels[positions])
    assert dataset.validation.sha256 == records_sha256(images[positions][:, ::-1], labels[positions])   # BGR
    assert dataset.identity["validation_split"] == "authors"
    assert dataset.identity["validation_images"] == PRESENT_ON_SUBSET
    seeded = open_dataset(network, str(SUBSET), progress=False)
    assert len(seeded.validation.y) == 1017 and "validation_split" not in seeded.identity
    np.testing.assert_array_equal(seeded.validation.y, labels[validation.validation_indices(5085, 0)])


# ---- one-line refusals ---------------------------------------------------------------------------

def test_authors_split_refused_for_other_datasets(caffe, tmp_path, write_net):
    from caffe_prune.session import Network
    images = tmp_path / "list.txt"
    images.write_text("a.png 0\n")
    with pytest.raises(DataError) as exc:
        open_dataset(Network.open("LeNet-5"), str(images), progress=False, val_split="authors")
    assert "is not CIFAR-10" in one_line(exc) and str(images) in str(exc.value)
    net = write_net('name: "t"\nlayer { name: "data" type: "Input" top: "data" '
                    'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n')
    with pytest.raises(DataError) as exc:
        open_dataset(Network.open(str(net)), progress=False, val_split="authors")
    assert "own data layers is not CIFAR-10" in one_line(exc)
    with pytest.raises(DataError) as exc:
        open_dataset(Network.open("LeNet-5"), str(SUBSET), progress=False, val_split="random")
    assert "--val-split must be one of seeded, authors" in one_line(exc)


def test_indices_refused_when_they_cannot_be_placed():
    perm = np.random.RandomState(42).permutation(50_000)
    n, _ = validation.authors_validation()
    first = int(np.sort(perm[n])[0])           # the first official index among the authors' images
    with pytest.raises(DataError) as exc:
        validation.authors_validation_indices(first, [first, 0, 0, 0, 0])
    assert "none of the authors' 5000 validation images" in one_line(exc)
    with pytest.raises(DataError) as exc:
        validation.authors_validation_indices(5085)
    assert "pass the records per batch" in one_line(exc)
    with pytest.raises(DataError) as exc:
        validation.authors_validation_indices(5085, [SUBSET_BATCH] * 4)
    assert "expected 5 counts" in one_line(exc)
    _, labels = raw_train()
    with pytest.raises(DataError) as exc:      # records in another order than the official one
        validation.authors_validation_indices(5085, [SUBSET_BATCH] * 5, labels[::-1])
    assert "another label than in their list" in one_line(exc)


def test_config_and_cli_refuse_other_splits(capsys):
    with pytest.raises(InputError) as exc:
        pruning.Config(net="LeNet-5", weights=str(LENET), metric="mean_activations", val_split="random").check()
    assert "--val-split must be one of seeded, authors" in one_line(exc)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prune", "LeNet-5", str(LENET), "--metric", "mean_activations",
                                       "--out", "x", "--val-split", "random"])
    err = capsys.readouterr().err
    assert "--val-split" in err and err.count("\n") == 1
    args = cli.build_parser().parse_args(["prune", "LeNet-5", str(LENET), "--metric", "mean_activations",
                                          "--out", "x", "--val-split", "authors"])
    assert options.prune_config(args, args.net, args.weights, args.metric).val_split == "authors"
    assert pruning.Config.neutral()["val_split"] == "seeded"


# ---- runs ----------------------------------------------------------------------------------------

def test_runs_record_the_split_and_resume_by_it(caffe, tmp_path, capsys):
    """`caffe-prune prune --val-split authors` judges on the 508 images and says so in config.json;
    a run stored before the field existed resumes as seeded; switching splits needs --force."""
    def argv(steps=1):
        return ["prune", "LeNet-5", str(LENET), "--metric", "mean_activations", "--test-size", "2",
                "--max-steps", str(steps), "--data", str(SUBSET), "--quiet"]
    authors, seeded = tmp_path / "authors", tmp_path / "seeded"
    assert cli.main(argv() + ["--val-split", "authors", "--out", str(authors)]) == 0
    header = json.loads((authors / "config.json").read_text())
    assert header["config"]["val_split"] == "authors"
    assert header["protocol"]["validation_images"] == PRESENT_ON_SUBSET
    assert header["identity"]["data"]["validation_split"] == "authors"
    assert cli.main(argv() + ["--out", str(seeded)]) == 0
    header = json.loads((seeded / "config.json").read_text())
    assert header["config"]["val_split"] == "seeded" and header["protocol"]["validation_images"] == 1017
    del header["config"]["val_split"]                     # as written before the field existed
    (seeded / "config.json").write_text(json.dumps(header))
    assert cli.main(argv(2) + ["--out", str(seeded)]) == 0
    assert len((seeded / "steps.jsonl").read_text().splitlines()) == 3      # resumed: one more step
    capsys.readouterr()
    assert cli.main(argv() + ["--val-split", "authors", "--out", str(seeded)]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "val_split" in err and err.count("\n") == 1
