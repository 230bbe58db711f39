"""VL-Adapter details as its official code (ylsung/VL_adapter, on j-min/VL-T5) has them (issue 19 item 4):

(a) the VQA training answer is drawn in proportion to the answers' soft scores each time a question is drawn;
(b) task prefixes only for the variants whose tasks share adapters (none for full fine-tuning / per-task adapters);
(c) Hyperformer's hypernetwork is fed task, layer and block-type embeddings.

Everything runs on a tiny random VL-T5 (d_model 32, 2 layers) and random image features, single-threaded."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

import mmadapters as mma
from mmadapters.training.config_io import ConfigError, from_mapping
from mmadapters.vision.synth_vl import generate_vl
from mmadapters.vision.vl_adapter import (
    TASK_PREFIX,
    VLPredictor,
    load_trained,
    make_batch,
    training_target,
)
from mmadapters.vision.vl_readers import VLSample, read_vqa
from mmadapters.vision.vl_train import VLTrainConfig, VLTrainTask
from mmadapters.vision.vl_variants import (
    HYPER_BLOCK_TYPES,
    VARIANTS,
    VariantConfig,
    parameter_report,
    setup_variant,
    uses_task_prefix,
)
from mmadapters.vision.vlt5 import VLT5, tiny_vlt5

VISUAL_DIM, N_TOKENS, D = 16, 4, 32
WORDS = ["what", "color", "is", "the", "cube", "red", "blue", "green", "grey", "true", "false", "a", "ball",
         *(p.strip() for p in TASK_PREFIX.values())]
FEATS = {f"img{i}": torch.randn(N_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(i)) for i in range(4)}
LABEL = {"red": 1.0, "blue": 0.6, "green": 0.3, "grey": 0.0}  # VQA soft scores min(1, annotators / 3)
VQA = VLSample("vqa", "q0", ["img0"], "what color is the cube", sorted(LABEL, key=lambda a: -LABEL[a]),
               answers=["red"] * 5 + ["blue"] * 2 + ["green"] + ["grey"] * 2, label=dict(LABEL))


def features(img_id: str) -> torch.Tensor:
    return FEATS[img_id]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_vlt5(tmp_path_factory.mktemp("vlt5"), [" ".join(WORDS)], visual_dim=VISUAL_DIM, num_visual_tokens=N_TOKENS,
                     d_model=D, d_ff=64, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    """A 20-image synth_vl folder, random per-image features (a safetensors folder) and a tiny VL-T5 knowing its words."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vl")
    data = root / "data"
    generate_vl(data, n_images=20, seed=1, progress=False)
    texts = [" ".join(TASK_PREFIX.values()) + " true false"]
    for name in ("vqa/karpathy_train.json", "vqa/karpathy_val.json", "gqa/train.json", "gqa/valid.json"):
        texts += [f"{r['sent']} {' '.join(r['label'])}" for r in json.loads((data / name).read_text())]
    for name in ("nlvr/train.json", "nlvr/valid.json"):
        texts += [json.loads(line)["sent"] for line in (data / name).read_text().splitlines() if line.strip()]
    coco = json.loads((data / "coco/dataset_coco.json").read_text())
    texts += [s["raw"] for im in coco["images"] for s in im["sentences"]]
    tiny_vlt5(root / "vlt5", texts, visual_dim=8, num_visual_tokens=4, d_model=16, d_ff=32, num_layers=1, num_heads=2)
    feats = root / "feats"
    feats.mkdir()
    for i, png in enumerate(sorted((data / "images").glob("*.png"))):
        save_file({"features": torch.randn(4, 8, generator=torch.Generator().manual_seed(i))}, str(feats / f"{png.stem}.safetensors"))
    return root


def _task(vl_data, **recipe) -> VLTrainTask:
    config = VLTrainConfig(data=str(vl_data / "data"), features=str(vl_data / "feats"), model=str(vl_data / "vlt5"),
                           max_val_samples=2, **recipe)
    return VLTrainTask(config, progress=False)


# ---------------------------------------------------------------------------------------------- (a) sampled VQA targets


