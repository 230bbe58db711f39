"""Make the NeMo fixtures of tests/test_nemo.py: tiny random NeMo cache-aware streaming FastConformer transducers,
their ``.nemo`` files and NeMo's own outputs on a few waves.

NeMo is too heavy for this project's environment and CI, so it runs once, here, in a throwaway virtual environment
outside the repository (NeMo 3.0.0 installed next to torch 2.11.0 in about 8 minutes on 2 cores)::

    python3.11 -m venv /work/nemo_venv
    printf 'torch==2.11.0\\ntorchaudio==2.11.0\\ntorchvision==0.26.0\\n' > /work/nemo_constraints.txt
    /work/nemo_venv/bin/pip install -c /work/nemo_constraints.txt torch==2.11.0 "nemo_toolkit[asr]"
    OMP_NUM_THREADS=1 /work/nemo_venv/bin/python scripts/make_nemo_fixtures.py   # -> tests/fixtures/nemo/

``--full-size DIR`` instead writes a random model at the real size of stt_en_fastconformer_hybrid_large_streaming_multi
and NeMo's outputs on it into ``DIR`` (outside the repository: 452 MB); then
``MMADAPTERS_NEMO_FULL_SIZE=DIR .venv/bin/pytest tests/test_nemo.py -k full_size`` compares ours to them.

Two models, each written as ``tests/fixtures/nemo/<name>.nemo`` (NeMo's ``save_to``: a tar of model_config.yaml,
model_weights.ckpt and the tokenizer's files) with ``<name>.safetensors`` (NeMo's outputs) and ``<name>.json`` (the
streaming settings, transcripts and the versions that made them):

- ``rnnt_char``: ``EncDecRNNTModel`` with a character vocabulary (blank last), mel frontend without normalization
  (``normalize: NA``, as NeMo's streaming models), 2 layers of d_model 32, dw_striding x8 causal subsampling,
  rel_pos attention with xscaling, ``chunked_limited`` context [4, 1], causal depthwise convolution with LayerNorm,
  ReLU joint, greedy decoding with at most 3 symbols per frame.
- ``hybrid_bpe``: ``EncDecHybridRNNTCTCBPEModel`` (RNN-T + CTC, like stt_en_fastconformer_hybrid_large_streaming_multi)
  with a SentencePiece BPE tokenizer trained here on a few sentences, per-feature normalized mels padded to 16
  frames, 2 layers of d_model 24 (4 heads), multi-lookahead contexts [[6, 2], [6, 0]], BatchNorm in the convolution
  module (random running statistics). Its outputs are recorded for both contexts.

The parameters are NeMo's random initialization plus noise (so that zero-initialized pieces such as the
relative-position biases and the BatchNorm statistics are exercised), and a joint scaled so that greedy decoding
emits between none and the most tokens a frame allows; the prediction network's blank (padding) embedding stays zero, as in a trained model.

``waves.safetensors`` holds the three test waves (``waves``: the three concatenated, float16; ``wave_lengths``).
Recorded per model (tensors in the safetensors file, batches of the three waves in that order):

- ``features``, ``feature_lengths``: ``model.preprocessor`` in eval mode;
- ``encoded``, ``encoded_lengths``: ``model.encoder`` on those features (the full utterance, the model's default
  context; ``ctx1.*`` for the second context of hybrid_bpe);
- ``stream.<i>.*`` per step of NeMo's cache-aware streaming (``CacheAwareStreamingAudioBuffer`` over the waves
  and ``conformer_stream_step``, as NeMo's speech_to_text_cache_aware_streaming_infer.py runs it): the step's
  input lengths ``chunk_lengths`` (the chunks are cut from ``features``), the encoder's ``encoded``, ``encoded_lengths`` and the next caches
  ``cache_last_channel``, ``cache_last_time``, ``cache_last_channel_len`` (``ctx1.stream.<i>.*`` likewise);
- in the JSON: each step's ``drop_extra_pre_encoded`` and ``keep_all_outputs``, NeMo's streaming settings, the
  greedy token ids and texts offline (``model.transcribe`` and ``decoding.rnnt_decoder_predictions_tensor``) and
  at the end of streaming.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nemo"
CHARS = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]
SENTENCES = ["the quick brown fox jumps over the lazy dog", "streaming speech recognition with caches",
             "a tiny random model says nothing useful", "hello world this is nemo speaking"]


def waves() -> list[torch.Tensor]:
    """Three deterministic test waves (0.8 s, 0.56 s, 0.36 s at 16 kHz): chirps plus noise, rounded to float16 so
    that the fixture stores them exactly."""
    g = torch.Generator().manual_seed(7)
    out = []
    for n, f0 in ((12800, 180.0), (8960, 310.0), (5760, 95.0)):
        t = torch.arange(n) / 16000
        w = 0.3 * torch.sin(2 * torch.pi * (f0 + 400 * t) * t) + 0.05 * torch.randn(n, generator=g)
        out.append(w.half().float())
    return out


def preprocessor(features: int, normalize: str, pad_to: int) -> dict:
    return {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", "sample_rate": 16000,
            "normalize": normalize, "window_size": 0.025, "window_stride": 0.01, "window": "hann",
            "features": features, "n_fft": 512, "frame_splicing": 1, "dither": 0.00001, "pad_to": pad_to}


def encoder(feat_in: int, d_model: int, heads: int, channels: int, context, kernel: int, norm: str, *, layers: int = 2,
            expansion: int = 2, dropout: float = 0.0) -> dict:
    return {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": feat_in, "feat_out": -1,
            "n_layers": layers, "d_model": d_model, "use_bias": True, "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": channels, "causal_downsampling": True, "reduction": None,
            "reduction_position": None, "reduction_factor": 1, "ff_expansion_factor": expansion, "self_attention_model": "rel_pos",
            "n_heads": heads, "att_context_size": context, "att_context_style": "chunked_limited",
            "att_context_probs": None, "xscaling": True, "pos_emb_max_len": 5000, "conv_kernel_size": kernel,
            "conv_norm_type": norm, "conv_context_size": "causal", "dropout": dropout,
            "dropout_pre_encoder": dropout, "dropout_emb": 0.0, "dropout_att": dropout}


def transducer(pred_hidden: int, joint_hidden: int, max_symbols: int, dropout: float = 0.0) -> dict:
    return {
        "decoder": {"_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
                    "random_state_sampling": False, "blank_as_pad": True,
                    "prednet": {"pred_hidden": pred_hidden, "pred_rnn_layers": 1, "t_max": None, "dropout": dropout}},
        "joint": {"_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None, "preserve_memory": False,
                  "fuse_loss_wer": False, "fused_batch_size": 4,
                  "jointnet": {"joint_hidden": joint_hidden, "activation": "relu", "dropout": dropout}},
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": max_symbols}},
        "loss": {"loss_name": "default"},
    }


def rnnt_char_config() -> dict:
    return {"sample_rate": 16000, "labels": CHARS, "log_prediction": False, "compute_eval_loss": False,
            "model_defaults": {"enc_hidden": 32, "pred_hidden": 32, "joint_hidden": 32},
            "preprocessor": preprocessor(80, "NA", 0), "spec_augment": None,
            "encoder": encoder(80, 32, 2, 16, [4, 1], 5, "layer_norm"), **transducer(32, 32, 3)}


def hybrid_bpe_config(tokenizer_dir: str) -> dict:
    return {"sample_rate": 16000, "log_prediction": False, "compute_eval_loss": False,
            "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
            # the BPE model's transcribe reads validation_ds.use_start_end_token
            "validation_ds": {"manifest_filepath": None, "sample_rate": 16000, "batch_size": 3, "shuffle": False,
                              "use_start_end_token": False},
            "model_defaults": {"enc_hidden": 24, "pred_hidden": 20, "joint_hidden": 28},
            "preprocessor": preprocessor(64, "per_feature", 16), "spec_augment": None,
            "encoder": encoder(64, 24, 4, -1, [[6, 2], [6, 0]], 7, "batch_norm"), **transducer(20, 28, 4),
            "aux_ctc": {"ctc_loss_weight": 0.3, "use_cer": False, "ctc_reduction": "mean_batch",
                        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": None,
                                    "num_classes": -1, "vocabulary": []},
                        "decoding": {"strategy": "greedy"}}}


def train_bpe(directory: Path) -> None:
    """A 40-piece SentencePiece BPE model in ``directory`` (tokenizer.model, tokenizer.vocab, vocab.txt: what NeMo's
    tokenizer.dir holds)."""
    import sentencepiece as spm

    text = directory / "text.txt"
    text.write_text("\n".join(SENTENCES * 4) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / "tokenizer"), vocab_size=40,
                                   model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0,
                                   normalization_rule_name="identity", minloglevel=2)
    text.unlink()
    # NeMo's tokenizer folder also holds vocab.txt (one piece a line; an artifact NeMo copies into the .nemo)
    pieces = [line.split("\t")[0] for line in (directory / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()]
    (directory / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")


def randomize(model, seed: int) -> None:
    """Noise on every parameter and BatchNorm statistic; a joint output layer that emits tokens; blank row of the
    prediction network's embedding kept at zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
        embed = model.decoder.prediction["embed"]
        embed.weight[embed.padding_idx].zero_()
        model.joint.enc.weight.mul_(2.0)
        model.joint.pred.weight.mul_(4.0)
        out = model.joint.joint_net[-1]
        out.weight.mul_(2.0)
        out.bias.copy_(0.3 * torch.randn(out.bias.shape, generator=g))
        out.bias[-1] = 4.0  # blank: frames emit 0 to max_symbols tokens


