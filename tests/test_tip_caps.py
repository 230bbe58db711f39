"""Tip-Adapter, Tip-Adapter-F and CapS-Adapter on synthetic CLIP-like features (no model, no downloads).

The synthetic problem: C class prototypes in D = 64; image features sit near their prototype plus noise,
text features (zero-shot classifier columns, captions) sit on the other side of a "modality gap" (a shared
offset per modality, as in real CLIP). The zero-shot classifier is deliberately noisy, so the cache helps.
"""

from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mmadapters.vision.caps_adapter import (
    CapsAdapter,
    Captioner,
    caption_images,
    caption_key,
    class_log_probs,
    kl_divergence,
    read_captions,
    support_prompts,
)
from mmadapters.vision.fewshot import SupportSet, caps_prompt, fit_fewshot, sample_shots, support_set
from mmadapters.vision.tip_adapter import TipAdapter, TipAdapterF, correct_interval, grid_accuracy, margins

C, D = 10, 64


def make_problem(seed: int = 0, shots: int = 4, n_val: int = 20, n_test: int = 20, noise: float = 2.0, zs_noise: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    img_gap = 2.0 * F.normalize(torch.randn(D, generator=g), dim=0)
    txt_gap = 2.0 * F.normalize(torch.randn(D, generator=g), dim=0)
    weights = F.normalize(txt_gap + protos + zs_noise * torch.randn(C, D, generator=g) / D**0.5, dim=-1).T.contiguous()

    def draw(n, gap):
        y = torch.arange(C).repeat_interleave(n)
        return F.normalize(gap + protos[y] + noise * torch.randn(len(y), D, generator=g) / D**0.5, dim=-1), y

    xs, ys = draw(shots, img_gap)
    caps, _ = draw(shots, txt_gap)
    xv, yv = draw(n_val, img_gap)
    xt, yt = draw(n_test, img_gap)
    return weights, SupportSet(xs, ys, caps), (xv, yv), (xt, yt)


def acc(logits, labels):
    return (logits.argmax(-1) == labels).float().mean().item()


@pytest.fixture(scope="module")
def problem():
    return make_problem()


# ---------------------------------------------------------------------------------------------------
# Tip-Adapter


def test_tip_with_alpha_zero_is_zero_shot_clip(problem):
    w, support, _, (xt, _) = problem
    model = TipAdapter(w, support, alpha=0.0, beta=3.0)
    torch.testing.assert_close(model.logits(xt), 100 * xt @ w)


def test_tip_logits_equal_the_reference_formula(problem):
    w, support, _, (xt, _) = problem
    model = TipAdapter(w, support, alpha=2.5, beta=4.0)
    ref = torch.zeros(len(xt), C)
    for i, f in enumerate(xt):  # logits = 100 f W + α Σ_j exp(−β (1 − f·F_j)) onehot(y_j)
        ref[i] = 100 * f @ w
        for fj, yj in zip(support.image_feats, support.labels, strict=True):
            ref[i, yj] += 2.5 * math.exp(-4.0 * (1 - (f @ fj).item()))
    torch.testing.assert_close(model.logits(xt), ref, rtol=1e-5, atol=1e-4)


def test_logits_of_an_image_do_not_depend_on_its_batch(problem):
    w, support, (xv, yv), (xt, _) = problem
    for kind in ("tip", "caps"):
        model = fit_fewshot(kind, w, support, xv, yv, progress=False)
        torch.testing.assert_close(model.logits(xt)[3:4], model.logits(xt[3:4]), rtol=1e-5, atol=1e-3)


def test_vectorized_grid_equals_a_loop_over_the_grid(problem):
    w, support, (xv, yv), _ = problem
    model = TipAdapter(w, support)
    alphas, betas = torch.tensor([0.0, 0.5, 3.0, 20.0]), torch.tensor([0.5, 2.0, 7.0])
    got = grid_accuracy(model.clip_logits(xv)[None], model.affinity(xv), model.cache_values, betas, alphas, yv)[0]
    for i, b in enumerate(betas.tolist()):
        for j, a in enumerate(alphas.tolist()):
            model.alpha, model.beta = a, b
            assert got[i, j].item() == pytest.approx(acc(model.logits(xv), yv))
    # unbalanced support (3 shots of class 0 dropped) takes the matmul path: same answers
    keep = torch.arange(len(support))[3:]
    uneven = TipAdapter(w, SupportSet(support.image_feats[keep], support.labels[keep]))
    got = grid_accuracy(uneven.clip_logits(xv)[None], uneven.affinity(xv), uneven.cache_values, betas, alphas, yv)[0]
    uneven.alpha, uneven.beta = 3.0, 2.0
    assert got[1, 2].item() == pytest.approx(acc(uneven.logits(xv), yv))


def test_correct_interval_edge_cases():
    # true class 0 in every row; columns: class 0, 1, 2
    base = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    cache = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    lo, hi = correct_interval(margins(base, torch.zeros(4, dtype=torch.long)), cache, torch.zeros(4, dtype=torch.long))
    assert lo[0] < 0 and hi[0] == torch.inf  # ahead on base, equal cache with class 1: right for every α >= 0
    assert lo[1] == torch.inf  # behind on base, equal cache: never right
    assert hi[2].item() == pytest.approx(1.0)  # ahead by 1 on base, behind by 1 on cache: right for α < 1
    assert not lo[3].item() < 0.0 < hi[3].item() and lo[3].item() == pytest.approx(0.0)  # tie at α = 0 is an error


def test_search_sees_only_validation_and_beats_zero_shot(problem):
    w, support, (xv, yv), (xt, yt) = problem
    params = inspect.signature(fit_fewshot).parameters
    assert list(params)[:5] == ["kind", "clip_weights", "support", "val_feats", "val_labels"]
    assert not any("test" in p for p in params)
    model = fit_fewshot("tip", w, support, xv, yv, progress=False)
    hp = model.hyperparams
    assert hp["val_acc1"] == pytest.approx(acc(model.logits(xv), yv))  # what it reports is what it does on val
    assert hp["zeroshot_val_acc1"] == pytest.approx(acc(100 * xv @ w, yv))
    assert hp["val_acc1"] > hp["zeroshot_val_acc1"] + 0.1
    assert acc(model.logits(xt), yt) > acc(xt @ w, yt) + 0.1  # and it carries over to unseen test data
    # the chosen point is the best of the grid on val: no (α, β) on the grid does better there
    probe = TipAdapter(w, support)
    for a, b in [(0.0, 1.0), (1.0, 1.0), (10.0, 5.0), (100.0, 0.1)]:
        probe.alpha, probe.beta = a, b
        assert acc(probe.logits(xv), yv) <= hp["val_acc1"] + 1e-9
    again = fit_fewshot("tip", w, support, xv, yv, progress=False).hyperparams  # deterministic
    assert (again["alpha"], again["beta"], again["val_acc1"]) == (hp["alpha"], hp["beta"], hp["val_acc1"])


def test_tip_f_trains_only_the_keys_and_is_not_worse_than_tip_on_val(problem):
    w, support, (xv, yv), _ = problem
    model = fit_fewshot("tip-f", w, support, xv, yv, seed=0, progress=False)
    assert isinstance(model, TipAdapterF)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["keys.weight"]
    torch.testing.assert_close(model.clip_weights, w)
    torch.testing.assert_close(model.cache_values, F.one_hot(support.labels, C).float())
    torch.testing.assert_close(model.cache_keys, support.image_feats)  # the support features stay as they were
    hp = model.hyperparams
    tip = fit_fewshot("tip", w, support, xv, yv, progress=False).hyperparams
    assert hp["tip_val_acc1"] == tip["val_acc1"]
    assert hp["val_acc1"] >= tip["val_acc1"]
    assert len(hp["epoch_val_acc1"]) == 21 and max(hp["epoch_val_acc1"]) == hp["epoch_val_acc1"][hp["best_epoch"]]
    if hp["best_epoch"] > 0:
        assert not torch.equal(model.keys.weight, support.image_feats)
    again = fit_fewshot("tip-f", w, support, xv, yv, seed=0, progress=False)
    torch.testing.assert_close(again.keys.weight, model.keys.weight)  # seeded


# ---------------------------------------------------------------------------------------------------
# CapS-Adapter


def test_caps_with_delta_zero_and_gamma_zero_is_tip(problem):
    w, support, _, (xt, _) = problem
    caps = CapsAdapter(w, support, alpha=3.0, beta=2.0, gamma=0.0, delta=0.0)
    tip = TipAdapter(w, support, alpha=3.0, beta=2.0)
    torch.testing.assert_close(caps.logits(xt), tip.logits(xt))
    caps.delta = 0.5  # caption features now change the affinities, so the logits differ
    assert not torch.allclose(caps.logits(xt), tip.logits(xt))


def test_caps_logits_equal_the_reference_formula(problem):
    w, support, _, (xt, _) = problem
    caps = CapsAdapter(w, support, alpha=1.5, beta=3.0, gamma=2.0, delta=0.3)
    caps.calibrate(xt[:50], 0.3)
    aff = 0.7 * xt @ support.image_feats.T + 0.3 * xt @ support.caption_feats.T
    p = torch.softmax(xt @ w / 0.5, -1)
    q = torch.softmax(support.image_feats @ w / 0.5, -1)
    kl = (p[:, None, :] * (p[:, None, :].log() - q[None].log())).sum(-1)  # (B, N), pair by pair
    (k_lo, k_hi), (a_lo, a_hi) = caps.kl_range.tolist(), caps.aff_range.tolist()
    scaled = (kl - k_lo) / (k_hi - k_lo) * (a_hi - a_lo) + a_lo
    onehot = F.one_hot(support.labels, C).float()
    ref = 100 * xt @ w - 2.0 * scaled @ onehot + 1.5 * torch.exp(-3.0 * (1 - aff)) @ onehot
    torch.testing.assert_close(caps.logits(xt), ref, rtol=1e-4, atol=1e-3)


def test_caps_search_on_val_beats_zero_shot_and_is_not_below_tip(problem):
    w, support, (xv, yv), (xt, yt) = problem
    caps = fit_fewshot("caps", w, support, xv, yv, progress=False)
    tip = fit_fewshot("tip", w, support, xv, yv, progress=False)
    hp = caps.hyperparams
    assert set(hp) >= {"alpha", "beta", "gamma", "delta", "val_acc1", "zeroshot_val_acc1"}
    assert any(abs(hp["delta"] - 0.1 * i) < 1e-6 for i in range(11))
    assert hp["val_acc1"] == pytest.approx(acc(caps.logits(xv), yv))
    assert hp["val_acc1"] >= tip.hyperparams["val_acc1"] > hp["zeroshot_val_acc1"]
    assert acc(caps.logits(xt), yt) > acc(xt @ w, yt)
    # the frozen KL rescaling comes from validation, at the chosen δ
    kl = caps.kl_divergence(xv)
    torch.testing.assert_close(caps.kl_range, torch.stack([kl.min(), kl.max()]))


def _feature_softmax_kl(test, support, temperature=0.5):
    """What the official CapS code computes: softmax over the D feature dimensions (a bug)."""
    return kl_divergence(F.log_softmax(test / temperature, -1), F.log_softmax(support / temperature, -1))


def test_kl_is_between_class_distributions_hand_computed():
    w = torch.eye(2)  # D = C = 2, class c's embedding is e_c
    test, support = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    kl = kl_divergence(class_log_probs(test, w, 0.5), class_log_probs(support, w, 0.5))
    # p = softmax([2, 0]), q = softmax([0, 2]): log p/q = ±2, so KL = 2 (p0 − p1) = 2 tanh(1)
    assert kl.item() == pytest.approx(2 * math.tanh(1.0), rel=1e-6)
    assert kl_divergence(class_log_probs(test, w), class_log_probs(test, w)).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_fix_rotation_invariant_and_uses_the_classes(problem):
    w, support, (xv, _), _ = problem
    rot, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    ours = CapsAdapter(w, support).kl_divergence(xv)
    rotated = SupportSet(support.image_feats @ rot, support.labels, support.caption_feats @ rot)
    ours_rot = CapsAdapter(rot.T @ w, rotated).kl_divergence(xv @ rot)
    # a rotation of the embedding space changes no CLIP similarity, so the class-distribution KL is unchanged ...
    torch.testing.assert_close(ours_rot, ours, rtol=1e-4, atol=1e-5)
    # ... while the official feature-softmax "KL" changes
    buggy, buggy_rot = _feature_softmax_kl(xv, support.image_feats), _feature_softmax_kl(xv @ rot, support.image_feats @ rot)
    assert (buggy - buggy_rot).abs().max() > 10 * (ours - ours_rot).abs().max() + 1e-3
    # and ours depends on the classifier, which the feature-softmax version never looks at
    other_w = F.normalize(torch.randn(D, C, generator=torch.Generator().manual_seed(2)), dim=0)
    assert not torch.allclose(CapsAdapter(other_w, support).kl_divergence(xv), ours)


def test_kl_covers_every_row_no_dropped_last_batch(problem):
    w, support, _, _ = problem
    feats = F.normalize(torch.randn(257, D, generator=torch.Generator().manual_seed(3)), dim=-1)
    kl = CapsAdapter(w, support).kl_divergence(feats)
    assert kl.shape == (257, len(support))
    log_q = class_log_probs(support.image_feats, w)
    for i in (0, 128, 255, 256):  # the last rows are there and right
        ref = F.kl_div(log_q, class_log_probs(feats[i : i + 1], w).expand_as(log_q), log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(kl[i], ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Captions: file reader, prompts, plug-in


def test_read_captions_jsonl_and_tsv_resolve_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    jsonl = tmp_path / "sub" / "captions.jsonl"
    jsonl.write_text(
        json.dumps({"image": "a/1.png", "caption": "a red circle"}) + "\n\n" + json.dumps({"image": "../b.png", "caption": " big "}) + "\n"
    )
    got = read_captions(jsonl)
    assert got == {caption_key(tmp_path / "sub" / "a" / "1.png"): "a red circle", caption_key(tmp_path / "b.png"): "big"}
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("image\tcaption\na/1.png\ta sketch\twith a tab\n/abs/x.png\tnoisy square\n")
    got = read_captions(tsv)
    assert got == {caption_key(tmp_path / "a" / "1.png"): "a sketch\twith a tab", os.path.normpath("/abs/x.png"): "noisy square"}
    sniffed = tmp_path / "captions"  # no suffix: the first line decides
    sniffed.write_text('{"image": "c.png", "caption": "c"}\n')
    assert read_captions(sniffed) == {caption_key(tmp_path / "c.png"): "c"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": "b.png"\n', r"c\.jsonl:2: not valid JSON"),
        ("c.jsonl", '{"image": "a.png", "caption": "x"}\n{"caption": "y"}\n', r"c\.jsonl:2: field 'image' must be a non-empty string"),
        ("c.jsonl", '{"image": "a.png", "caption": 3}\n', r"c\.jsonl:1: field 'caption' must be a string"),
        ("c.jsonl", '["a.png", "x"]\n', r"c\.jsonl:1: expected a JSON object"),
        ("c.tsv", "a.png\tx\nb.png no tab\n", r"c\.tsv:2: expected 'relpath<TAB>caption', found no tab"),
        ("c.tsv", "a.png\t  \n", r"c\.tsv:1: field 'caption' is empty"),
        ("c.tsv", "\tx\n", r"c\.tsv:1: field 'image' .* is empty"),
        ("c.tsv", "a.png\tx\n\na.png\ty\n", r"c\.tsv:3: field 'image' 'a.png' already has a different caption on line 1"),
        ("c.tsv", "\n\n", r"c\.tsv: no captions found"),
    ],
)
def test_read_captions_errors_name_file_line_and_field(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_captions(path)


def test_read_captions_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"captions file .*nope\.jsonl does not exist"):
        read_captions(tmp_path / "nope.jsonl")


def test_caps_prompt_and_support_prompts(tmp_path):
    assert caps_prompt("circle", "a red circle on grass") == "A photo of circle. a red circle on grass"
    assert caps_prompt("circle", "  ") == "A photo of circle."
    captions = {caption_key(tmp_path / "1.png"): "red", caption_key(tmp_path / "2.png"): "blue"}
    prompts = support_prompts([tmp_path / "1.png", tmp_path / "2.png"], torch.tensor([1, 0]), ["square", "circle"], captions)
    # each image is prompted with its own class's name (the official few-shot loader prompts every class after
    # the first with the first class's name)
    assert prompts == ["A photo of circle. red", "A photo of square. blue"]
    with pytest.raises(KeyError, match=r"caps\.tsv: no caption for 1 of 2 support images: .*3\.png"):
        support_prompts([tmp_path / "1.png", tmp_path / "3.png"], [0, 0], ["a"], captions, source="caps.tsv")


def test_captioner_plugin_protocol(tmp_path):
    from PIL import Image

    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), colour).save(paths[-1])

    class ColourCaptioner:  # stands in for a multimodal LM
        def caption(self, images):
            return [f"a {'red' if im.getpixel((0, 0))[0] > 200 else 'dark'} square" for im in images]

    assert isinstance(ColourCaptioner(), Captioner)
    got = caption_images(ColourCaptioner(), paths, batch_size=2)
    assert got == {caption_key(paths[0]): "a red square", caption_key(paths[1]): "a dark square", caption_key(paths[2]): "a dark square"}

    class Broken:
        def caption(self, images):
            return ["only one"]

    with pytest.raises(ValueError, match=r"Broken\.caption: expected a list of 2 strings"):
        caption_images(Broken(), paths, batch_size=2)


