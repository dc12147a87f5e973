"""`caffe-prune bench`: every mode runs the run's own step (pruning.Run.advance), so the fast engine's
decisions equal the naive reference's; a step the constraints forbid ends the bench, not a traceback."""
from caffe_prune import bench, pruning
from caffe_prune.steps import pruned_of
from conftest import PUBLISHED

LENET = PUBLISHED / "LeNet-5-CIFAR10" / "original.caffemodel"


def config(**fields):
    return pruning.Config(net="LeNet-5", weights=str(LENET), metric="taylor", eval_size=1, test_size=1,
                          batch_size=32, max_drop=None, **fields)


def test_modes_make_the_runs_own_decisions(caffe, tmp_path):
    done = bench.bench(config(per_step="4"), steps=2, modes=["naive", "fast-1"], progress=False)
    assert done["steps"] == 2 and done["modes"]["fast-1"]["same_as_naive"] == "identical"
    run = pruning.Run(config(per_step="4", max_steps=2), tmp_path / "run", progress=False)
    steps = run.run()
    assert len(pruned_of(steps[1:])) == 8          # 4 groups a step, as the bench's steps took


def test_a_step_the_constraints_forbid_ends_the_bench(caffe):
    done = bench.bench(config(keep=["*"]), steps=3, modes=["naive", "fast-1"], progress=False)
    assert done["steps"] == 0 and done["modes"]["naive"]["effective_gflops"] is None
