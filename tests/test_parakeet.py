"""transformers' Parakeet RNN-T / TDT folders as an ASR backbone (issue 21 item 3), proven against transformers itself:
tiny random ``ParakeetForRNNT`` / ``ParakeetForTDT`` folders written with save_pretrained; our encoder output, loss and
greedy transcripts equal transformers' own; adapter points, routing and ``mmadapters train lda`` work on them."""

from __future__ import annotations

import shutil

import pytest
import torch
from asr_adapter_checks import check_language_adapters

from mmadapters.eval.cli import main
from mmadapters.speech import load_asr
from mmadapters.speech.decode import beam_search, greedy_decode, transcribe
from mmadapters.speech.parakeet import ParakeetTransducer

CHARS = "abcdefghijklmnopqrstuvwxyz'"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import ParakeetTokenizer

    vocab = [("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in CHARS] + [("▁" + c, -2.5) for c in "aeiost"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return ParakeetTokenizer(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>"), len(vocab)


def write_parakeet(directory, kind: str):
    """A tiny random Parakeet folder as transformers writes one; the joint is scaled so that tokens vary by frame."""
    from transformers import ParakeetFeatureExtractor, ParakeetForRNNT, ParakeetForTDT, ParakeetRNNTConfig, ParakeetTDTConfig

    tokenizer, n = _tokenizer()
    v = n + 1  # + blank, the last id
    encoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   subsampling_conv_channels=16, conv_kernel_size=5, dropout=0.0, attention_dropout=0.0,
                   activation_dropout=0.0, layerdrop=0.0)
    config_cls, model_cls = (ParakeetTDTConfig, ParakeetForTDT) if kind == "tdt" else (ParakeetRNNTConfig, ParakeetForRNNT)
    config = config_cls(vocab_size=v, blank_token_id=v - 1, pad_token_id=0, decoder_hidden_size=24, num_decoder_layers=1,
                        encoder_config=encoder, max_symbols_per_step=3)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.encoder_projector.weight.mul_(20.0)
        model.joint.head.weight.mul_(8.0)
        model.joint.head.bias[:v].normal_(0, 2.0)
        model.joint.head.bias[v - 1] = 2.0
        if kind == "tdt":
            model.joint.head.bias[v + 1] += 3.0  # mostly duration 1
    model.save_pretrained(directory)
    ParakeetFeatureExtractor().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["rnnt", "tdt"])
def folder(request, tmp_path_factory):
    torch.set_num_threads(1)
    return write_parakeet(tmp_path_factory.mktemp(f"parakeet_{request.param}"), request.param)


@pytest.fixture(scope="module")
def waves():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16000, generator=g) * 0.1, torch.randn(11000, generator=g) * 0.1, torch.randn(7000, generator=g) * 0.1]


def _pad(waves):
    x = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
    return x, torch.tensor([len(w) for w in waves])


def _theirs(bundle, folder, wave) -> list[int]:
    """transformers' generate on one utterance (its batched generate decodes padding frames), blank dropped."""
    from transformers import AutoFeatureExtractor

    hf, blank = bundle.model.hf, bundle.model.blank
    inputs = AutoFeatureExtractor.from_pretrained(folder)([wave.numpy()], sampling_rate=16000, return_tensors="pt",
                                                          return_attention_mask=True)
    durations = bundle.model.durations or []  # TDT: duration ids are not tokens (else generate emits them and fails)
    out = hf.generate(**inputs, decoder_start_token_id=blank, max_new_tokens=500,
                      suppress_tokens=list(range(hf.config.vocab_size, hf.config.vocab_size + len(durations))) or None)
    return [t for t in out.sequences[0].tolist()[1:] if t != blank and t != hf.config.pad_token_id]


def test_load_asr_takes_the_folder_and_encodes_as_transformers(folder, waves):
    bundle = load_asr(folder)
    assert isinstance(bundle.model, ParakeetTransducer) and not bundle.model.training
    x, lengths = _pad(waves)
    enc, enc_lengths = bundle.model.encode(x, lengths)
    from transformers import AutoFeatureExtractor

    for i, w in enumerate(waves):
        inputs = AutoFeatureExtractor.from_pretrained(folder)([w.numpy()], sampling_rate=16000, return_tensors="pt",
                                                              return_attention_mask=True)
        with torch.no_grad():
            ref = bundle.model.hf.get_audio_features(**inputs).pooler_output[0]
        n = int(enc_lengths[i])
        assert n == ref.shape[0]
        assert torch.allclose(enc[i, :n], ref, atol=1e-4)