# ---------------------------------------------------------------------------------------------------
# Shots and input checks


def test_sample_shots_is_seeded_balanced_and_nested():
    labels = torch.arange(5).repeat_interleave(7)[torch.randperm(35, generator=torch.Generator().manual_seed(0))]
    idx = sample_shots(labels, 4, seed=3)
    assert idx.dtype == torch.long and idx.shape == (20,)
    assert labels[idx].tolist() == [c for c in range(5) for _ in range(4)]  # grouped by class
    assert len(set(idx.tolist())) == 20
    assert torch.equal(idx, sample_shots(labels, 4, seed=3))
    assert not torch.equal(idx, sample_shots(labels, 4, seed=4))
    one = sample_shots(labels, 1, seed=3)
    assert set(one.tolist()) <= set(idx.tolist())  # the 1-shot set is inside the 4-shot set


def test_sample_shots_errors():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"k=3 shots per class requested but class 1 has 2"):
        sample_shots(labels, 3, seed=0)
    with pytest.raises(ValueError, match=r"class 3 has 0"):
        sample_shots(labels, 1, seed=0, num_classes=4)
    with pytest.raises(TypeError, match=r"labels: expected integer class indices"):
        sample_shots(labels.float(), 1, seed=0)
    with pytest.raises(ValueError, match=r"k \(shots per class\): expected an int >= 1"):
        sample_shots(labels, 0, seed=0)