def test_vqa_answer_is_drawn_in_proportion_to_its_soft_score_deterministically():
    n = 20000
    rng = random.Random(0)
    draws = [training_target(VQA, rng) for _ in range(n)]
    counts = Counter(draws)
    total = sum(LABEL.values())
    assert set(counts) == {"red", "blue", "green"}  # a score of 0 is never drawn
    for answer, score in LABEL.items():
        assert counts[answer] / n == pytest.approx(score / total, abs=0.015), (answer, counts)
    # a pure function of the generator: the same seed repeats the draws, another seed gives other draws
    again = random.Random(0)
    assert [training_target(VQA, again) for _ in range(n)] == draws
    other = random.Random(1)
    assert [training_target(VQA, other) for _ in range(200)] != draws[:200]
    # "best": always the top answer (the recipe before); other tasks are not drawn
    rng = random.Random(0)
    assert {training_target(VQA, rng, "best") for _ in range(100)} == {"red"}
    gqa = VLSample("gqa", "g0", ["img0"], "what color", ["blue"], label={"blue": 1.0, "red": 0.5})
    assert {training_target(gqa, rng) for _ in range(50)} == {"blue"}


def test_vqa_target_edge_cases_and_errors_name_the_field(tmp_path):
    zero = VLSample("vqa", "z", ["img0"], "what color", ["red"], label={"red": 0.0})
    with pytest.raises(ValueError, match="no answer with a positive score"):
        training_target(zero, random.Random(0))
    assert training_target(zero, random.Random(0), "best") == "red"
    unlabelled = VLSample("vqa", "u", ["img0"], "what color", ["blue"])  # no scores to draw from: the target given
    assert training_target(unlabelled, random.Random(0)) == "blue"
    with pytest.raises(ValueError, match="vqa_target: expected one of"):
        training_target(VQA, random.Random(0), "top")
    with pytest.raises(ValueError, match=r"VLTrainConfig\.vqa_target: expected one of \['sample', 'best'\]"):
        VLTrainConfig(data=str(tmp_path), vqa_target="top")
    with pytest.raises(ConfigError, match=r"recipe\.vqa_target"):
        from_mapping(VLTrainConfig, {"data": str(tmp_path), "vqa_target": "top"}, source="x.yaml", path="recipe")


def test_make_batch_skips_an_all_zero_label_with_the_reason(base_model):
    zero = VLSample("vqa", "z", ["img1"], "what color is the cube", ["red"], label={"red": 0.0})
    skipped: list = []
    batch = make_batch(base_model, "vqa", [VQA, zero], features, max_text_length=20, max_target_length=8,
                       rng=random.Random(0), skipped=skipped)
    assert [s.uid for s in batch.samples] == ["q0"] and skipped == [("z", "no answer with a positive score to draw a "
                                                                          "training target from")]


def test_the_recipe_draws_a_questions_answer_again_in_every_batch(vl_data):
    task = _task(vl_data, variant="multiple_adapters", tasks=("vqa",))
    vqa = task.train["vqa"]
    k = next(i for i, s in enumerate(vqa) if sum(v > 0 for v in s.label.values()) >= 3)
    sample = vqa[k]
    answers = {a for a, v in sample.label.items() if v > 0}
    others = [i for i in range(len(vqa)) if i != k]

    def drawn(indices, t=task) -> str:
        part = t.get_batch(indices).parts[0]
        row = [s.uid for s in part.samples].index(sample.uid)
        ids = part.labels[row][part.labels[row] != -100]
        return t.model.decode(ids[None])[0]

    seen = [drawn([k, j]) for j in others[:60]]
    assert set(seen) <= answers and len(set(seen)) >= 2, (seen, sample.label)  # drawn anew, only scored answers
    assert [drawn([k, j]) for j in others[:10]] == seen[:10]  # the same batch draws the same (resume, DDP)
    best = _task(vl_data, variant="multiple_adapters", tasks=("vqa",), vqa_target="best")
    assert {drawn([k, j], best) for j in others[:20]} == {sample.targets[0]}


# ---------------------------------------------------------------------------------------------- (b) task prefixes

OFFICIAL_PREFIX = {"full_ft": False, "multiple_adapters": False, "half_shared_down": True, "half_shared_up": True,
                   "shared_adapter": True, "hyperformer": False, "compacter": True, "phm_adapter": True, "lora": True,
                   "prompt": True, "llama_adapter_v2": True}


