"""Config validation: bad values fail at once with a one-line message naming the key."""

from __future__ import annotations

import pytest

from deftx.config import PipelineConfig, load_pipeline_config, parse_override, preset_names
from deftx.errors import ConfigError


@pytest.mark.parametrize("overrides,message", [
    (["language_sft.selection.density=0"], r"language_sft\.selection\.density: must be in \(0, 1\]"),
    (["task_sft.selection.density=1.5"], r"task_sft\.selection\.density: must be in \(0, 1\]"),
    (["task_sft.selection.method=deft_x", "task_sft.selection.rank=0"], r"task_sft\.selection\.rank: must be a positive"),
    (["task_sft.selection.method=deft_x", "task_sft.selection.rank=two"], r"task_sft\.selection\.rank: expected an integer"),
    (["task_sft.selection.method=deft_x", "task_sft.selection.energy=1.2"], r"energy: must be in \(0, 1\]"),
    (["task_sft.selection.method=magic"], "unknown method 'magic'"),
    (["task_sft.selection.svd_target=weights"], "unknown target 'weights'"),
    (["task_sft.selection.residual_keep=2"], r"residual_keep: must be in \[0, 1\]"),
    (["task_sft.selection.svd_target=finetuned", "task_sft.selection.svd_solver=gram"],
     r"task_sft\.selection\.svd_solver: the gram solver needs svd_target 'delta'"),
    (["target_languages=[jav,xyz]"], r"target_languages\[1\]: unknown NusaX language 'xyz'; valid: ace, ban"),
    (["source_language=en"], "source_language: unknown NusaX language 'en'"),
    (["target_languages=[jav,jav]"], "lists a language twice"),
    (["target_languages=[]"], "at least one"),
    (["task_sft.full.learning_rate=0"], r"task_sft\.full\.learning_rate: must be > 0"),
    (["task_sft.full.batch_size=0"], r"batch_size: must be >= 1"),
    (["task_sft.fulll.epochs=1"], r"task_sft\.fulll: unknown key; valid keys here: selection, full, sparse"),
    (["data.source=/does/not/exist"], "is not 'bundled', 'hub' or an existing directory"),
    (["model.max_length=4"], "max_length: must be >= 8"),
    (["task_sft.selection.density=null"], "set exactly one of density"),
    (["cluster.checkpoint_minutes=-1"], r"cluster\.checkpoint_minutes: must be >= 0 \(0: off\)"),
    (["language_sft.text=[wikipedia]"], r"language_sft\.text: unknown text source 'wikipedia' for ind; valid: "
                                        r"nusax_mt_train, minangnlp_wiki_mt, nusawrites_translation, all"),
    (["language_sft.text=[nllb_seed]", "target_languages=[ace]"], r"language_sft\.text: unknown text source "
                                                                   r"'nllb_seed' for ind"),
    (["task_sft.text=[all]"], r"task_sft\.text: only language SFTs read unlabelled text"),
    (["language_sft.held_out=0.6"], r"language_sft\.held_out: must be a fraction in \[0, 0\.5\], got 0\.6"),
    (["task_sft.held_out=0.1"], r"task_sft\.held_out: only language SFTs hold text out"),
])
def test_invalid_values_fail_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_pipeline_config(overrides=overrides)
    assert "\n" not in str(err.value)


def test_defaults_and_presets_validate():
    cfg = load_pipeline_config()
    assert isinstance(cfg, PipelineConfig) and cfg.source_language == "ind"
    assert "demo" in preset_names()
    for name in preset_names():
        load_pipeline_config(preset=name)


def test_language_text_sources_validate_for_every_language():
    cfg = load_pipeline_config(overrides=["language_sft.text=[all]", "target_languages=[jav,nij,bbc]"])
    assert cfg.language_sft.text == ["all"]
    cfg = load_pipeline_config(overrides=["language_sft.text=[nusax_mt_train,/data/own.txt.gz]"])
    assert cfg.language_sft.text == ["nusax_mt_train", "/data/own.txt.gz"]   # paths are read at training time
    assert load_pipeline_config().language_sft.text is None                 # the task's default text


def test_setting_one_alternative_clears_the_other():
    cfg = load_pipeline_config(overrides=["task_sft.selection.rank=8"], method="deft_x")
    assert cfg.task_sft.selection.rank == 8 and cfg.task_sft.selection.energy is None
    cfg = load_pipeline_config(overrides=["task_sft.selection.k=1000"])
    assert cfg.task_sft.selection.k == 1000 and cfg.task_sft.selection.density is None


def test_method_flag_sets_both_sft_kinds():
    cfg = load_pipeline_config(method="deft_x")
    assert cfg.task_sft.selection.method == cfg.language_sft.selection.method == "deft_x"
    with pytest.raises(ConfigError, match="unknown method"):
        load_pipeline_config(method="sft")


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("target_languages: [min, ban]\ntask_sft:\n  full:\n    learning_rate: 1e-4\n")
    cfg = load_pipeline_config(config=path, overrides=["target_languages=[sun]"])
    assert cfg.target_languages == ["sun"] and cfg.task_sft.full.learning_rate == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("task_sft: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_pipeline_config(config=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline_config(config=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; valid: "):
        load_pipeline_config(preset="nope")


def test_parse_override():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    assert parse_override("a=null") == (["a"], None)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("novalue")