def test_inputs_are_checked_with_names_and_shapes(problem):
    w, support, (xv, yv), _ = problem
    with pytest.raises(ValueError, match=r"clip_weights: expected shape \(D=64, C\), got \(10, 64\) — it looks like \(C, D\)"):
        fit_fewshot("tip", w.T, support, xv, yv)
    with pytest.raises(ValueError, match=r"val_feats: rows must be L2-normalized"):
        fit_fewshot("tip", w, support, 2 * xv, yv)
    with pytest.raises(ValueError, match=r"val_feats: expected feature dim D=64"):
        fit_fewshot("tip", w, support, xv[:, :32], yv)
    with pytest.raises(ValueError, match=r"val_labels: expected 200 labels"):
        fit_fewshot("tip", w, support, xv, yv[:5])
    with pytest.raises(ValueError, match=r"val_labels: labels must be < C=10"):
        fit_fewshot("tip", w, support, xv, yv + 1)
    with pytest.raises(TypeError, match=r"support\.labels: expected integer class indices"):
        SupportSet(support.image_feats, support.labels.float())
    with pytest.raises(ValueError, match=r"support\.caption_feats: expected 40 rows"):
        SupportSet(support.image_feats, support.labels, support.caption_feats[:3])
    with pytest.raises(ValueError, match=r"support\.caption_feats: kind='caps' needs"):
        fit_fewshot("caps", w, SupportSet(support.image_feats, support.labels), xv, yv)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['epochs'\]"):
        fit_fewshot("tip", w, support, xv, yv, epochs=3)
    with pytest.raises(ValueError, match=r"kind: expected one of"):
        fit_fewshot("lora", w, support, xv, yv)
    with pytest.raises(ValueError, match=r"feats: expected feature dim D=64"):
        TipAdapter(w, support).logits(xv[:, :8])