def test_prefix_choice_per_variant_and_its_overrides():
    assert set(OFFICIAL_PREFIX) == set(VARIANTS)
    assert {v: uses_task_prefix(VariantConfig(variant=v)) for v in VARIANTS} == OFFICIAL_PREFIX
    for v in ("compacter", "phm_adapter", "lora", "prompt"):  # one set per task: single-task inputs
        assert uses_task_prefix(VariantConfig(variant=v, per_task=True)) is False
        assert uses_task_prefix(VariantConfig(variant=v, per_task=False)) is True
    for v in VARIANTS:
        assert uses_task_prefix(VariantConfig(variant=v, task_prefix=True)) is True
        assert uses_task_prefix(VariantConfig(variant=v, task_prefix=False)) is False
    with pytest.raises(ValueError, match=r"VariantConfig\.task_prefix: expected true, false or null"):
        VariantConfig(task_prefix="yes")


@pytest.mark.parametrize("variant, per_task", [*((v, None) for v in VARIANTS), ("lora", True), ("compacter", True)])
def test_encoder_input_has_the_prefix_only_for_shared_variants(base_model, variant, per_task):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, VariantConfig(variant=variant, per_task=per_task))
    expected = OFFICIAL_PREFIX[variant] and not per_task
    assert setup.task_prefix is expected
    batch = make_batch(model, "vqa", [VQA], features, max_text_length=20, max_target_length=8, rng=random.Random(0),
                       task_prefix=setup.task_prefix)
    prefixed, bare = (model.encode_text([t], max_length=20)[0] for t in ("vqa: " + VQA.text, VQA.text))
    assert torch.equal(batch.input_ids, prefixed if expected else bare)
    assert not torch.equal(prefixed, bare)
    # evaluation feeds what training fed
    texts: list = []
    encode = model.encode_text
    model.encode_text = lambda t, **kw: (texts.extend(t), encode(t, **kw))[1]
    setup.activate(model, "vqa")
    model.eval()
    out = VLPredictor(model, setup, "vqa", features, max_new_tokens=2)([VQA])
    assert isinstance(out[0], dict) and texts == [("vqa: " if expected else "") + VQA.text]


def test_recipe_batches_and_checkpoints_keep_the_variants_prefix_choice(vl_data, tmp_path):
    for variant, expected in (("multiple_adapters", False), ("shared_adapter", True), ("full_ft", False)):
        task = _task(vl_data, variant=variant, tasks=("vqa", "caption"))
        assert task.setup.task_prefix is expected
        vqa_items = [i for i, (t, _) in enumerate(task.items) if t == "vqa"][:2]
        cap_items = [i for i, (t, _) in enumerate(task.items) if t == "caption"][:2]
        part = task.get_batch(vqa_items).parts[0]
        want = [("vqa: " if expected else "") + s.text for s in part.samples]
        assert torch.equal(part.input_ids, task.model.encode_text(want, max_length=task.config.max_text_length)[0])
        cap = task.get_batch(cap_items).parts[0]  # captioning: the prefix alone, or an empty text (VL-Adapter's inputs)
        want = ["caption: " if expected else ""] * len(cap.samples)
        assert torch.equal(cap.input_ids, task.model.encode_text(want, max_length=task.config.max_text_length)[0])
        task.save(tmp_path / variant)
        meta = json.loads((tmp_path / variant / "vl_adapter.json").read_text())
        assert meta["task_prefix"] is expected and meta["config"]["task_prefix"] is None
        assert load_trained(VLT5.from_pretrained(vl_data / "vlt5"), tmp_path / variant).task_prefix is expected
    forced = _task(vl_data, variant="multiple_adapters", tasks=("vqa",), task_prefix=True)
    assert forced.setup.task_prefix is True
    # a checkpoint written before the field existed (the prefix table under that name, or nothing) was prefixed
    ckpt = tmp_path / "multiple_adapters" / "vl_adapter.json"
    meta = json.loads(ckpt.read_text())
    for old in ({**meta, "task_prefix": dict(TASK_PREFIX)}, {k: v for k, v in meta.items() if k != "task_prefix"}):
        ckpt.write_text(json.dumps(old))
        assert load_trained(VLT5.from_pretrained(vl_data / "vlt5"), tmp_path / "multiple_adapters").task_prefix is True
    ckpt.write_text(json.dumps({**meta, "task_prefix": "no"}))
    with pytest.raises(ValueError, match=r"vl_adapter\.json: field 'task_prefix' must be true or false"):
        load_trained(VLT5.from_pretrained(vl_data / "vlt5"), tmp_path / "multiple_adapters")


