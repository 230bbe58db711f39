"""NeMo cache-aware streaming FastConformer transducers (``.nemo``) load into our stack (issue 21 items 4 and 5), proven
against NeMo itself without NeMo installed: scripts/make_nemo_fixtures.py ran NeMo 3.0.0 once on tiny random models
and stored their ``.nemo`` files with NeMo's own features, encoder outputs, cache-aware streaming steps and greedy
transcripts under tests/fixtures/nemo/. Ours equal them within 1e-4 (in practice about 1e-6)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from asr_adapter_checks import check_language_adapters
from safetensors.torch import load_file

import mmadapters as mma
from mmadapters.eval.cli import main
from mmadapters.speech import load_asr
from mmadapters.speech.decode import GreedyDecoder, StreamingTranscriber, greedy_decode, transcribe
from mmadapters.speech.fastconformer import feature_chunks
from mmadapters.speech.nemo import NemoBundle, NemoTransducer

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
MODELS = ["rnnt_char", "hybrid_bpe"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def waves() -> list[torch.Tensor]:
    stored = load_file(FIXTURES / "waves.safetensors")
    return list(torch.split(stored["waves"].float(), stored["wave_lengths"].tolist()))


def _pad(waves):
    x = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
    return x, torch.tensor([len(w) for w in waves])


@pytest.fixture(scope="module", params=MODELS)
def nemo(request):
    torch.set_num_threads(1)
    name = request.param
    return (name, load_asr(FIXTURES / f"{name}.nemo"), load_file(FIXTURES / f"{name}.safetensors"),
            json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8")))


def _contexts(info) -> list[tuple[str, list[int]]]:
    """(fixture key prefix, attention context) for each context NeMo's outputs were recorded with."""
    return [("", info["context"])] + ([("ctx1.", info["ctx1.context"])] if "ctx1.context" in info else [])


def _close(ours: torch.Tensor, theirs: torch.Tensor, lengths) -> float:
    """Largest difference over each sample's valid frames (dim 1)."""
    assert ours.shape == theirs.shape
    return max((float((ours[i, :n] - theirs[i, :n]).abs().max()) if n else 0.0) for i, n in enumerate(lengths.tolist()))


def test_load_asr_reads_the_nemo_file_into_an_eval_mode_bundle(nemo):
    name, bundle, _, info = nemo
    assert isinstance(bundle, NemoBundle) and isinstance(bundle.model, NemoTransducer) and not bundle.model.training
    assert bundle.path == FIXTURES / f"{name}.nemo" and bundle.config["target"].endswith(info["class"])
    assert bundle.model.blank == info["blank"] == bundle.model.vocab_size - 1 == bundle.tokenizer.blank
    assert bundle.model.settings.hybrid == (name == "hybrid_bpe")  # its CTC branch is not loaded
    assert not any("ctc" in n for n, _ in bundle.model.named_parameters())


def test_features_equal_nemo_preprocessor(nemo, waves):
    _, bundle, theirs, _ = nemo
    x, lengths = _pad(waves)
    feats, feat_lengths = bundle.model.features(x, lengths)
    assert feat_lengths.tolist() == theirs["feature_lengths"].tolist()
    assert feats.transpose(1, 2).shape == theirs["features"].shape  # pad_to included
    assert float((feats.transpose(1, 2) - theirs["features"]).abs().max()) < ATOL


def test_encoder_output_equals_nemo_for_each_context(nemo, waves):
    _, bundle, theirs, info = nemo
    model = bundle.model
    x, lengths = _pad(waves)
    try:
        for prefix, context in _contexts(info):
            model.set_att_context_size(context)
            with torch.no_grad():
                enc, enc_lengths = model.encode(x, lengths)
            assert enc_lengths.tolist() == theirs[prefix + "encoded_lengths"].tolist()
            assert _close(enc, theirs[prefix + "encoded"].transpose(1, 2), enc_lengths) < ATOL
    finally:
        model.set_att_context_size(info["context"])