def test_tip_f_trains_at_the_initial_values_on_augmented_views(problem):
    w, support, (xv, yv), _ = problem
    # the keys move even where the search picks α = 0 (zero-shot already right on val): the official fixed
    # initial (α, β) = (1, 1) gives them a gradient; the searched values would not
    perfect = w.T[torch.arange(C).repeat_interleave(2)]
    g = torch.Generator().manual_seed(1)
    views = F.normalize(support.image_feats[None] + 0.05 * torch.randn(3, *support.image_feats.shape, generator=g), dim=-1)
    aug = SupportSet.from_views(views, support.labels)
    torch.testing.assert_close(aug.image_feats, F.normalize(views.mean(0), dim=-1))
    model = TipAdapterF(w, aug)
    hp = model.fit(perfect, torch.arange(C).repeat_interleave(2), epochs=3, progress=False)
    assert hp["tip_alpha"] == 0 and hp["train_alpha"] == 1.0 and hp["train_beta"] == 1.0
    assert hp["train_inputs"] == "augmented views" and hp["views"] == 3
    trained = TipAdapterF(w, aug)
    trained.alpha, trained.beta = 1.0, 1.0
    loss = F.cross_entropy(trained(views[0]), support.labels)
    loss.backward()
    assert trained.keys.weight.grad.abs().sum() > 0
    # without views the keys themselves are the training inputs, and the model says so
    assert fit_fewshot("tip-f", w, support, xv, yv, progress=False).hyperparams["train_inputs"] == "cache keys"
    with pytest.raises(ValueError, match=r"support.views: expected shape \(V, N=40, D=64\)"):
        SupportSet(support.image_feats, support.labels, None, views[:, :3])


