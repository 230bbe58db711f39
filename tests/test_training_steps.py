"""What one optimizer step is: precision (fp32/bf16/fp16), gradient accumulation, the step learning-rate schedule
and batches drawn from one group (``task.batch_groups()``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_toy import ToyConfig, ToyTask, run_toy, trained_adapter

from mmadapters.training.checkpoint import load_train_state
from mmadapters.training.sampler import StepSampler, check_batch_split
from mmadapters.training.trainer import TrainerConfig, lr_lambda, seed_everything, train

NO_DROPOUT = {"dropout": 0.0}  # dropout masks are drawn per forward call: off where call patterns differ


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


# -- precision ----------------------------------------------------------------------------------------------------

def test_bf16_on_cpu_trains_and_converges_like_fp32(tmp_path):
    over = {"steps": 40, "eval_every": 20, "checkpoint_every": 20, "recipe": NO_DROPOUT, "lr": 0.02}
    _, start = run_toy(tmp_path / "start", **{**over, "steps": 0})
    _, fp32 = run_toy(tmp_path / "fp32", **over)
    _, bf16 = run_toy(tmp_path / "bf16", precision="bf16", **over)
    assert bf16.best_score < 0.7 * start.best_score  # it learned
    assert bf16.best_score == pytest.approx(fp32.best_score, rel=0.15)  # about as well as fp32
    a, b = trained_adapter(fp32.last_dir), trained_adapter(bf16.last_dir)
    assert not _same(a, b) and all(v.dtype == torch.float32 for v in b.values())  # autocast ran; weights stay fp32


def test_fp16_on_cpu_works_with_a_gradient_scaler_that_resume_restores(tmp_path):
    """fp16 autocast runs on CPU (torch >= 2.3) with torch.amp.GradScaler("cpu"); its first steps overflow at the
    initial scale 65536 and are skipped, so a resume that did not restore the scale would not repeat the run."""
    # loss x 100: the scaled gradients overflow fp16 until the scale has halved from 65536 to 2048 (steps 1-5)
    over = {"precision": "fp16", "eval_every": 4, "checkpoint_every": 4, "schedule": "constant", "lr": 0.01,
            "recipe": {"dropout": 0.1, "loss_factor": 100.0}}
    _, full = run_toy(tmp_path / "full", steps=12, **over)
    train_entries = [e for e in _events(tmp_path / "full") if e["kind"] == "train"]
    assert all("loss_scale" in e and "skipped" in e for e in train_entries)
    assert [e["skipped"] for e in train_entries[:6]] == [1, 1, 1, 1, 1, 0]
    assert train_entries[0]["grad_norm"] is None and train_entries[5]["grad_norm"] > 0  # JSON null, never NaN
    assert [e["loss_scale"] for e in train_entries[:6]] == [32768.0, 16384.0, 8192.0, 4096.0, 2048.0, 2048.0]
    assert math.isfinite(full.best_score) and full.best_step > 0  # it trained after the skipped steps
    run_toy(tmp_path / "split", steps=4, **over)
    state = load_train_state(tmp_path / "split" / "train_state.pt")
    assert state["amp"]["scaler"]["scale"] == 4096.0  # weights_only-loadable plain numbers
    _, resumed = run_toy(tmp_path / "split", steps=12, resume=True, **over)
    assert _same(trained_adapter(full.last_dir), trained_adapter(resumed.last_dir))
    assert _events(tmp_path / "split") == _events(tmp_path / "full")


def test_precision_is_part_of_the_run(tmp_path):
    run_toy(tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"trainer.precision: 'fp32' there, 'bf16' here"):
        run_toy(tmp_path, steps=4, resume=True, precision="bf16")


# -- gradient accumulation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, accum):
    """batch_size 16 in `accum` micro-batches of 16/accum items == batch_size 16 in one: same items, same update."""
    one = {"batch_size": 16, "recipe": NO_DROPOUT, "steps": 1, "grad_clip": None}
    _, big = run_toy(tmp_path / "big1", **one)
    _, acc = run_toy(tmp_path / f"acc1-{accum}", grad_accum_steps=accum, **one)
    assert _same(trained_adapter(big.last_dir), trained_adapter(acc.last_dir), atol=1e-6)
    loss = [[e["loss"] for e in _events(r) if e["kind"] == "train"] for r in (tmp_path / "big1", tmp_path / f"acc1-{accum}")]
    assert loss[0] == pytest.approx(loss[1], abs=1e-6)  # the logged loss is the whole batch's mean
    many = {"batch_size": 16, "recipe": NO_DROPOUT, "steps": 12, "warmup_ratio": 0.25, "schedule": "cosine"}
    _, big = run_toy(tmp_path / "big", **many)
    _, acc = run_toy(tmp_path / f"acc-{accum}", grad_accum_steps=accum, **many)
    assert _same(trained_adapter(big.last_dir), trained_adapter(acc.last_dir), atol=1e-5)
    assert big.best_step == acc.best_step


def test_micro_batches_partition_each_step_for_any_world_size():
    s = StepSampler(train_size=30, batch_size=8, seed=3)
    for step in range(6):
        for world in (1, 2, 4):
            for accum in (1, 2, 4):
                if 8 % (world * accum):
                    continue
                parts = [s.micro_batches(step, r, world, accum) for r in range(world)]
                assert all(len(p) == accum for p in parts)
                # micro-batch m is a contiguous slice of the global batch, each rank's share of it contiguous
                flat = [i for m in range(accum) for r in range(world) for i in parts[r][m]]
                assert flat == s.global_batch(step)
    assert s.rank_batch(2, 1, 2) == s.micro_batches(2, 1, 2, 1)[0]
    with pytest.raises(ValueError, match=r"global batch size 8 does not divide by 3 micro-batches \(trainer.grad_accum_steps\) "
                                         r"x 2 rank\(s\) \(choose a multiple of 6"):
        check_batch_split(8, 2, 3)


def test_grad_accum_that_does_not_split_the_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="global batch size 8 does not divide by 3 micro-batches"):
        run_toy(tmp_path, batch_size=8, grad_accum_steps=3)


# -- step schedule ------------------------------------------------------------------------------------------------

def test_step_schedule_halves_every_n_steps_after_the_warmup(tmp_path):
    f = lr_lambda(TrainerConfig(steps=40, schedule="step", step_every=10))
    assert [f(0), f(9), f(10), f(19), f(20), f(39)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    f = lr_lambda(TrainerConfig(steps=40, schedule="step", step_every=10, step_gamma=0.1, warmup_ratio=0.1))
    assert [f(0), f(3), f(4), f(13), f(14)] == [0.25, 1.0, 1.0, 1.0, pytest.approx(0.1)]
    # the time budget does not move a step schedule (as the constant one)
    cfg = TrainerConfig(steps=40, schedule="step", step_every=10, max_minutes=1.0)
    assert lr_lambda(cfg, spent=lambda: 59.0)(5) == 1.0
    over = {"schedule": "step", "step_every": 3, "step_gamma": 0.5, "lr": 0.04, "eval_every": 4, "checkpoint_every": 2}
    run_toy(tmp_path / "full", steps=8, **over)
    lrs = [e["lr"] for e in _events(tmp_path / "full") if e["kind"] == "train"]
    assert lrs == pytest.approx([0.04] * 3 + [0.02] * 3 + [0.01] * 2)
    run_toy(tmp_path / "split", steps=5, **over)  # a finished 5-step run extended to 8: the lr depends on the step only
    run_toy(tmp_path / "split", steps=8, resume=True, **over)
    assert _same(trained_adapter(tmp_path / "full" / "last"), trained_adapter(tmp_path / "split" / "last"))


# -- one group per batch ------------------------------------------------------------------------------------------

def test_grouped_stream_draws_each_batch_from_one_group_and_passes_over_every_group():
    groups = ["a"] * 12 + ["b"] * 8 + ["c"] * 5  # ceil(n/B) with B=4: 3 + 2 + 2 = 7 steps per round
    s = StepSampler(len(groups), batch_size=4, seed=1, groups=groups)
    seen = {g: [] for g in "abc"}
    for step in range(7 * 5):
        batch = s.global_batch(step)
        kinds = {groups[i] for i in batch}
        assert len(batch) == 4 and len(kinds) == 1  # one group per batch, always full
        seen[kinds.pop()].extend(batch)
        assert [groups[i] for i in batch][0] == s.group_names[s.group_of(step)]
    # 5 rounds: group a (12 items, 3 batches a round) is passed over exactly 5 times, each pass a permutation
    assert all(sorted(seen["a"][k * 12:(k + 1) * 12]) == list(range(12)) for k in range(5))
    assert len(seen["b"]) == 40 and len(seen["c"]) == 40  # b and c: 2 batches per round each
    assert sorted(seen["c"][:5]) == list(range(20, 25))  # c's first pass, then it runs on into its next permutation
    first_round = [s.group_of(step) for step in range(7)]
    assert sorted(first_round) == [0, 0, 0, 1, 1, 2, 2]
    # a function of (seed, step) only: a fresh sampler (a resumed run) agrees; another seed differs
    again = StepSampler(len(groups), 4, 1, groups=groups)
    assert [again.global_batch(k) for k in (33, 2, 17)] == [s.global_batch(k) for k in (33, 2, 17)]
    other = StepSampler(len(groups), 4, 2, groups=groups)
    assert [other.global_batch(k) for k in range(7)] != [s.global_batch(k) for k in range(7)]
    for world in (1, 2, 4):  # world-size independent
        assert [i for r in range(world) for i in s.micro_batches(9, r, world)[0]] == s.global_batch(9)
    with pytest.raises(ValueError, match="gave 3 group ids for 25 training items"):
        StepSampler(25, 4, 0, groups=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"batch_groups\(\)\[1\] is \['x'\], not a hashable group id"):
        StepSampler(2, 4, 0, groups=["a", ["x"]])


class _GroupedToy(ToyTask):
    """The toy with two groups (even / odd items); records the items of each get_batch call."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.batches: list[list[int]] = []

    def batch_groups(self) -> list[str]:
        return ["even" if i % 2 == 0 else "odd" for i in range(self.train_size())]

    def get_batch(self, indices):
        self.batches.append(list(indices))
        return super().get_batch(indices)