def test_stream_steps_equal_nemo_cache_aware_stream_step(nemo, waves):
    _, bundle, theirs, info = nemo
    model = bundle.model
    x, lengths = _pad(waves)
    try:
        for prefix, context in _contexts(info):
            model.set_att_context_size(context)
            recorded = info[prefix + "stream"]
            cfg = model.encoder.streaming_settings()
            assert cfg.to_dict() == recorded["settings"]
            with torch.no_grad():
                feats, _ = model.features(x, lengths)
                counts = model.frontend.stream_lengths(lengths)  # NeMo's buffer: no pad_to, the STFT's last frame counts
                pieces = list(feature_chunks(feats[:, : int(counts.max())], counts, cfg))
                steps = model.stream_waves(x, lengths)
            assert [{"drop_extra_pre_encoded": p.drop_extra_pre_encoded, "keep_all_outputs": p.keep_all_outputs}
                    for p in pieces] == recorded["steps"]
            assert len(steps) == len(recorded["steps"]) > 2
            for i, (piece, (enc, enc_lengths, state)) in enumerate(zip(pieces, steps, strict=True)):
                key = f"{prefix}stream.{i}."
                assert piece.lengths.tolist() == theirs[key + "chunk_lengths"].tolist()
                assert enc_lengths.tolist() == theirs[key + "encoded_lengths"].tolist()
                assert _close(enc, theirs[key + "encoded"].transpose(1, 2), enc_lengths) < ATOL
                assert float((state.cache_last_channel - theirs[key + "cache_last_channel"]).abs().max()) < ATOL
                assert float((state.cache_last_time - theirs[key + "cache_last_time"]).abs().max()) < ATOL
                assert state.cache_last_channel_len.tolist() == theirs[key + "cache_last_channel_len"].tolist()
            # greedy decoding carried from chunk to chunk, as conformer_stream_step's previous_hypotheses
            decoder = GreedyDecoder(model, len(waves), max_symbols_per_frame=model.max_symbols_per_step)
            for enc, enc_lengths, _ in steps:
                decoder.advance(enc, enc_lengths)
            assert decoder.hypotheses() == recorded["tokens"]
            assert [bundle.tokenizer.decode(t) for t in recorded["tokens"]] == recorded["texts"]
    finally:
        model.set_att_context_size(info["context"])


def test_greedy_transcripts_equal_nemo(nemo, waves):
    _, bundle, _, info = nemo
    model = bundle.model
    assert any(info["transcribe"]["tokens"]) and all(len(set(t)) > 2 for t in info["transcribe"]["tokens"])
    # NeMo's transcribe of the wave files and our offline transcription
    assert transcribe(bundle, waves) == info["transcribe"]["texts"]
    x, lengths = _pad(waves)
    try:
        for prefix, context in _contexts(info):
            model.set_att_context_size(context)
            with torch.no_grad():
                tokens = greedy_decode(model, *model.encode(x, lengths))
            assert tokens == info[prefix + "greedy"]["tokens"]
            assert [bundle.tokenizer.decode(t) for t in tokens] == info[prefix + "greedy"]["texts"]
    finally:
        model.set_att_context_size(info["context"])


def test_wave_streams_equal_nemo_streaming_and_transcribe_as_it(waves):
    """Each wave alone, pushed in pieces of any size, gives the frames of its row of NeMo's batched streaming."""
    bundle = load_asr(FIXTURES / "rnnt_char.nemo")
    model, theirs = bundle.model, load_file(FIXTURES / "rnnt_char.safetensors")
    info = json.loads((FIXTURES / "rnnt_char.json").read_text(encoding="utf-8"))
    steps = len(info["stream"]["steps"])
    for row, wave in enumerate(waves):
        ref = torch.cat([theirs[f"stream.{i}.encoded"][row, :, : int(theirs[f"stream.{i}.encoded_lengths"][row])].T
                         for i in range(steps)])
        for piece in (700, 1600, 5000):
            stream = model.stream(1)
            with torch.no_grad():
                frames = [stream.push(wave[i : i + piece]) for i in range(0, len(wave), piece)] + [stream.flush()]
            got = torch.cat(frames, dim=1)[0]
            assert got.shape == ref.shape and float((got - ref).abs().max()) < ATOL
        st = StreamingTranscriber(bundle, 1)  # the model's own symbols-per-frame limit by default
        assert st.max_symbols_per_frame == model.max_symbols_per_step == 3
        for i in range(0, len(wave), 1600):
            st.push(wave[i : i + 1600])
        assert st.finish() == [info["stream"]["texts"][row]] and st.first_pass_texts == [info["stream"]["texts"][row]]
    hybrid = load_asr(FIXTURES / "hybrid_bpe.nemo").model
    with pytest.raises(ValueError, match="normalizes each utterance"):
        hybrid.stream(1)


def test_transcribe_cli_prints_path_and_nemo_text(waves, tmp_path, capsys):
    import soundfile as sf

    info = json.loads((FIXTURES / "rnnt_char.json").read_text(encoding="utf-8"))
    path = tmp_path / "one.wav"
    sf.write(path, waves[1].numpy(), 16000, subtype="FLOAT")
    assert main(["asr", "transcribe", "--model", str(FIXTURES / "rnnt_char.nemo"), str(path)]) == 0
    assert capsys.readouterr().out == f"{path}\t{info['transcribe']['texts'][1]}\n"