def stream(model, wave_list, drop_first: bool = True) -> tuple[dict, list[dict], list[list[int]]]:
    """NeMo's cache-aware streaming of ``wave_list`` as one batch, recorded step by step."""
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    buffer = CacheAwareStreamingAudioBuffer(model=model, online_normalization=False, pad_and_drop_preencoded=False)
    for w in wave_list:
        buffer.append_audio(w.numpy(), stream_id=-1)
    cfg = model.encoder.streaming_cfg
    cache_channel, cache_time, cache_len = model.encoder.get_initial_cache_state(batch_size=len(wave_list))
    recorded: list = []
    original = model.encoder.cache_aware_stream_step

    def recording(**kwargs):
        out = original(**kwargs)
        recorded.append(out)
        return out

    model.encoder.cache_aware_stream_step = recording
    tensors, steps, hyps, pred_out = {}, [], None, None
    try:
        for i, (chunk, chunk_lengths) in enumerate(buffer):
            drop = 0 if i == 0 else cfg.drop_extra_pre_encoded
            keep = buffer.is_buffer_empty()
            with torch.no_grad():
                (pred_out, _texts, cache_channel, cache_time, cache_len, hyps) = model.conformer_stream_step(
                    processed_signal=chunk, processed_signal_length=chunk_lengths, cache_last_channel=cache_channel,
                    cache_last_time=cache_time, cache_last_channel_len=cache_len, keep_all_outputs=keep,
                    previous_hypotheses=hyps, previous_pred_out=pred_out, drop_extra_pre_encoded=drop,
                    return_transcription=True)
            encoded, encoded_len, *_ = recorded[-1]
            for key, value in (("chunk_lengths", chunk_lengths), ("encoded", encoded),
                               ("encoded_lengths", encoded_len), ("cache_last_channel", cache_channel),
                               ("cache_last_time", cache_time), ("cache_last_channel_len", cache_len)):
                tensors[f"stream.{i}.{key}"] = value
            steps.append({"drop_extra_pre_encoded": drop, "keep_all_outputs": keep})
    finally:
        model.encoder.cache_aware_stream_step = original
    settings = {k: getattr(cfg, k) for k in ("chunk_size", "shift_size", "cache_drop_size", "last_channel_cache_size",
                                            "valid_out_len", "pre_encode_cache_size", "drop_extra_pre_encoded")}
    tokens = [[int(t) for t in h.y_sequence] for h in hyps]
    return tensors, [{"settings": settings, "steps": steps}], tokens