def _grouped(tmp_path, steps: int, resume: bool = False, **trainer):
    config = TrainerConfig(**{"batch_size": 8, "lr": 0.01, "progress": False, "eval_every": 3, "checkpoint_every": 3,
                              "schedule": "constant",
                              "steps": steps, **trainer})
    seed_everything(config.seed, 0)
    task = _GroupedToy(ToyConfig(), config)
    return task, train(task, config, tmp_path, resume=resume)


def test_engine_draws_each_batch_from_one_group_and_resumes_on_the_same_order(tmp_path):
    task, full = _grouped(tmp_path / "full", steps=9, grad_accum_steps=2)
    assert len(task.batches) == 18  # 9 steps x 2 micro-batches
    for k in range(0, 18, 2):
        step_items = task.batches[k] + task.batches[k + 1]
        assert len({i % 2 for i in step_items}) == 1
    assert {task.batches[k][0] % 2 for k in range(0, 18, 2)} == {0, 1}  # both groups take turns
    _grouped(tmp_path / "split", steps=6, grad_accum_steps=2)
    _, resumed = _grouped(tmp_path / "split", steps=9, resume=True, grad_accum_steps=2)
    assert _same(trained_adapter(full.last_dir), trained_adapter(resumed.last_dir))
    # trainer.group_batches: false mixes the groups; a resume may not switch it
    task, _ = _grouped(tmp_path / "mixed", steps=3, group_batches=False)
    assert any(len({i % 2 for i in b}) == 2 for b in task.batches)
    with pytest.raises(ValueError, match=r"was trained on mixed batches, and this run would draw one batch_groups\(\) group "
                                         r"per batch: the data order must stay the same on --resume"):
        _grouped(tmp_path / "mixed", steps=6, resume=True, group_batches=True)
    # a state written before these fields existed (no data_order, no precision, ...) was trained on mixed batches:
    # the fields take their defaults, and the data order is checked on its own (a recipe that gained batch_groups)
    state = torch.load(tmp_path / "mixed" / "train_state.pt", weights_only=True)
    del state["data_order"]
    for key in ("trainer.precision", "trainer.grad_accum_steps", "trainer.step_every", "trainer.step_gamma"):
        del state["config"][key]
    from mmadapters.training.checkpoint import config_fingerprint, save_train_state

    state["config_fingerprint"] = config_fingerprint(state["config"])
    save_train_state(tmp_path / "mixed" / "train_state.pt", {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(ValueError, match=r"was trained on mixed batches, and this run would draw one batch_groups\(\) group "
                                         r"per batch: the data order must stay the same on --resume"):
        _grouped(tmp_path / "mixed", steps=6, resume=True)
    _, more = _grouped(tmp_path / "mixed", steps=4, resume=True, group_batches=False)  # the old run, as it was
    assert more.resumed_from == 3


def test_vl_adapter_draws_each_batch_from_one_task(tmp_path):
    from mmadapters.training.config_io import from_mapping
    from mmadapters.vision.synth_vl import generate_vl
    from mmadapters.vision.vl_adapter import open_feature_source
    from mmadapters.vision.vl_train import VLTrainConfig, VLTrainTask

    torch.set_num_threads(1)
    data = tmp_path / "data"
    generate_vl(data, n_images=20, seed=0)
    open_feature_source(None, images=data / "images", num_tokens=16, visual_dim=96, cache=data / "features.h5")
    config = from_mapping(VLTrainConfig, {"data": str(data), "features": str(data / "features.h5"), "max_val_samples": 2,
                                          "max_new_tokens": 4}, source="t")
    task = VLTrainTask(config, progress=False)
    groups = task.batch_groups()
    assert len(groups) == task.train_size() and set(groups) == set(config.tasks)
    sampler = StepSampler(task.train_size(), batch_size=4, seed=0, groups=groups)
    steps = sampler._round_len
    batches = [task.get_batch(sampler.global_batch(s)) for s in range(steps)]
    assert all(len(b.parts) == 1 for b in batches)  # one task per batch (before: tasks mixed in every batch)
    assert {b.parts[0].task for b in batches} == set(config.tasks)  # every task has its turn within a round