def test_eval_asr_takes_the_nemo_file(waves, tmp_path):
    import soundfile as sf

    info = json.loads((FIXTURES / "hybrid_bpe.json").read_text(encoding="utf-8"))
    lines = []
    for i, (wave, text) in enumerate(zip(waves, info["transcribe"]["texts"], strict=True)):
        sf.write(tmp_path / f"u{i}.wav", wave.numpy(), 16000, subtype="FLOAT")
        lines.append(json.dumps({"audio_filepath": f"u{i}.wav", "text": text, "lang": "en"}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    assert main(["eval", "asr", "--manifest", str(tmp_path / "test.jsonl"), "--model", str(FIXTURES / "hybrid_bpe.nemo"),
                 "--output", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert results["counts"]["total"] == 3 and results["counts"]["skipped"] == 0
    assert results["metrics"]["wer"] == 0.0  # the references are NeMo's own transcripts
    assert results["settings"]["model"]["path"] == str((FIXTURES / "hybrid_bpe.nemo").resolve())


def test_adapter_points_route_per_sample_and_train_alone(waves):
    model = load_asr(FIXTURES / "hybrid_bpe.nemo").model
    x, lengths = _pad(waves[:2])
    check_language_adapters(model, x, lengths, ["block_out", "attn_out", "predictor_out"])
    with torch.no_grad():  # the streaming pass runs through the adapters too ("pt" is active)
        model.eval()
        step = model.stream_waves(x[:1], lengths[:1])[0][0]
        mma.set_active(model, None)
        assert not torch.allclose(step, model.stream_waves(x[:1], lengths[:1])[0][0], atol=1e-3)


# -- bad files ------------------------------------------------------------------------------------------------------
def _members(name: str = "rnnt_char") -> dict[str, bytes]:
    with tarfile.open(FIXTURES / f"{name}.nemo") as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar if m.isfile()}


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _with_config(tmp_path: Path, change) -> Path:
    members = _members()
    config = yaml.safe_load(members["model_config.yaml"])
    change(config)
    members["model_config.yaml"] = yaml.safe_dump(config).encode()
    return _write_tar(tmp_path / "changed.nemo", members)


def test_bad_nemo_files_raise_errors_naming_the_file_and_the_field(tmp_path):
    not_tar = tmp_path / "model.nemo"
    not_tar.write_bytes(b"not a tar")
    with pytest.raises(ValueError, match=r"model\.nemo: not a \.nemo file"):
        load_asr(not_tar)
    with pytest.raises(FileNotFoundError, match=r"missing\.nemo"):
        load_asr(tmp_path / "missing.nemo")
    members = _members()
    for gone in ("model_config.yaml", "model_weights.ckpt"):
        path = _write_tar(tmp_path / f"no_{gone}.nemo", {k: v for k, v in members.items() if k != gone})
        with pytest.raises(ValueError, match=rf"no_{gone}\.nemo: the \.nemo tar has no {gone}"):
            load_asr(path)
    unsafe = _write_tar(tmp_path / "unsafe.nemo", {**members, "../escape.txt": b"x"})
    with pytest.raises(ValueError, match="unsafe member name '../escape.txt'"):
        load_asr(unsafe)

    # the weights are read with weights_only=True: a pickled object is refused, never run
    buffer = io.BytesIO()
    torch.save({"encoder.x": torch.zeros(1), "note": tarfile.TarInfo("x")}, buffer)
    pickled = _write_tar(tmp_path / "pickled.nemo", {**members, "model_weights.ckpt": buffer.getvalue()})
    with pytest.raises(ValueError, match=r"model_weights\.ckpt does not load with torch\.load\(weights_only=True\)"):
        load_asr(pickled)
    state = torch.load(io.BytesIO(members["model_weights.ckpt"]), weights_only=True)
    for key in ("joint.enc.weight", "encoder.layers.1.self_attn.pos_bias_u"):
        buffer = io.BytesIO()
        torch.save({k: v for k, v in state.items() if k != key}, buffer)
        short = _write_tar(tmp_path / "short.nemo", {**members, "model_weights.ckpt": buffer.getvalue()})
        with pytest.raises(ValueError, match=r"short\.nemo: model_weights\.ckpt: tensors do not match"):
            load_asr(short)

    unsupported = [
        (lambda c: c["decoder"].update(_target_="nemo.collections.asr.modules.ConvASRDecoder"), "decoder._target_"),
        (lambda c: c["encoder"].update(att_context_style="regular"), "encoder.att_context_style"),
        (lambda c: c["encoder"].update(subsampling="striding"), "encoder.subsampling"),
        (lambda c: c["encoder"].update(causal_downsampling=False), "encoder.causal_downsampling"),
        (lambda c: c["encoder"].update(self_attention_model="abs_pos"), "encoder.self_attention_model"),
        (lambda c: c["encoder"].update(att_context_size=[5, 1]), "encoder.att_context_size"),
        (lambda c: c["loss"].update(loss_name="tdt"), "loss.loss_name"),
        (lambda c: c["preprocessor"].update(sample_rate=8000), "preprocessor.sample_rate"),
        (lambda c: c["joint"]["jointnet"].update(activation="gelu"), "joint.jointnet.activation"),
        (lambda c: c.pop("labels") and c["joint"].pop("vocabulary"), "labels"),
    ]
    for change, field in unsupported:
        with pytest.raises(ValueError, match=rf"changed\.nemo: model_config\.yaml: field '{field}'"):
            load_asr(_with_config(tmp_path, change))


@pytest.mark.skipif(shutil.which("espeak-ng") is None and shutil.which("espeak") is None, reason="espeak-ng is not installed")
def test_train_lda_names_the_nemo_file(tmp_path):
    from mmadapters.speech import synth

    data = tmp_path / "speech"
    synth.generate(data, ["nl", "pt"], utterances=4, tail_utterances=4, eval_utterances=2, unlabeled=0,
                   tail_languages=["nl", "pt"], speakers=2, heldout_speakers=1, workers=1, progress=False)
    config = tmp_path / "lda.yaml"
    config.write_text(f"""
output: {tmp_path / 'run'}
trainer: {{steps: 2, batch_size: 4, lr: 1.0e-2, eval_every: 2, checkpoint_every: 2, progress: false}}
recipe:
  model: {FIXTURES / 'rnnt_char.nemo'}
  train_manifest: {data / 'train.jsonl'}
  dev_manifest: {data / 'dev.jsonl'}
  languages: [nl, pt]
  adapter_dim: 4
""", encoding="utf-8")
    assert main(["train", "lda", "--config", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and any("wer" in k for k in summary["final_metrics"])


@pytest.mark.skipif(not os.environ.get("MMADAPTERS_NEMO_FULL_SIZE"), reason="set MMADAPTERS_NEMO_FULL_SIZE=DIR written by "
                    "scripts/make_nemo_fixtures.py --full-size DIR (452 MB)")
def test_full_size_nemo_file_matches_nemo(waves):
    """The real model's size and settings (17 layers of d_model 512, contexts [[70, 13], ..., [70, 0]], dropouts)."""
    out = Path(os.environ["MMADAPTERS_NEMO_FULL_SIZE"])
    model = load_asr(out / "full_size.nemo").model
    theirs = load_file(out / "full_size.safetensors")
    x, lengths = _pad(waves[:2])
    with torch.no_grad():
        for ctx in ([70, 13], [70, 0]):
            model.set_att_context_size(ctx)
            enc, enc_lengths = model.encode(x, lengths)
            assert enc_lengths.tolist() == theirs[f"len{ctx[1]}"].tolist()
            assert _close(enc, theirs[f"enc{ctx[1]}"].transpose(1, 2), enc_lengths) < ATOL
            steps = model.stream_waves(x, lengths)
            assert len(steps) == len([k for k in theirs if k.startswith(f"s{ctx[1]}.") and k.endswith(".encoded")])
            for i, (step, step_lengths, _) in enumerate(steps):
                assert step_lengths.tolist() == theirs[f"s{ctx[1]}.stream.{i}.encoded_lengths"].tolist()
                assert _close(step, theirs[f"s{ctx[1]}.stream.{i}.encoded"].transpose(1, 2), step_lengths) < ATOL


def test_fields_left_out_take_nemo_defaults(tmp_path, waves):
    """A config without conv_norm_type, decoding or xscaling gets NeMo's defaults (batch_norm, 10 symbols, true)."""
    members = _members("hybrid_bpe")
    config = yaml.safe_load(members["model_config.yaml"])
    assert config["encoder"].pop("conv_norm_type") == "batch_norm" and config["encoder"].pop("xscaling") is True
    config.pop("decoding")
    members["model_config.yaml"] = yaml.safe_dump(config).encode()
    model = load_asr(_write_tar(tmp_path / "defaults.nemo", members)).model
    theirs = load_file(FIXTURES / "hybrid_bpe.safetensors")
    assert model.max_symbols_per_step == 10
    x, lengths = _pad(waves)
    with torch.no_grad():
        enc, enc_lengths = model.encode(x, lengths)
    assert _close(enc, theirs["encoded"].transpose(1, 2), enc_lengths) < ATOL