def record(model, name: str, wave_list: list[torch.Tensor], contexts: list | None) -> None:
    from safetensors.torch import save_file

    model.eval()
    batch = torch.zeros(len(wave_list), max(len(w) for w in wave_list))
    for i, w in enumerate(wave_list):
        batch[i, : len(w)] = w
    lengths = torch.tensor([len(w) for w in wave_list])
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {"nemo_version": __import__("nemo").__version__, "torch_version": torch.__version__,
                  "class": type(model).__name__, "blank": int(model.decoder.blank_idx)}
    with torch.no_grad():
        feats, feat_len = model.preprocessor(input_signal=batch, length=lengths)
        tensors.update(features=feats, feature_lengths=feat_len)
        # greedy offline: NeMo's transcribe on the waves as float WAV files (exact samples; NeMo 3.0.0's transcribe
        # of in-memory arrays decodes the shorter ones as if they were longer), and its decoding of the batched
        # encoder output below
        import soundfile

        with tempfile.TemporaryDirectory() as tmp:
            paths = [f"{tmp}/{i}.wav" for i in range(len(wave_list))]
            for p, w in zip(paths, wave_list, strict=True):
                soundfile.write(p, w.numpy(), 16000, subtype="FLOAT")
            hyps_t = model.transcribe(paths, batch_size=len(wave_list), return_hypotheses=True, verbose=False)
        hyps_t = hyps_t[0] if isinstance(hyps_t, tuple) else hyps_t
        model.eval()  # NeMo 3.0.0's transcribe leaves the encoder in training mode (random context, batch statistics)
        info["transcribe"] = {"tokens": [[int(t) for t in h.y_sequence] for h in hyps_t], "texts": [h.text for h in hyps_t]}
    for c, ctx in enumerate(contexts or [None]):
        prefix = "" if c == 0 else f"ctx{c}."
        if ctx is not None:
            model.encoder.set_default_att_context_size(ctx)
        with torch.no_grad():
            enc, enc_len = model.encoder(audio_signal=feats, length=feat_len)
            hyps = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=enc_len,
                                                                  return_hypotheses=True)
        tensors[f"{prefix}encoded"], tensors[f"{prefix}encoded_lengths"] = enc, enc_len
        st, st_info, st_tokens = stream(model, wave_list)
        tensors.update({prefix + k: v for k, v in st.items()})
        info[f"{prefix}context"] = list(model.encoder.att_context_size)
        info[f"{prefix}greedy"] = {"tokens": [[int(t) for t in h.y_sequence] for h in hyps], "texts": [h.text for h in hyps]}
        info[f"{prefix}stream"] = {**st_info[0], "tokens": st_tokens,
                                   "texts": [model.tokenizer.ids_to_text(t) if hasattr(model, "tokenizer")
                                             else "".join(CHARS[i] for i in t) for t in st_tokens]}
    if contexts:
        model.encoder.set_default_att_context_size(contexts[0])
    save_file({k: v.detach().contiguous().float() if v.is_floating_point() and v.dtype != torch.float16
               else v.detach().contiguous() for k, v in tensors.items()}, str(OUT / f"{name}.safetensors"))
    (OUT / f"{name}.json").write_text(json.dumps(info) + "\n", encoding="utf-8")


