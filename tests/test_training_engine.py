"""The training engine on a toy task: determinism, outputs, schedule, data stream, and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_toy import ADAPTER, MLP, ToyConfig, build_toy_task, run_toy, trained_adapter

import mmadapters as mma
from mmadapters.training.sampler import StepSampler, check_batch_split
from mmadapters.training.trainer import TrainerConfig, lr_lambda, seed_everything, train


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    _, a = run_toy(tmp_path / "a", seed=3, warmup_ratio=0.25, schedule="cosine")
    _, b = run_toy(tmp_path / "b", seed=3, warmup_ratio=0.25, schedule="cosine")
    _, c = run_toy(tmp_path / "c", seed=4, warmup_ratio=0.25, schedule="cosine")
    wa, wb, wc = (trained_adapter(s.last_dir) for s in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert a.history == b.history and a.best_metrics == b.best_metrics


def test_outputs_best_is_loadable_and_scores_as_recorded(tmp_path):
    task, s = run_toy(tmp_path, steps=12, eval_every=4)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"best", "last", "history.jsonl", "train_state.pt", "train_summary.json"}
    events = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"] == list(range(1, 13))  # log_every=1
    assert [e["step"] for e in events if e["kind"] == "eval"] == [4, 8, 12]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["best_step"] == s.best_step and summary["parameters"] == task.parameter_counts()
    assert summary["config"]["trainer"]["steps"] == 12 and summary["library"]["name"] == "mmadapters"
    assert {"train_s", "validate_s", "total_s"} <= set(summary["timings"])
    scores = {e["step"]: e["metrics"]["mse"] for e in events if e["kind"] == "eval"}
    assert s.best_step == min(scores, key=scores.get) and s.best_score == min(scores.values())
    best_info = json.loads((tmp_path / "best" / "train_best.json").read_text())
    assert best_info["step"] == s.best_step and best_info["select_metric"] == "mse"
    # best/ loads onto a fresh base with the core's loader and scores what was recorded
    fresh = build_toy_task(ToyConfig(), TrainerConfig())
    mma.delete_adapter(fresh.model, ADAPTER)
    mma.load_adapter(fresh.model, tmp_path / "best")
    assert fresh.validate()["mse"] == pytest.approx(s.best_score, abs=1e-7)
    assert task.model.training is True or task.model.training is False  # the engine leaves a usable model


def test_steps_zero_validates_and_saves_initial_adapters(tmp_path):
    _, s = run_toy(tmp_path, steps=0)
    assert s.best_step == 0 and (tmp_path / "last" / "adapter_config.json").is_file()


def test_lr_schedules():
    cfg = TrainerConfig(steps=10, warmup_ratio=0.2, schedule="linear")
    f = lr_lambda(cfg)
    assert [f(0), f(1)] == [0.5, 1.0] and f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == 0.0
    f = lr_lambda(TrainerConfig(steps=10, schedule="cosine"))
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    f = lr_lambda(TrainerConfig(steps=10, schedule="constant", warmup_ratio=0.5))
    assert f(0) == pytest.approx(0.2) and f(4) == 1.0 and f(9) == 1.0


def test_data_stream_independent_of_world_size():
    s = StepSampler(train_size=10, batch_size=4, seed=7)
    stream = [i for step in range(5) for i in s.global_batch(step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # epochs are permutations
    for world in (1, 2, 4):
        for step in range(5):
            shares = [s.rank_batch(step, r, world) for r in range(world)]
            assert [i for share in shares for i in share] == s.global_batch(step)  # contiguous shares, in rank order
    assert StepSampler(10, 4, 7).global_batch(3) == s.global_batch(3)  # a fresh sampler (a resumed run) agrees
    assert StepSampler(10, 4, 8).global_batch(0) != s.global_batch(0)
    with pytest.raises(ValueError, match="global batch size 6 does not divide by the 4 ranks"):
        check_batch_split(6, 4)
    with pytest.raises(ValueError, match="training set is empty"):
        StepSampler(0, 4, 0)


def test_error_empty_training_set(tmp_path):
    with pytest.raises(ValueError, match="the training set is empty"):
        run_toy(tmp_path, recipe={"n_train": 0})


def test_error_validate_without_select_metric(tmp_path):
    with pytest.raises(ValueError, match=r"task.validate\(\) returned no 'acc' .* it returned \['mae', 'mse'\]"):
        run_toy(tmp_path, select_metric="acc")


def test_error_nan_loss_stops_and_keeps_best(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 6: the training loss is nan; stopped before applying it \(best/ keeps step 4\)"):
        run_toy(tmp_path, recipe={"nan_at_call": 6})
    info = json.loads((tmp_path / "best" / "train_best.json").read_text())
    assert info["step"] == 4 and math.isfinite(info["metrics"]["mse"])
    assert all(torch.isfinite(t).all() for t in trained_adapter(tmp_path / "best").values())


def test_error_no_trainable_parameters(tmp_path):
    task = build_toy_task(ToyConfig(), TrainerConfig())
    for p in task.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(task, TrainerConfig(steps=1), tmp_path)


def test_error_bad_device_and_task_loss(tmp_path):
    task = build_toy_task(ToyConfig(), TrainerConfig())
    with pytest.raises(ValueError, match="trainer.device gpu0: not a device name"):
        train(task, TrainerConfig(steps=1, device="gpu0"), tmp_path / "a")
    task.loss = lambda model, batch: model(batch[0])  # (B,) instead of a scalar
    with pytest.raises(TypeError, match=r"task.loss\(\) must return a scalar tensor .* got \(8,\)"):
        train(task, TrainerConfig(steps=1, batch_size=8), tmp_path / "b")


def test_only_trainable_parameters_change(tmp_path):
    seed_everything(0, 0)
    task = build_toy_task(ToyConfig(), TrainerConfig())
    frozen = {n: p.detach().clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    train(task, TrainerConfig(steps=5, batch_size=8, progress=False, lr=0.05), tmp_path)
    now = dict(task.model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert all(now[n].grad is None for n in frozen)
    assert isinstance(task.model, MLP)


def test_lr_decay_follows_a_time_budget_when_it_runs_out_first():
    cfg = TrainerConfig(steps=100, schedule="linear", max_minutes=1.0)
    assert lr_lambda(cfg, spent=lambda: 30.0)(10) == pytest.approx(0.5)  # half the minute gone at step 10 of 100
    assert lr_lambda(cfg, spent=lambda: 3.0)(50) == pytest.approx(0.5)  # the steps are further along
    assert lr_lambda(cfg, spent=lambda: 600.0)(1) == 0.0
    with pytest.raises(ValueError, match="trainer.max_minutes: expected a positive number of minutes or null"):
        TrainerConfig(max_minutes=0)


def test_time_budget_stops_at_a_validated_checkpointed_step_and_resume_continues(tmp_path):
    from mmadapters.training.checkpoint import load_train_state

    _, s = run_toy(tmp_path, recipe={"step_sleep": 0.05}, steps=200, eval_every=0, checkpoint_every=0, max_minutes=0.3 / 60)
    assert s.stopped_by == "time" and 1 <= s.steps < 200
    events = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "eval"] == [s.steps]  # the last step is validated
    assert load_train_state(tmp_path / "train_state.pt")["step"] == s.steps and (tmp_path / "last").is_dir()
    _, more = run_toy(tmp_path, recipe={"step_sleep": 0.0}, resume=True, steps=s.steps + 3, eval_every=0, checkpoint_every=0,
                      max_minutes=10.0)
    assert more.stopped_by == "steps" and more.steps == s.steps + 3 and more.resumed_from == s.steps


def test_on_validated_hook_sees_each_validation_after_it_is_in_the_history(tmp_path):
    seen = []

    def hook(step, metrics, output_dir):
        lines = (output_dir / "history.jsonl").read_text().splitlines()
        seen.append((step, sorted(metrics), json.loads(lines[-1])["step"]))

    task = build_toy_task(ToyConfig(), TrainerConfig())
    task.on_validated = hook
    train(task, TrainerConfig(steps=8, batch_size=8, eval_every=4, progress=False), tmp_path)
    assert seen == [(4, ["mae", "mse"], 4), (8, ["mae", "mse"], 8)]


class _FullTask:
    """A whole small model with batch norm trains (no adapters): its running statistics change with training."""

    select_metric, select_mode = "mse", "min"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True).sin()

    def train_size(self):
        return 32

    def get_batch(self, indices):
        return self.x[indices], self.y[indices]

    def loss(self, model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    def validate(self):
        return {"mse": torch.nn.functional.mse_loss(self.model(self.x), self.y).item()}

    def save(self, directory):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(directory / "model.safetensors"))

    def parameter_counts(self):
        n = sum(p.numel() for p in self.model.parameters())
        return {"trainable": n, "total": n}


def test_resume_restores_the_buffers_of_trained_modules(tmp_path):
    config = {"batch_size": 8, "eval_every": 0, "checkpoint_every": 0, "progress": False, "lr": 0.05, "schedule": "constant"}
    whole = _FullTask()
    train(whole, TrainerConfig(steps=6, **config), tmp_path / "whole")
    train(_FullTask(), TrainerConfig(steps=3, **config), tmp_path / "split")  # "crashes" after its step-3 checkpoint
    resumed = _FullTask()  # fresh batch-norm statistics, as in a new process
    train(resumed, TrainerConfig(steps=6, **config), tmp_path / "split", resume=True)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert int(b["1.num_batches_tracked"]) == 6
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_training_losses_reach_the_history_while_a_quiet_run_goes_on(tmp_path):
    """Without validations or checkpoints, the loss entries are appended every HISTORY_FLUSH_ENTRIES log lines,
    so a long run started with --quiet can be followed in history.jsonl."""
    from mmadapters.training.trainer import HISTORY_FLUSH_ENTRIES

    task = build_toy_task(ToyConfig(), TrainerConfig())
    seen = []
    real = task.get_batch

    def watching(indices):
        path = tmp_path / "history.jsonl"
        seen.append(len(path.read_text().splitlines()) if path.is_file() else 0)
        return real(indices)

    task.get_batch = watching
    steps = 2 * HISTORY_FLUSH_ENTRIES + 5
    train(task, TrainerConfig(steps=steps, batch_size=8, eval_every=0, checkpoint_every=0, log_every=1, progress=False), tmp_path)
    # before step k+1 runs, the first k entries are on disk once a full buffer of them was flushed
    assert seen[HISTORY_FLUSH_ENTRIES] == HISTORY_FLUSH_ENTRIES and seen[2 * HISTORY_FLUSH_ENTRIES] == 2 * HISTORY_FLUSH_ENTRIES
    assert seen[HISTORY_FLUSH_ENTRIES - 1] == 0
    lines = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e["kind"] == "train"] == list(range(1, steps + 1))
