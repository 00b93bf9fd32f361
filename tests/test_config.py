"""Run configuration (mmfast/config.py): YAML files and shipped configs, dotted overrides parsed as
YAML, recipes, type and value checks that name the key, and the generated reference. No data:
the checks that need a dataset run in tests/test_trainer.py."""
import math

import pytest
import yaml

from mmfast.config import (CHOICES, Config, KEY_HELP, dump_config, load_config, reference_markdown,
                           shipped_configs)


def test_every_shipped_config_loads():
    assert {"embedded", "embedded_text", "crema_d", "crema_d_tpami", "kinetics_sounds", "vggsound", "ave"} <= \
        set(shipped_configs())
    for name in shipped_configs():
        cfg = load_config(name, ["data.root=somewhere"])
        assert cfg.data.root == "somewhere"


def test_overrides_are_yaml_values_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptim: {lr: 0.1, momentum: 0.5}\ndata: {root: d}\n")
    cfg = load_config(path, ["optim.lr=2e-3", "epochs=7", "method=ogm", "hparams.alpha=0.8", "data.synth={clips: 12}"])
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.momentum) == (7, 2e-3, 0.5)
    assert cfg.hparams == {"alpha": 0.8} and cfg.data.synth == {"clips": 12}


def test_a_recipe_applies_under_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: ogm\ndata: {root: d}\noptim: {lr: 0.1}\n"
                    "recipes: {ogm: {optim: {lr: 0.5}, hparams: {alpha: 0.3}}}\n")
    assert load_config(path).optim.lr == 0.5 and load_config(path).hparams == {"alpha": 0.3}
    assert load_config(path, ["optim.lr=0.2"]).optim.lr == 0.2  # (the command line stays on top)
    assert load_config(path, ["method=joint"]).optim.lr == 0.1  # (another method: no recipe)
    assert load_config(path, apply_recipe=False).optim.lr == 0.1  # (a run's saved config: applied already)


def test_a_saved_config_reads_back_equal(tmp_path):
    cfg = load_config("crema_d", ["data.root=x", "method=opm", "seed=4"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", apply_recipe=False).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides,needle", [
    (["epochs=0"], "'epochs' must be >= 1"),
    (["optim.lr=-1"], "'optim.lr' must be >= 0"),
    (["optim.lr=.nan"], "'optim.lr' must be a finite number"),
    (["optim.momentum=.inf"], "'optim.momentum' must be a finite number"),
    (["optim.lr=abc"], "'optim.lr' must be float, got str"),
    (["epochs=2.5"], "'epochs' must be int"),
    (["device=tpu"], "'device' must be one of"),
    (["method=nope"], "'method' must be one of"),
    (["hparams.nope=1", "method=ogm"], "unknown hyper-parameter"),
    (["bogus=1"], "unknown config key"),
    (["optim.bogus=1"], "unknown config key"),
    (["data.root="], "'data.root' is empty"),
    (["dist_timeout_s=0"], "'dist_timeout_s' must be > 0"),
    (["method=boost", "model.fusion=concat"], "'model.fusion'"),
    (["model.estimator=split", "model.fusion=mlp"], "'model.estimator'"),
    (["epochs"], "must look like key=value"),
    (["data.cache_max_gb=-1"], "'data.cache_max_gb' must be >= 0"),
    (["data.cache=3"], "'data.cache' must be str"),
    (["data.backend=naive", "data.cache=/tmp/c"], "the naive loader decodes every epoch"),
    (["data.feature_length=0"], "'data.feature_length' must be >= 1"),
    (["data.feature_train_offset=centre"], "'data.feature_train_offset' must be one of"),
])
def test_bad_values_fail_naming_the_key(overrides, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        load_config(None, ["data.root=d", *overrides])


def test_cache_switches_yaml_reads_as_booleans_are_the_settings(tmp_path):
    """YAML 1.1 reads off/on as booleans: data.cache takes them as the settings they spell."""
    assert load_config(None, ["data.root=d", "data.cache=off"]).data.cache == "off"
    assert load_config(None, ["data.root=d", "data.cache=on"]).data.cache == "auto"
    path = tmp_path / "c.yaml"
    path.write_text("data: {root: d, cache: off}\n")
    assert load_config(path).data.cache == "off" and load_config("embedded").data.cache == "auto"
    assert load_config(None, ["data.root=d", "data.cache=runs/cache"]).data.cache == "runs/cache"


def test_numbers_yaml_reads_as_strings_are_numbers():
    cfg = load_config(None, ["data.root=d", "optim.lr=1e6", "optim.weight_decay=5E-4", "optim.gamma=1.0e-1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.gamma) == (1e6, 5e-4, 0.1)


def test_unreadable_files_are_named(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1,\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML at line 2"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(listed)
    with pytest.raises(ValueError, match="neither a YAML file nor a shipped config"):
        load_config("no_such_config")


def test_the_reference_documents_every_key_with_its_default():
    table = reference_markdown()
    rows = {line.split("`")[1]: line for line in table.splitlines()[2:]}
    flat = {}

    def walk(section, prefix):
        for key, value in section.items():
            if key in ("data", "model", "optim"):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(Config().to_dict(), "")
    assert set(rows) == set(flat) == set(KEY_HELP)
    for key, default in flat.items():
        assert f"`{default!r}`" in rows[key], key
    for key, choices in CHOICES.items():
        assert all(f"`{c}`" in rows[key] for c in choices), key
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in flat.values())
    assert yaml.safe_load(yaml.safe_dump(Config().to_dict())) == Config().to_dict()
