"""A run directory (caffe_prune.rundir) and its step records (caffe_prune.steps): the header that
reads as absent when torn, steps checked line by line, records written before several groups per
step existed read as today's schema, temporaries cleared."""
import json

import pytest

from caffe_prune import steps as step_records
from caffe_prune.errors import InputError
from caffe_prune.rundir import RunDir

TEST = {"top1": 0.7, "top5": 0.9, "loss": 1.0}


def write(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return RunDir(path)


def test_records_of_one_group_per_step_read_as_the_schema(tmp_path):
    legacy = [{"step": 0, "group": None, "test": TEST},
              {"step": 1, "group": 7, "proposers": [["taylor", 0], ["fisher", 2]], "sensitivities": {"7": 0.1}},
              {"step": 2, "group": 3, "proposers": [["fisher", 0]], "test": TEST}]
    steps = write(tmp_path / "old", legacy).steps(10)
    assert [s["groups"] for s in steps] == [[], [7], [3]] and "group" not in steps[1]
    assert steps[1]["proposers"] == [[["taylor", 0], ["fisher", 2]]] and step_records.first_proposer(steps[2]) == "fisher"
    assert list(steps[1]) == ["step", "groups", "proposers", "sensitivities"]      # the keys keep their order
    assert step_records.pruned_of(steps) == [7, 3]
    new = [step_records.record(0, [], [], test=TEST),
           step_records.record(1, [4, 9], [[["taylor", 0]], [["taylor", 1]]], test=TEST)]
    assert write(tmp_path / "new", new).steps(10)[1]["groups"] == [4, 9]
    assert step_records.archive_cell(new[1]) == "4;9" and step_records.archive_cell(legacy[1]) == "7"
    assert step_records.from_archive_cell("4;9") == [4, 9] and step_records.from_archive_cell("") == []


@pytest.mark.parametrize("records, line", [
    ([{"step": 0, "groups": [], "test": TEST}, {"step": 2, "groups": [1]}], 2),       # a step missing
    ([{"step": 0, "groups": []}], 1),                                                  # step 0 unmeasured
    ([{"step": 0, "groups": [], "test": TEST}, {"step": 1, "groups": [1]}, {"step": 2, "group": 1}], 3),  # twice
    ([{"step": 0, "groups": [], "test": TEST}, {"step": 1, "groups": [10]}], 2),      # no such group
    ([{"step": 0, "groups": [], "test": TEST}, {"step": 1, "groups": []}], 2),        # a step of nothing
    ([{"step": 0, "groups": [], "test": TEST}, {"step": 1, "groups": [2, 2]}], 2),    # one group twice
    ([{"step": 0, "groups": [], "test": TEST}, "not a record"], 2),
])
def test_a_damaged_steps_file_names_its_line(tmp_path, records, line):
    run = write(tmp_path, [r if isinstance(r, dict) else {} for r in records])
    if not isinstance(records[-1], dict):
        with open(tmp_path / "steps.jsonl", "a") as stream:
            stream.write("{not json\n")
        line = len(records)
    with pytest.raises(InputError, match=rf"steps.jsonl:{line} is not step {line - 1} of this run; the run directory "
                                         r"is damaged: use --force"):
        run.steps(10)


def test_a_torn_header_reads_as_absent_and_temporaries_go(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "config.json").write_text('{"config": {"net": "LeN')       # a kill during its first write
    assert run.header() is None
    run.write_header({"config": {"net": "LeNet-5"}})
    assert run.header() == {"config": {"net": "LeNet-5"}}
    (tmp_path / ".steps.jsonl.123.tmp").write_text("x")
    run.remove_temporaries()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    with pytest.raises(InputError, match=r"is not a pruning run directory \(no readable config.json and steps.jsonl"):
        run.read()
