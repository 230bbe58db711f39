"""VL-Adapter's pieces on a tiny random VL-T5 with random image features: every variant's setup, its batches
and targets, the one prediction/metrics path, and the sweep script over `mmadapters train` / `mmadapters eval`.
Training through the engine (`mmadapters train vl-adapter`) is tested in test_train_vl.py."""

from __future__ import annotations

import contextlib
import copy
import math
import random

import pytest
import torch

import mmadapters as mma
from mmadapters.vision.vl_adapter import DEFAULT_LR, TASK_PREFIX, make_batch, predict_records, task_metrics
from mmadapters.vision.vl_readers import VLSample
from mmadapters.vision.vl_variants import (
    ADAPTER_POINTS,
    SHARED_NAME,
    VARIANTS,
    VariantConfig,
    parameter_report,
    setup_variant,
)
from mmadapters.vision.vlt5 import tiny_vlt5

VISUAL_DIM, N_TOKENS = 16, 4
WORDS = ["what", "color", "is", "the", "cube", "ball", "red", "blue", "green", "left", "of", "a", "true", "false",
         "how", "many", "two", "three", "there", "small", "big", *(p.strip() for p in TASK_PREFIX.values())]


def _samples() -> dict[str, list[VLSample]]:
    g = torch.Generator().manual_seed(0)
    colors = ["red", "blue", "green"]
    vqa, gqa, nlvr, cap = [], [], [], []
    for i in range(6):
        c = colors[int(torch.randint(3, (1,), generator=g))]
        vqa.append(VLSample("vqa", f"q{i}", [f"img{i}"], "what color is the cube", [c, "blue"], answers=[c] * 7 + ["blue"] * 3,
                            label={c: 1.0}))
        gqa.append(VLSample("gqa", f"g{i}", [f"img{i}"], "what is left of the ball", ["cube"], label={"cube": 1.0}))
        nlvr.append(VLSample("nlvr", f"n{i}", [f"img{i}", f"img{(i + 1) % 6}"], "there are two cubes",
                             ["true" if i % 2 else "false"]))
        cap.append(VLSample("caption", f"{i}", [f"img{i}"], "", [f"a {c} cube left of a ball", f"a small {c} cube"]))
    return {"vqa": vqa, "gqa": gqa, "nlvr": nlvr, "caption": cap}


SAMPLES = _samples()
FEATS = {f"img{i}": torch.randn(N_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(i)) for i in range(6)}


def features(img_id: str) -> torch.Tensor:
    if img_id not in FEATS:
        raise KeyError(f"test features: no image {img_id!r}")
    return FEATS[img_id]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_vlt5(tmp_path_factory.mktemp("vlt5"), [" ".join(WORDS)], visual_dim=VISUAL_DIM, num_visual_tokens=N_TOKENS,
                     d_model=32, d_ff=64, num_layers=2, num_heads=2)


def train_steps(model, setup, data, steps: int, lr: float = 1e-3, batch_size: int = 3) -> list[float]:
    """A bare loop over the recipe's batches (one task per batch, tasks in turn): the losses, shape (steps,).
    Enough to see what trains; the engine's own loop is what `mmadapters train` runs."""
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = [(t, s[i:i + batch_size]) for t, s in data.items() for i in range(0, len(s), batch_size)]
    model.train()
    losses = []
    for step in range(steps):
        task, samples = order[step % len(order)]
        setup.activate(model, task)
        batch = make_batch(model, task, samples, features, max_text_length=40, max_target_length=20, rng=rng)
        with setup.fusion(model, batch.visual_feats):
            loss = model(batch.input_ids, batch.attention_mask, batch.visual_feats, labels=batch.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_sets_up_trains_and_only_its_parameters_change(base_model, variant):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, variant)
    report = parameter_report(model, setup)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter_ids = mma.model._all_adapter_param_ids(model)
    if variant == "full_ft":
        assert report.trainable == report.backbone and report.adapters == 0 and report.trainable_pct == 100.0
    else:
        # numbers add up: adapters (shared parts once) + LayerNorms and visual projection
        assert report.trainable == report.adapters + report.extras
        assert math.isclose(report.trainable_pct, 100.0 * report.trainable / report.backbone)
        assert 0 < report.trainable_pct < 100.0
        extras = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids}
        assert extras and all(("layer_norm" in n or n.startswith("visual_proj.")) for n in extras), extras
        assert "t5.encoder.final_layer_norm.weight" in extras and "visual_proj.feat_proj.weight" in extras
        assert not model.t5.shared.weight.requires_grad
        assert report.extras == sum(p.numel() for n, p in model.named_parameters() if n in extras)
    text = str(report)  # a readable table, not a dataclass repr
    assert text.startswith(f"VL-Adapter variant {variant!r}") and "VariantParameters(" not in text
    assert f"{report.trainable:,}" in text and f"{report.trainable_pct:.2f}%" in text
    losses = train_steps(model, setup, SAMPLES, 3)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable  # nothing frozen moved
    if variant != "full_ft":
        assert any(id(after[n]) in adapter_ids for n in changed)  # the adapters themselves trained


