"""mmadapters.speech — streaming multilingual ASR with language-dependent adapters.

- :mod:`.features`, :mod:`.tokenizer`, :mod:`.conformer`, :mod:`.model` — the cascaded Conformer transducer:
  log-mel + global CMVN + SpecAugment, a causal chunked first pass feeding torchaudio's non-causal
  Conformer as second pass, one LSTM predictor + joiner, ``rnnt_loss`` on both passes; adapter points;
  ``load_asr()`` (the shipped tiny model) and ``save_asr``; ``mmadapters.speech.load_asr`` is the same function.
- :mod:`.parakeet` — transformers' Parakeet RNN-T / TDT folders (FastConformer transducers) as a backbone:
  ``load_asr(DIR)`` loads them with adapter points; greedy decoding equals transformers' ``generate``.
- :mod:`.nemo` — NeMo cache-aware streaming FastConformer RNN-T ``.nemo`` files (hybrid RNN-T + CTC: the RNN-T branch):
  ``load_asr("model.nemo")`` rebuilds them with adapter points; features, encoder, ``cache_aware_stream_step`` and
  greedy transcripts equal NeMo's. :mod:`.nemo_archive` reads the file (tar in memory, config, tokenizer),
  :mod:`.nemo_features` is NeMo's mel frontend, :mod:`.fastconformer` NeMo's cache-aware streaming encoder.
- :mod:`.decode` — batched greedy, beam search, streaming transcription with second-pass redecoding.
- :mod:`.audio`, :mod:`.readers` — audio loading with named errors; Common Voice, MLS and NeMo manifests.
- :mod:`.train` — the transducer's task for the training engine (batches, transducer loss, validation by
  decoding) and its helpers; pretraining (scripts/pretrain_tiny_asr.py) and the LDA recipe both use it.
- :mod:`.lda` — the LDA method's pieces (per-language adapters routed per sample, pseudo-labels for noisy
  student, per-language best-checkpoint merge).
- :mod:`.lda_train` — ``mmadapters train lda`` (the LDA recipe on the training engine).
- :mod:`.synth` — generated multilingual speech with espeak-ng (``python -m mmadapters.speech.synth``).
"""


def __getattr__(name: str):
    if name in ("load_asr", "save_asr"):  # lazily: importing the package stays free of torch
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
