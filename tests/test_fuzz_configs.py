"""Property-based fuzzing of adapter config parsing: ``AdapterConfig.from_dict`` with arbitrary dicts, and
``read_adapter_config`` with arbitrary adapter_config.json contents, either build a config or raise their
documented errors (``ValueError`` naming the source, ``TypeError`` only for a non-dict; ``FileNotFoundError`` for a
missing file). A config that parses round-trips through JSON unchanged."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmadapters as mma
import mmadapters.methods  # noqa: F401 - registers the methods
from mmadapters.config import registered_methods
from mmadapters.io import CONFIG_NAME, read_adapter_config

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 20), 10 ** 20), st.floats(allow_nan=True),
                     st.text(max_size=8), st.sampled_from(["series", "parallel", "relu", "none", "all", "adapted", "fc1"]))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=8)
_FIELDS = sorted({"r", "alpha", "dropout", "target_modules", "rslora", "train_norms", "train_biases", "gate",
                  "placement", "bottleneck_dim", "reduction_factor", "activation", "scaling", "num_tokens", "density",
                  "num_modules", "phm_dim", "adapters", "temperature", "hypernet_groups", "num_entries", "bogus"})
_configs = st.fixed_dictionaries(
    {"method": st.one_of(st.sampled_from(registered_methods()), _json)},
    optional={name: _json for name in _FIELDS},
)


def _check(data) -> None:
    try:
        config = mma.AdapterConfig.from_dict(data, source="fuzz.json: field 'config'")
    except ValueError as err:
        assert str(err).startswith("fuzz.json: field 'config'"), err
        return
    except TypeError as err:
        assert not isinstance(data, dict), f"TypeError for a dict: {err}"
        return
    assert mma.AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@FUZZ
@given(_configs)
def test_from_dict_on_arbitrary_dicts(data):
    _check(data)


@FUZZ
@given(_json)
def test_from_dict_on_arbitrary_json_values(data):
    _check(data)


_meta = st.fixed_dictionaries(
    {"config": st.one_of(_configs, _json), "name": _json, "fingerprint": _json, "weights_sha256": _json},
    optional={"format_version": _json, "targets": _json, "quantization": _json},
)


@FUZZ
@given(st.one_of(_meta.map(json.dumps), st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))),
       st.booleans())
def test_read_adapter_config_on_arbitrary_files(text, raw_bytes):
    with tempfile.TemporaryDirectory(prefix="mma-fuzz-") as tmp:
        (Path(tmp) / CONFIG_NAME).write_bytes(text.encode("latin-1", "replace") if raw_bytes else text.encode())
        try:
            meta, config = read_adapter_config(tmp)
        except ValueError as err:
            assert str(Path(tmp) / CONFIG_NAME) in str(err), err
            return
        assert isinstance(meta["fingerprint"], dict) and isinstance(config, mma.AdapterConfig)