def test_loss_goes_down_on_a_repeated_batch(base_model):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, "shared_adapter", tasks=("vqa",))
    losses = train_steps(model, setup, {"vqa": SAMPLES["vqa"][:3]}, 25, lr=1e-2)
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)


def test_shared_adapter_is_one_module_set_for_every_task(base_model):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, "shared_adapter")
    assert mma.adapter_names(model) == [SHARED_NAME]
    assert set(setup.adapter_for.values()) == {SHARED_NAME}
    n_points = sum(len(mma.targets.resolve_targets(model, [p])) for p in ADAPTER_POINTS)
    assert n_points == 2 * 2 + 2 * 3  # 2 encoder blocks x 2 points, 2 decoder blocks x 3 points
    units = [w for w in mma.model.wrappers(model) if SHARED_NAME in w.adapters]
    assert len(units) == n_points


def test_per_task_adapters_are_separate_and_train_apart(base_model):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, "multiple_adapters", tasks=("vqa", "gqa"))
    assert setup.adapter_for == {"vqa": "vqa", "gqa": "gqa"}
    train_steps(model, setup, {t: SAMPLES[t] for t in ("vqa", "gqa")}, 6, lr=1e-2)
    vqa, gqa = mma.adapter_parameters(model, "vqa"), mma.adapter_parameters(model, "gqa")
    assert vqa.keys() == gqa.keys()
    ups = [k for k in vqa if k.endswith("up.weight")]
    assert all(vqa[k] is not gqa[k] for k in vqa)
    assert all(vqa[k].abs().sum() > 0 and gqa[k].abs().sum() > 0 for k in ups)  # both trained (Up starts at zero)
    assert any(not torch.allclose(vqa[k], gqa[k]) for k in ups)


@pytest.mark.parametrize("variant, shared", [("half_shared_down", "down"), ("half_shared_up", "up")])
def test_half_shared_variants_share_one_projection(base_model, variant, shared):
    model = copy.deepcopy(base_model)
    setup_variant(model, variant, tasks=("vqa", "nlvr"))
    private = "up" if shared == "down" else "down"
    for w in mma.model.wrappers(model):
        a, b = w.adapters["vqa"]["bottleneck"], w.adapters["nlvr"]["bottleneck"]
        assert getattr(a, shared) is getattr(b, shared) and getattr(a, private) is not getattr(b, private)


def test_hyperformer_has_an_encoder_and_a_decoder_hypernetwork(base_model):
    model = copy.deepcopy(base_model)
    setup_variant(model, "hyperformer", tasks=("vqa", "gqa", "caption"))
    keys = sorted(model.mma_shared.keys())
    assert "hypernet_vl_encoder" in keys and "hypernet_vl_decoder" in keys
    # fed [task; layer; block type]: one layer embedding per T5 block, the adapter's position as the block type
    assert model.mma_shared["hypernet_vl_encoder"].num_layers == 2 and model.mma_shared["hypernet_vl_decoder"].num_layers == 2
    assert model.mma_shared["hypernet_vl_encoder"].block_types == ["self_attention", "feed_forward"]
    assert model.mma_shared["hypernet_vl_decoder"].block_types == ["self_attention", "cross_attention", "feed_forward"]
    assert sum(k.endswith("__task_embedding") for k in keys) == 3  # one task embedding per task


def test_hypernet_groups_must_cover_every_target(base_model):
    model = copy.deepcopy(base_model)
    config = mma.HyperAdapterConfig(target_modules=ADAPTER_POINTS, hidden_dim=8, task_embedding_dim=8, layer_embedding_dim=8,
                                    bottleneck_dim=4, hypernet_groups={"encoder": ["@enc_attn_out", "@enc_ffn_out"]})
    with pytest.raises(ValueError, match="hypernet_groups: adapted module 't5.decoder.block.0.*in no group"):
        mma.add_adapter(model, "vqa", config)
    assert not mma.adapter_names(model)


