"""mmadapters.video — video loading and video recipes.

Will hold: clip loading with decord (PyAV fallback) and TSN/strided sampling, frame-feature caching,
Tem-Adapter for video question answering and FineCLIPER for dynamic facial expression recognition,
and generated moving-shape videos with events and questions.
"""