# ---------------------------------------------------------------------------------------------- (c) Hyperformer


def _units(model, task: str) -> dict:
    return {w.module_name: u for w in mma.model.wrappers(model) for u in w.units(task)}


def test_hypernetwork_is_fed_task_layer_and_block_type(base_model):
    model = copy.deepcopy(base_model)
    setup_variant(model, "hyperformer", tasks=("vqa", "gqa"))
    enc, dec = model.mma_shared["hypernet_vl_encoder"], model.mma_shared["hypernet_vl_decoder"]
    assert enc.block_types == ["self_attention", "feed_forward"]
    assert dec.block_types == ["self_attention", "cross_attention", "feed_forward"]
    assert enc.num_layers == dec.num_layers == 2  # one layer embedding per T5 block
    units = _units(model, "vqa")
    attn, ffn = units["t5.encoder.block.0.layer.0.SelfAttention.o"], units["t5.encoder.block.0.layer.1.DenseReluDense.wo"]
    assert (attn.layer, attn.block_type, ffn.layer, ffn.block_type) == (0, 0, 0, 1)
    cross = units["t5.decoder.block.1.layer.1.EncDecAttention.o"]
    assert (cross.layer, cross.block_type) == (1, 1)
    with torch.no_grad():  # the generated Up starts at zero: give every generator weights so all four outputs count
        for p in enc.generators.parameters():
            p.normal_(std=0.1)
    a, f = attn.generated(), ffn.generated()
    assert all(x.shape == y.shape for x, y in zip(a, f, strict=True))
    assert not any(torch.allclose(x, y) for x, y in zip(a, f, strict=True))  # two block types, one layer: two adapters
    with torch.no_grad():  # ... and the block-type embedding is all that tells them apart
        enc.block_type_embedding.weight[1] = enc.block_type_embedding.weight[0]
    assert all(torch.equal(x, y) for x, y in zip(attn.generated(), ffn.generated(), strict=True))
    # the task embedding still matters: the same position for another task gets other weights
    other = _units(model, "gqa")["t5.encoder.block.0.layer.0.SelfAttention.o"]
    assert not torch.allclose(other.generated()[0], attn.generated()[0])


def _hypernet_count(t: int, le: int, h: int, layers: int, types: int, d: int, bn: int) -> int:
    project = (t + le * (2 if types else 1)) * h + h + h * h + h + 2 * h  # Linear, ReLU, Linear, LayerNorm
    generators = (h * bn * d + bn * d) + (h * bn + bn) + (h * d * bn + d * bn) + (h * d + d)  # down_w, down_b, up_w, up_b
    return layers * le + types * le + project + generators


@pytest.mark.parametrize("block_types", [True, False])
def test_hyperformer_parameter_counts(base_model, block_types):
    model = copy.deepcopy(base_model)
    tasks = ("vqa", "gqa", "caption")
    setup = setup_variant(model, "hyperformer", tasks=tasks, hyper_block_types=block_types)
    t, le, h = (int(setup.sizes[k]) for k in ("hyper_task_dim", "hyper_layer_dim", "hyper_hidden"))
    assert (t, le, h) == (round(2 * D / 3), round(2 * D / 3), 8)
    bn = int(D / 8)
    if block_types:  # layer embeddings per T5 block (2), block types 2 (encoder) and 3 (decoder)
        enc, dec = _hypernet_count(t, le, h, 2, 2, D, bn), _hypernet_count(t, le, h, 2, 3, D, bn)
    else:  # the earlier form: one layer embedding per adapted module (2 x 2 encoder, 2 x 3 decoder), no block type
        enc, dec = _hypernet_count(t, le, h, 4, 0, D, bn), _hypernet_count(t, le, h, 6, 0, D, bn)
    shared = model.mma_shared
    assert sum(p.numel() for p in shared["hypernet_vl_encoder"].parameters()) == enc
    assert sum(p.numel() for p in shared["hypernet_vl_decoder"].parameters()) == dec
    report = parameter_report(model, setup)
    assert report.adapters == enc + dec + len(tasks) * t
    assert report.per_task == {task: enc + dec + t for task in tasks}
    if block_types:  # what the block type costs: its embeddings and their columns in the first projection
        assert enc - _hypernet_count(t, le, h, 2, 0, D, bn) == 2 * le + le * h