def test_greedy_transcripts_equal_transformers_generate(folder, waves):
    bundle = load_asr(folder)
    x, lengths = _pad(waves)
    with torch.no_grad():
        ours = greedy_decode(bundle.model, *bundle.model.encode(x, lengths))
    theirs = [_theirs(bundle, folder, w) for w in waves]
    assert ours == theirs and any(ours)
    texts = transcribe(bundle, waves)
    assert texts == [bundle.tokenizer.decode(t) for t in theirs]
    assert texts == [bundle.tokenizer.hf.decode(t, skip_special_tokens=True, group_tokens=False).strip() for t in theirs]


def test_transcribe_cli_prints_path_and_text(folder, waves, tmp_path, capsys):
    import soundfile as sf

    path = tmp_path / "one.wav"
    sf.write(path, waves[1].numpy(), 16000)
    assert main(["asr", "transcribe", "--model", str(folder), str(path)]) == 0
    bundle = load_asr(folder)
    assert capsys.readouterr().out.strip() == f"{path}\t{bundle.tokenizer.decode(_theirs(bundle, folder, waves[1]))}".strip()


def test_loss_is_transformers_own(folder, waves):
    bundle = load_asr(folder)
    model = bundle.model
    targets = torch.tensor([[5, 6, 7], [8, 9, 0]])
    lengths = torch.tensor([3, 2])
    x, wave_lengths = _pad(waves[:2])
    ours = model(x, wave_lengths, targets, lengths)["loss"]
    feats, mask = model.features(x, wave_lengths)
    labels = torch.where(torch.arange(3)[None] < lengths[:, None], targets, model.blank)
    if model.durations is None:  # transformers' forward counts labels that are not blank
        start = torch.full((2, 1), model.blank)
        theirs = model.hf(input_features=feats, attention_mask=mask, decoder_input_ids=torch.cat([start, labels], 1),
                          labels=labels).loss
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.isfinite(ours) and ours > 0


def test_adapter_points_route_per_sample_and_train_alone(folder, waves):
    x, lengths = _pad(waves[:2])
    check_language_adapters(load_asr(folder).model, x, lengths, ["block_out", "predictor_out"])


def test_tdt_has_no_beam_search_and_nemo_files_are_named(folder, tmp_path, waves):
    bundle = load_asr(folder)
    x, lengths = _pad(waves[:1])
    enc, enc_lengths = bundle.model.encode(x, lengths)
    if bundle.model.durations:
        with pytest.raises(ValueError, match="TDT"):
            beam_search(bundle.model, enc, enc_lengths)
    else:
        assert len(beam_search(bundle.model, enc, enc_lengths, 2)) == 1
    nemo = tmp_path / "model.nemo"
    nemo.write_bytes(b"not a tar")
    with pytest.raises(ValueError, match=r"model\.nemo: not a \.nemo file"):
        load_asr(nemo)


@pytest.mark.skipif(shutil.which("espeak-ng") is None and shutil.which("espeak") is None, reason="espeak-ng is not installed")
def test_train_lda_names_the_folder(folder, tmp_path):
    import json

    from mmadapters.speech import synth

    data = tmp_path / "speech"
    synth.generate(data, ["nl", "pt"], utterances=4, tail_utterances=4, eval_utterances=2, unlabeled=0,
                   tail_languages=["nl", "pt"], speakers=2, heldout_speakers=1, workers=1, progress=False)
    config = tmp_path / "lda.yaml"
    config.write_text(f"""
output: {tmp_path / 'run'}
trainer: {{steps: 2, batch_size: 4, lr: 1.0e-2, eval_every: 2, checkpoint_every: 2, progress: false}}
recipe:
  model: {folder}
  train_manifest: {data / 'train.jsonl'}
  dev_manifest: {data / 'dev.jsonl'}
  languages: [nl, pt]
  adapter_dim: 4
""", encoding="utf-8")
    assert main(["train", "lda", "--config", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and any(k.startswith("wer") or "wer" in k for k in summary["final_metrics"])
    out = tmp_path / "eval.json"
    assert main(["eval", "asr", "--manifest", str(data / "dev.jsonl"), "--model", str(folder), "--output", str(out),
                 "--no-progress"]) == 0
    counts = json.loads(out.read_text())["counts"]
    assert counts["total"] == 4 and counts["skipped"] == 0