def test_support_set_of_sampled_shots_keeps_views_and_captions_with_their_shot(problem):
    w, support, (xv, yv), _ = problem
    g = torch.Generator().manual_seed(2)
    views = F.normalize(support.image_feats[None] + 0.05 * torch.randn(2, *support.image_feats.shape, generator=g), dim=-1)
    index = sample_shots(support.labels, 2, seed=3)
    plain = support_set(support.image_feats, support.labels, index=index, caption_feats=support.caption_feats)
    assert torch.equal(plain.image_feats, support.image_feats[index]) and torch.equal(plain.labels, support.labels[index])
    assert torch.equal(plain.caption_feats, support.caption_feats[index]) and plain.views is None
    cached = support_set(support.image_feats, support.labels, index=index, views=views)
    assert torch.equal(cached.views, views[:, index])  # the official cache: keys = mean of the shots' views
    torch.testing.assert_close(cached.image_feats, F.normalize(views[:, index].mean(0), dim=-1))
    # train=False (the recipe's engine trains the keys): Tip-F's keys stay F, (α, β) as Tip's search finds them
    tip = fit_fewshot("tip", w, cached, xv, yv)
    untrained = fit_fewshot("tip-f", w, cached, xv, yv, train=False)
    assert torch.equal(untrained.keys.weight, untrained.cache_keys) and "best_epoch" not in untrained.hyperparams
    assert (untrained.alpha, untrained.beta) == (tip.alpha, tip.beta)
    with pytest.raises(TypeError, match=r"training options \['epochs'\] need train=True"):
        fit_fewshot("tip-f", w, cached, xv, yv, train=False, epochs=2)