def test_hyperformer_with_block_types_saves_loads_and_trains(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    setup = setup_variant(model, "hyperformer", tasks=("vqa",), train_extras=False)
    block_type = model.mma_shared["hypernet_vl_encoder"].block_type_embedding.weight
    before = block_type.detach().clone()
    assert block_type.requires_grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch(model, "vqa", [VQA], features, max_text_length=20, max_target_length=8, rng=random.Random(0),
                       task_prefix=setup.task_prefix, vqa_target="best")
    model.train()
    for _ in range(2):
        model(batch.input_ids, batch.attention_mask, batch.visual_feats, labels=batch.labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert not torch.equal(block_type, before)  # the block-type embedding trains with the hypernetwork
    mma.save_adapter(model, "vqa", tmp_path / "vqa")
    saved = json.loads((tmp_path / "vqa" / "adapter_config.json").read_text())
    assert json.dumps(saved).count("block_types") == 1 and "feed_forward" in json.dumps(saved)
    fresh = copy.deepcopy(base_model)
    mma.load_adapter(fresh, tmp_path / "vqa")
    assert fresh.mma_shared["hypernet_vl_decoder"].block_types == ["self_attention", "cross_attention", "feed_forward"]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        a = model(batch.input_ids, batch.attention_mask, batch.visual_feats, labels=batch.labels).logits
        b = fresh(batch.input_ids, batch.attention_mask, batch.visual_feats, labels=batch.labels).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(block_type, fresh.mma_shared["hypernet_vl_encoder"].block_type_embedding.weight)


def test_block_type_config_errors_name_the_field(base_model):
    base = dict(target_modules=["@enc_attn_out", "@enc_ffn_out"], hidden_dim=8, task_embedding_dim=8,
                layer_embedding_dim=8, bottleneck_dim=4)
    with pytest.raises(ValueError, match=r"HyperAdapterConfig\.block_types: expected None or a non-empty dict"):
        mma.HyperAdapterConfig(**base, block_types={})
    with pytest.raises(ValueError, match=r"HyperAdapterConfig\.block_types: block-type name 'a b'"):
        mma.HyperAdapterConfig(**base, block_types={"a b": ["@enc_attn_out"]})
    with pytest.raises(ValueError, match=r"HyperAdapterConfig\.block_types\['ffn'\]: expected target patterns"):
        mma.HyperAdapterConfig(**base, block_types={"ffn": [3]})
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match=r"block_types: adapted module 't5\.encoder\.block\.0\.layer\.1.*has no block type"):
        mma.add_adapter(model, "vqa", mma.HyperAdapterConfig(**base, block_types={"attention": ["@enc_attn_out"]}))
    with pytest.raises(ValueError, match=r"block_types: module 't5\.encoder\.block\.0\.layer\.0.* is of block types"):
        mma.add_adapter(model, "vqa", mma.HyperAdapterConfig(
            **base, block_types={"attention": ["@enc_attn_out"], "any": ["@enc_attn_out", "@enc_ffn_out"]}))
    assert not mma.adapter_names(model)
    config = mma.HyperAdapterConfig(**base, block_types={"attention": "@enc_attn_out", "ffn": ["@enc_ffn_out"]})
    assert config.block_types == {"attention": ["@enc_attn_out"], "ffn": ["@enc_ffn_out"]}
    assert mma.AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"VariantConfig\.hyper_block_types: expected true or false"):
        VariantConfig(variant="hyperformer", hyper_block_types=None)
    assert set(HYPER_BLOCK_TYPES) == {"self_attention", "cross_attention", "feed_forward"}


def test_synth_vqa_labels_are_soft_scores_the_draw_uses(vl_data):
    """The generated VQA rows carry VQA soft scores (several answers for some questions), so (a) has effect."""
    rows = read_vqa(vl_data / "data" / "vqa" / "karpathy_train.json")
    assert any(sum(v > 0 for v in s.label.values()) >= 2 for s in rows)
    assert all(0 <= v <= 1 for s in rows for v in s.label.values())