def test_compacter_and_phm_adapter_are_named_for_what_they_are(base_model):
    comp, phm = copy.deepcopy(base_model), copy.deepcopy(base_model)
    setup_variant(comp, "compacter")
    setup_variant(phm, "phm_adapter")
    comp_names = [n for n, _ in comp.named_parameters()]
    phm_names = [n for n, _ in phm.named_parameters()]
    assert any("phm_left" in n for n in comp_names) and any("mma_shared" in n and "phm_rule" in n for n in comp_names)
    assert any("phm_weight" in n for n in phm_names) and not any("mma_shared" in n for n in phm_names)
    assert parameter_report(comp, setup_variant(copy.deepcopy(base_model), "compacter")).adapters < \
        parameter_report(phm, setup_variant(copy.deepcopy(base_model), "phm_adapter")).adapters


def test_lora_and_prompt_sizes_scale_with_the_model(base_model):
    lora = setup_variant(copy.deepcopy(base_model), "lora")
    assert lora.sizes["lora_r"] == 5 and lora.sizes["lora_alpha"] == 1.25  # d / 6, r / 4 (paper: 128, 32 at d = 768)
    model = copy.deepcopy(base_model)
    setup_variant(model, "prompt", prompt_tokens=7)
    ids, mask = model.encode_text(["vqa: what color"])
    embeds, full_mask = model.encoder_inputs(ids, mask, features("img0")[None])
    assert embeds.shape[1] == 7 + N_TOKENS + ids.shape[1] and full_mask.shape == embeds.shape[:2]


def test_one_prediction_path_scores_each_task_and_skips_bad_samples_with_the_reason(base_model):
    from mmadapters.eval.metrics import vqa_accuracy

    model = copy.deepcopy(base_model).train()
    setup = setup_variant(model, "shared_adapter")
    bad = VLSample("vqa", "missing", ["no_such_image"], "what color", ["red"], answers=["red"] * 10)
    unscorable = VLSample("vqa", "noanswers", ["img0"], "what color", ["red"])
    records, skipped = predict_records(model, setup, "vqa", [*SAMPLES["vqa"], bad, unscorable], features, max_new_tokens=4)
    assert model.training  # validation leaves the model in the mode it found it in
    assert [r["id"] for r in records] == [s.uid for s in SAMPLES["vqa"]]
    reasons = dict(skipped)
    assert set(reasons) == {"missing", "noanswers"}
    assert reasons["missing"].startswith("MissingFeaturesError") and "no_such_image" in reasons["missing"]
    assert "no human answers" in reasons["noanswers"]
    metrics, groups = task_metrics("vqa", records)
    assert list(metrics) == ["vqa_accuracy"] and groups is None  # these samples carry no answer/question type
    assert metrics["vqa_accuracy"] == pytest.approx(sum(vqa_accuracy(r["prediction"], r["answers"]) for r in records) / 6)
    for task, metric in (("gqa", "accuracy"), ("nlvr", "accuracy"), ("caption", "cider")):
        records, skipped = predict_records(model, setup, task, SAMPLES[task], features, max_new_tokens=4)
        metrics, _ = task_metrics(task, records)
        assert len(records) == 6 and not skipped and list(metrics)[0] == metric and math.isfinite(metrics[metric])
    assert set(metrics) == {"cider", "bleu4"}
    assert math.isnan(task_metrics("gqa", [])[0]["accuracy"])
    with pytest.raises(ValueError, match="task 'okvqa'"):
        task_metrics("okvqa", [])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="VariantConfig.variant"):
        VariantConfig(variant="adapterdrop")
    with pytest.raises(ValueError, match="VariantConfig.per_task"):
        VariantConfig(variant="multiple_adapters", per_task=False)


def test_a_saved_hyperformer_task_carries_both_hypernetworks(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, "hyperformer", tasks=("vqa", "gqa"), train_extras=False)  # only the adapters change
    train_steps(model, setup, {t: SAMPLES[t] for t in setup.tasks}, 3, lr=1e-2)
    mma.save_adapter(model, "gqa", tmp_path / "gqa")
    fresh = copy.deepcopy(base_model)
    mma.load_adapter(fresh, tmp_path / "gqa")
    assert sorted(fresh.mma_shared.keys()) == ["gqa__task_embedding", "hypernet_vl_decoder", "hypernet_vl_encoder"]
    model.eval()
    setup.activate(model, "gqa")
    ids, mask = model.encode_text(["gqa: what is left of the ball"])
    feats, labels = features("img1")[None], model.encode_targets(["cube"])
    with torch.no_grad():
        assert torch.allclose(model(ids, mask, feats, labels=labels).logits, fresh(ids, mask, feats, labels=labels).logits, atol=1e-5)


