"""mmadapters.speech — speech backbones and recipes.

Will hold: the cascaded Conformer transducer (a causal streaming first pass feeding a non-causal
second pass, built on torchaudio's Conformer and rnnt_loss), its adapter points, log-mel features and
SpecAugment, greedy/beam/streaming decoding, language-dependent adapters (LDA) with noisy student
training and checkpoint merging, and generated multilingual speech data (espeak-ng).
"""
