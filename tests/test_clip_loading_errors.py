"""load_clip's one-line errors and warnings (issue "correct under abuse"): an unreachable pretrained tag, a pickle
given as weights, a built-in model without weights. Rows in docs/robustness.md."""

from __future__ import annotations

import collections
import time

import pytest
import torch

from mmadapters.vision import clip as clip_module
from mmadapters.vision.clip import load_clip


def test_pretrained_tag_offline_fails_at_once_with_one_line(tmp_path, monkeypatch):
    probed = []
    monkeypatch.setattr(clip_module, "_reachable", lambda host, **kw: probed.append(host) or False)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"pretrained 'laion2b_s34b_b79k' for model 'ViT-B-32': the weights are "
                       r"not in the cache .* cannot be reached from this machine; .* --pretrained FILE") as err:
        load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 20 and probed == ["huggingface.co"]
    assert "\n" not in str(err.value)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_a_pickle_as_pretrained_weights_is_refused_without_unpickling(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": collections.OrderedDict(w=torch.zeros(1)), "x": _Payload()}, path)
    with pytest.raises(ValueError, match=r"evil.pt': the file holds pickled Python objects, which mmadapters never unpickles"):
        load_clip("RN50", str(path))
    assert "unpickled" not in capsys.readouterr().out


def test_builtin_model_without_weights_warns_and_says_random_init(capsys):
    bundle = load_clip("RN50", None, seed=3, declare_points=False)
    assert bundle.info.random_init and bundle.info.pretrained is None
    err = capsys.readouterr().err
    assert "model 'RN50' has no pretrained weights" in err and "randomly initialized from seed 3" in err
    tiny = load_clip(None)
    assert not tiny.info.random_init and "no pretrained weights" not in capsys.readouterr().err