def full_size_config(tokenizer_dir: str) -> dict:
    """hybrid_bpe at the size of stt_en_fastconformer_hybrid_large_streaming_multi (NeMo's
    fastconformer_hybrid_transducer_ctc_bpe_streaming.yaml: 17 layers of d_model 512, 8 heads, 256 subsampling
    channels, kernel 9 with LayerNorm, contexts [[70, 13], [70, 6], [70, 1], [70, 0]], unnormalized 80-bin mels,
    640-wide prediction and joint networks, its dropouts) with this script's 40-piece tokenizer."""
    config = hybrid_bpe_config(tokenizer_dir)
    config.update(model_defaults={"enc_hidden": 512, "pred_hidden": 640, "joint_hidden": 640},
                  preprocessor=preprocessor(80, "NA", 0),
                  encoder=encoder(80, 512, 8, 256, [[70, 13], [70, 6], [70, 1], [70, 0]], 9, "layer_norm", layers=17,
                                  expansion=4, dropout=0.1),
                  **transducer(640, 640, 10, dropout=0.2))
    return config


def full_size(out: Path, wave_list: list[torch.Tensor]) -> None:
    """``out/full_size.nemo`` (113 M parameters, 452 MB: not a fixture) and NeMo's offline and streaming encoder outputs
    on the first two waves for contexts [70, 13] and [70, 0] (``out/full_size.safetensors``: ``enc<r>``, ``len<r>``,
    ``s<r>.stream.<i>.encoded[_lengths]``). tests/test_nemo.py compares ours to them when MMADAPTERS_NEMO_FULL_SIZE=out."""
    from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_bpe(Path(tmp))
        torch.manual_seed(0)
        model = EncDecHybridRNNTCTCBPEModel(cfg=OmegaConf.create(full_size_config(tmp)))
        randomize(model, 3)
        model.save_to(str(out / "full_size.nemo"))
    model.eval()
    batch = torch.zeros(2, len(wave_list[0]))
    for i, w in enumerate(wave_list[:2]):
        batch[i, : len(w)] = w
    lengths = torch.tensor([len(w) for w in wave_list[:2]])
    tensors = {}
    with torch.no_grad():
        feats, feat_len = model.preprocessor(input_signal=batch, length=lengths)
        for ctx in ([70, 13], [70, 0]):
            model.encoder.set_default_att_context_size(ctx)
            tensors[f"enc{ctx[1]}"], tensors[f"len{ctx[1]}"] = model.encoder(audio_signal=feats, length=feat_len)
            steps, _, _ = stream(model, wave_list[:2])
            tensors.update({f"s{ctx[1]}.{k}": v for k, v in steps.items() if k.rsplit(".", 1)[1].startswith("encoded")})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "full_size.safetensors"))
    print(f"{out}/full_size.nemo: {sum(p.numel() for p in model.parameters())} parameters")


