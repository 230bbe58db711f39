"""The main job (``mmadapters demo``) runs end to end and leaves loadable adapters behind."""

import json

from mmadapters.eval.cli import main


def test_demo_command_trains_merges_saves_and_reloads(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "parameter report" in out and "max |merged - unmerged|" in out
    for name in ("lora", "houlsby"):
        meta = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert meta["name"] == name
        assert (tmp_path / name / "adapter_model.safetensors").stat().st_size > 0