def test_run_script_sweeps_train_and_eval_and_tables_their_files(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from mmadapters.eval.results_schema import read_results
    from mmadapters.vision.synth_vl import generate_vl
    from mmadapters.vision.vl_adapter import HEADLINE
    from mmadapters.vision.vl_readers import read_coco_karpathy, read_gqa, read_nlvr2, read_vqa

    data = tmp_path / "data"
    generate_vl(data, n_images=20, seed=1, progress=False)
    texts = ["vqa: gqa: nlvr: caption: true false"]
    rows = [*read_vqa(data / "vqa/karpathy_train.json"), *read_gqa(data / "gqa/train.json"), *read_nlvr2(data / "nlvr/train.json"),
            *read_coco_karpathy(data / "coco/dataset_coco.json", ("train", "val", "test"))]
    texts += [f"{s.text} {' '.join(s.targets)}" for s in rows]
    tiny_vlt5(tmp_path / "vlt5", texts, visual_dim=8, num_visual_tokens=4, d_model=16, d_ff=32, num_layers=1, num_heads=2)
    feats = tmp_path / "feats"
    feats.mkdir()
    for i, png in enumerate(sorted((data / "images").glob("*.png"))):
        save_file({"features": torch.randn(4, 8, generator=torch.Generator().manual_seed(i))}, str(feats / f"{png.stem}.safetensors"))
    script = _run_script()
    out = tmp_path / "out"
    args = ["--data", str(data), "--model", str(tmp_path / "vlt5"), "--features", str(feats), "--out", str(out),
            "--variants", "pretrained,full_ft,half_shared_down", "--steps", "2", "--batch-size", "4", "--max-val", "2",
            "--max-test", "3", "--max-new-tokens", "3", "--num-beams", "2", "--quiet"]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("--num-beams 2") == 12  # every test-time generation uses the beam width
    assert printed.count("$ mmadapters train vl-adapter --output") == 2 and printed.count("$ mmadapters eval ") == 12
    assert "--set recipe.variant=half_shared_down --set recipe.reduction_factor=8.0" in printed and "--resume" not in printed
    result = json.loads((out / "vl_adapter_results.json").read_text())
    assert [r["variant"] for r in result["runs"]] == ["full_ft", "half_shared_down", "pretrained"]
    pretrained = result["runs"][2]  # scored once, after the trainings, without adapters
    assert pretrained["seed"] is None and pretrained["parameters"]["trainable"] == 0
    assert all(f"runs/pretrained/test_{t}.json --batch-size" in printed for t in pretrained["test"])
    assert "--adapters" not in next(line for line in printed.splitlines() if "runs/pretrained/test_vqa.json" in line)
    assert all(set(r["test"]) == {"vqa", "gqa", "nlvr", "caption"} for r in result["runs"])
    assert result["runs"][0]["parameters"]["trainable_pct"] == 100.0
    for run in result["runs"]:  # the table's numbers are those of the train summary and the eval results files
        assert run["history"]["total_steps"] == (0 if run is pretrained else 2)
        for task, t in run["test"].items():
            metrics = read_results(t["results_file"])["metrics"]
            assert t["score"] == metrics[HEADLINE[task]] and t["count"] == min(3, result["meta"]["counts"]["test"][task])
    table = (out / "vl_adapter_results.md").read_text()
    assert "| half_shared_down |" in table and "| full_ft |" in table and "| pretrained |" in table and "CIDEr" in table
    pre_row = next(line for line in table.splitlines() if line.startswith("| pretrained |"))
    assert f"| {pretrained['average'] - result['runs'][0]['average']:+.1f} |" in pre_row
    gain = result["runs"][0]["average"] - pretrained["average"]
    assert f"Gate: full fine-tuning adds {gain:+.1f} points" in table
    assert ("passed" if gain >= script.GATE_POINTS else "FAILED") in table.split("Gate:")[1]
    row = next(line for line in table.splitlines() if line.startswith("| half_shared_down |"))
    assert f"| {100 * result['runs'][1]['test']['vqa']['score']:.1f} |" in row
    # --merge: runs of another process with the same settings join the table; other settings are refused
    other = json.loads((out / "vl_adapter_results.json").read_text())
    other["runs"] = [{**other["runs"][1], "variant": "lora"}]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert script.main(["--merge", str(out / "vl_adapter_results.json"), str(tmp_path / "other.json"),
                        "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "vl_adapter_results.json").read_text())
    assert [r["variant"] for r in merged["runs"]] == ["full_ft", "half_shared_down", "pretrained", "lora"]
    other["meta"]["argv"] = [a if a != "2" else "5" for a in other["meta"]["argv"]]  # --steps 2 -> 5
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="--steps"):
        script.main(["--merge", str(out / "vl_adapter_results.json"), str(tmp_path / "other.json"), "--out", str(tmp_path / "m2")])
    # a rerun continues the finished training (--resume) instead of starting again, and reproduces its scores
    capsys.readouterr()
    assert script.main([*args[:args.index("--variants")], "--variants", "half_shared_down",
                        *args[args.index("--variants") + 2:]]) == 0
    assert "--resume" in capsys.readouterr().out
    again = json.loads((out / "vl_adapter_results.json").read_text())["runs"]
    assert [r["variant"] for r in again] == ["half_shared_down"]
    assert {t: r["score"] for t, r in again[0]["test"].items()} == {t: r["score"] for t, r in result["runs"][1]["test"].items()}
    # the pretrained row alone needs features: named, not a crash inside eval
    bare = [a for i, a in enumerate(args) if a != "--features" and (i == 0 or args[i - 1] != "--features")]
    bare[bare.index("--variants") + 1], bare[bare.index("--out") + 1] = "pretrained", str(tmp_path / "bare")
    with pytest.raises(SystemExit, match="no image features"):
        script.main(bare)


def _run_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "run_vl_adapter.py"
    spec = importlib.util.spec_from_file_location("_script_run_vl_adapter", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_run_script_averages_the_chosen_tasks_and_tables_seed_means(tmp_path):
    import json

    from mmadapters.vision.vl_adapter import HEADLINE

    script = _run_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--data", "d", "--average", "vqa,ok-vqa"])
    assert script.parse_args(["--data", "d", "--average", "vqa, gqa,caption"]).average == ["vqa", "gqa", "caption"]
    runs = []
    for seed, (full, shared) in enumerate([((50, 40, 60, 80), (49, 41, 50, 76)), ((52, 42, 40, 84), (50, 40, 50, 81))]):
        for variant, scores in (("full_ft", full), ("shared_adapter", shared)):
            run_dir = tmp_path / f"{variant}-{seed}"
            run_dir.mkdir()
            (run_dir / "train_summary.json").write_text(json.dumps({
                "parameters": {"trainable": 100 if variant == "full_ft" else 4, "backbone": 100}, "steps": 10,
                "timings": {"train_s": 1.0}, "best_step": 10, "best_metrics": {}, "history": [], "config": {}}))
            results = {task: {"metrics": {HEADLINE[task]: value / 100}, "counts": {"evaluated": 3, "skipped": 0},
                              "output": str(run_dir / f"test_{task}.json")}
                       for task, value in zip(("vqa", "gqa", "nlvr", "caption"), scores, strict=True)}
            runs.append(script.run_record(variant, seed, False, run_dir, run_dir, results, ["vqa", "gqa", "caption"]))
    assert runs[0]["average"] == pytest.approx((50 + 40 + 80) / 3)  # NLVR outside the average
    assert runs[1]["average"] == pytest.approx((49 + 41 + 76) / 3)
    table = script.markdown(runs, {"data": "d", "model": "m", "backbone_params": 100, "device": "cpu"})
    assert "average = the mean of VQA, GQA, CIDEr (NLVR reported outside it)" in table
    mean_row = next(line for line in table.splitlines() if line.startswith("| shared_adapter | 2 |"))
    cells = [c.strip() for c in mean_row.strip("|").split("|")]
    assert cells[3] == "49.5 ± 0.7" and cells[5] == "50.0 ± 0.0" and cells[6] == "78.5 ± 3.5"
    # per seed: shared - full = (166 - 170) / 3 and (171 - 178) / 3
    assert cells[8] == f"{(-4 / 3 - 7 / 3) / 2:.1f} ± {abs(-4 / 3 + 7 / 3) / 2 ** 0.5:.1f}"


# -- LLaMA-Adapter V2 (gated prompts + bias/scale + early fusion of the global visual feature) --------------------

def _llama_units(model):
    from mmadapters.methods.llama_adapter import AdaptionPrompt, BiasScale

    prompts = {w.module_name: u for w in mma.model.wrappers(model) for u in w.units(SHARED_NAME) if isinstance(u, AdaptionPrompt)}
    biases = {w.module_name for w in mma.model.wrappers(model) for u in w.units(SHARED_NAME) if isinstance(u, BiasScale)}
    return prompts, biases


def test_llama_adapter_v2_sets_up_prompts_bias_scale_and_early_fusion(base_model):
    from mmadapters.vision.vl_variants import global_visual_feature

    model = copy.deepcopy(base_model).eval()
    setup = setup_variant(model, "llama_adapter_v2", llama_prompts=5)
    assert setup.visual_tokens and set(setup.adapter_for.values()) == {SHARED_NAME} and mma.adapter_names(model) == [SHARED_NAME]
    prompts, biases = _llama_units(model)
    assert sorted(prompts) == [f"t5.encoder.block.{i}.layer.0.SelfAttention" for i in range(2)]  # every encoder layer
    assert [prompts[n].fused for n in sorted(prompts)] == [True, False]  # visual tokens join the first layer only
    assert len(biases) == 2 * 2 + 2 * 3 and "t5.decoder.block.1.layer.1.EncDecAttention.o" in biases
    report = parameter_report(model, setup)
    d = 32
    expected = 2 * (5 * d + 2) + (VISUAL_DIM * d + d) + len(biases) * 2 * d  # prompts + gates, projection, scale + bias
    assert report.adapters == expected and report.trainable == report.adapters + report.extras
    assert math.isclose(report.trainable_pct, 100.0 * report.trainable / report.backbone)
    assert DEFAULT_LR["llama_adapter_v2"] == 1e-3
    # the global feature: mean over every grid token of the sample's image(s)
    pair = torch.stack([torch.stack([features("img0"), features("img1")])])  # (1, 2, N, D)
    assert torch.allclose(global_visual_feature(pair)[0], torch.cat([features("img0"), features("img1")]).mean(0))

    ids, mask = model.encode_text(["vqa: what color is the cube", "gqa: what is left of the ball"])
    feats, labels = torch.stack([features("img0"), features("img3")]), model.encode_targets(["red", "cube"])

    def logits(fused: bool) -> torch.Tensor:
        ctx = setup.fusion(model, feats) if fused else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return model(ids, mask, feats, labels=labels).logits

    with torch.no_grad():
        reference = base_model.eval()(ids, mask, feats, labels=labels).logits
    assert torch.allclose(logits(True), reference, atol=1e-5)  # identity at init: zero gates, scale 1, bias 0
    first, second = (prompts[f"t5.encoder.block.{i}.layer.0.SelfAttention"] for i in range(2))
    with torch.no_grad():
        first.prompt_gate.fill_(0.5)
        second.prompt_gate.fill_(0.5)
    assert not torch.allclose(logits(True), logits(False), atol=1e-4)  # the fused image changes the output ...
    assert first._visual.tokens is None  # ... and is gone after the call
    with torch.no_grad():
        first.prompt_gate.zero_()
    assert not torch.allclose(logits(False), reference, atol=1e-4)  # the second layer's prompts still act ...
    assert torch.allclose(logits(True), logits(False), atol=1e-6)  # ... but only the first layer's carry the image


def test_llama_adapter_v2_learns_a_repeated_batch_and_evaluates_with_the_image(base_model):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, "llama_adapter_v2", tasks=("vqa", "nlvr"))
    losses = train_steps(model, setup, {"vqa": SAMPLES["vqa"][:3]}, 25, lr=1e-2)
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    prompts, _ = _llama_units(model)
    assert all(u.prompt_gate.abs().sum() > 0 for u in prompts.values())  # the gates opened
    fusion = next(u._visual for u in prompts.values() if u.fused)
    seen = []
    generate = model.generate

    def spy(input_ids, *args, **kw):
        seen.append(None if fusion.tokens is None else tuple(fusion.tokens.shape))
        return generate(input_ids, *args, **kw)

    model.generate = spy
    for task in ("vqa", "nlvr"):  # NLVR2: the global feature of both images
        records, skipped = predict_records(model, setup, task, SAMPLES[task], features, batch_size=4, max_new_tokens=3)
        assert len(records) == 6 and not skipped and math.isfinite(list(task_metrics(task, records)[0].values())[0])
    assert seen == [(4, 1, VISUAL_DIM), (2, 1, VISUAL_DIM)] * 2 and fusion.tokens is None