def main() -> int:
    from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel, EncDecRNNTModel
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    wave_list = waves()
    if len(sys.argv) == 3 and sys.argv[1] == "--full-size":
        full_size(Path(sys.argv[2]), wave_list)
        return 0
    from safetensors.torch import save_file

    save_file({"waves": torch.cat(wave_list).half(), "wave_lengths": torch.tensor([len(w) for w in wave_list])},
              str(OUT / "waves.safetensors"))

    torch.manual_seed(0)
    model = EncDecRNNTModel(cfg=OmegaConf.create(rnnt_char_config()))
    randomize(model, 1)
    model.save_to(str(OUT / "rnnt_char.nemo"))
    record(model, "rnnt_char", wave_list, None)

    with tempfile.TemporaryDirectory() as tmp:
        train_bpe(Path(tmp))
        torch.manual_seed(0)
        model = EncDecHybridRNNTCTCBPEModel(cfg=OmegaConf.create(hybrid_bpe_config(tmp)))
        randomize(model, 11)  # a seed whose greedy transcripts vary (others emit one token or none)
        model.save_to(str(OUT / "hybrid_bpe.nemo"))
    record(model, "hybrid_bpe", wave_list, [[6, 2], [6, 0]])
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(OUT.parent.parent.parent)}\t{f.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    np.set_printoptions(precision=4)
    sys.exit(main())