def test_caps_full_joint_grid_finds_the_brute_force_optimum(problem):
    w, support, (xv, yv), _ = problem
    grids = dict(alphas=[0.0, 1.0, 10.0], betas=[0.5, 5.0, 30.0], gammas=[0.0, 0.3, 3.0], deltas=[0.0, 0.5, 1.0])
    caps = CapsAdapter(w, support)
    hp = caps.search(xv, yv, **grids)
    best, probe = -1.0, CapsAdapter(w, support)
    for d in grids["deltas"]:  # one (δ, γ, β, α) point at a time, through the model's own forward
        probe.calibrate(xv, d)
        for g in grids["gammas"]:
            for b in grids["betas"]:
                for a in grids["alphas"]:
                    probe.alpha, probe.beta, probe.gamma, probe.delta = a, b, g, d
                    best = max(best, acc(probe.logits(xv), yv))
    assert hp["val_acc1"] == pytest.approx(best) == pytest.approx(acc(caps.logits(xv), yv))
    assert hp["grid"]["points"] == 81 and set(hp["at_edge"]) <= {"alpha", "beta", "gamma"}


def test_default_grids_reach_the_official_edges():
    from mmadapters.vision.caps_adapter import DEFAULT_CAPS_BETAS, DEFAULT_DELTAS, DEFAULT_GAMMAS
    from mmadapters.vision.tip_adapter import DEFAULT_ALPHAS, DEFAULT_BETAS

    assert len(DEFAULT_BETAS) == 200 and max(DEFAULT_BETAS) == pytest.approx(13.0)  # Tip configs: 7-13
    assert len(DEFAULT_CAPS_BETAS) == 200 and max(DEFAULT_CAPS_BETAS) == pytest.approx(50.0)  # SuS-X / CapS
    assert (len(DEFAULT_ALPHAS) - 1, len(DEFAULT_GAMMAS), len(DEFAULT_DELTAS)) == (20, 50, 11)  # α: 20 and 0
