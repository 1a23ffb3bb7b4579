import pytest

from m3po_core.config import RunConfig, load_config
from m3po_core.errors import ConfigError
from m3po_core.stages.runner import stage_config  # the cache keys moved there from m3po_core.config


def test_demo_config_loads_with_paper_selection_defaults():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert (cfg.selection.alpha, cfg.selection.delta, cfg.sampling.n) == (0.5, 0.1, 32)
    paper = RunConfig().training  # the defaults are the paper's; the demo states its departures
    assert (paper.batch_size, paper.learning_rate, paper.warmup_ratio, paper.epochs) == (8, 5e-5, 0.05, 1)
    assert paper.loss_type == ["sigmoid"]


def test_overrides_are_typed_from_yaml():
    cfg = load_config(None, ["sampling.n=4", "selection.alpha=0", "training.lora_target_modules=[q_proj, v_proj]",
                             "training.learning_rate=5e-5"])
    assert cfg.sampling.n == 4 and cfg.selection.alpha == 0.0
    assert cfg.training.learning_rate == 5e-5  # YAML 1.1 reads 5e-5 as a string; floats accept it
    assert cfg.training.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override,named", [
    ("sampling.temprature=0.5", "sampling.temprature"),
    ("nosuch.key=1", "nosuch"),
    ("sampling.n=many", "sampling.n"),
    ("selection.strategy=best", "selection.strategy"),
    ("data.world.image_size=1.5", "data.world.image_size"),
    ("sampling.n=true", "sampling.n"),       # strict: a boolean is not a count ...
    ("sampling.n='4'", "sampling.n"),        # ... nor a string of digits
    ("sampling.temperature=warm", "sampling.temperature"),
])
def test_bad_keys_and_types_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  n: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_stage_sections_change_only_their_stage():
    a, b = load_config(), load_config(None, ["selection.alpha=0.25"])
    assert stage_config(a, "pairs") != stage_config(b, "pairs")
    for stage in ("prompts", "candidates", "scores", "train"):
        assert stage_config(a, stage) == stage_config(b, stage)


@pytest.mark.parametrize("override,named", [
    ("sampling.n=0", "sampling.n"),
    ("sampling.top_p=1.5", "sampling.top_p"),
    ("selection.alpha=-1", "selection.alpha"),
    ("data.source=llava_instruct", "scoring.judge"),
])
def test_values_out_of_range_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_backends_are_selected_and_checked():
    cfg = load_config(None, ["scoring.judge=openai:gpt-4o", "sampling.backend=openai",
                             "sampling.base_url=http://127.0.0.1:8000/v1"])
    assert cfg.scoring.judge == "openai:gpt-4o" and cfg.sampling.backend == "openai"
    with pytest.raises(ConfigError, match=r"sampling\.base_url"):
        load_config(None, ["sampling.backend=openai"])
    with pytest.raises(ConfigError, match=r"scoring\.judge"):
        load_config(None, ["scoring.judge=gpt-4o"])


def test_cache_keys_ignore_speed_settings_but_not_content_settings():
    base = load_config()
    same = load_config(None, ["sampling.concurrency=64", "scoring.judge_concurrency=2", "scoring.clip.batch_size=8"])
    for stage in ("candidates", "scores", "clip"):
        assert stage_config(base, stage) == stage_config(same, stage), stage
    assert stage_config(base, "candidates") != stage_config(load_config(None, ["model.dtype=bfloat16"]), "candidates")
    # alpha is part of the pairs key whatever the strategy (m3po_core/config/invalidation.py: a key that
    # changes needlessly recomputes a stage of seconds; one that misses a change would serve stale pairs)
    ablation = load_config(None, ["selection.strategy=mas_gap"])
    assert stage_config(ablation, "pairs") != stage_config(
        load_config(None, ["selection.strategy=mas_gap", "selection.alpha=0.9"]), "pairs")


@pytest.mark.parametrize("name", ["llava15-7b", "llava15-13b"])
def test_the_llava_configs_load_with_the_papers_settings(name):
    from m3po_core.config import CONFIG_DIR

    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.sampling.n == 32 and cfg.selection.alpha == 0.5 and cfg.selection.delta == 0.1
    assert (cfg.training.batch_size, cfg.training.learning_rate, cfg.training.warmup_ratio, cfg.training.epochs) == \
        (8, 5e-5, 0.05, 1)
    assert cfg.scoring.clip.name == "ViT-L-14" and cfg.model.name.startswith("llava-hf/llava-1.5-")


# -- the configuration documents itself (m3po_core/config/describe.py, `m3po config`) ---------------

def _section_classes(cls=RunConfig, seen=None):
    """Every section dataclass reachable from RunConfig: nested sections and list items."""
    import dataclasses
    import typing

    seen = [] if seen is None else seen
    if cls in seen:
        return seen
    seen.append(cls)
    for tp in typing.get_type_hints(cls).values():
        for t in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(t):
                _section_classes(t, seen)
    return seen


def test_every_field_of_every_section_has_help():
    import dataclasses

    from m3po_core.config import DataSourceConfig, EncoderSpec, JudgeSpec, QualityFilterConfig, WorldConfig

    classes = _section_classes()
    assert {WorldConfig, DataSourceConfig, QualityFilterConfig, JudgeSpec, EncoderSpec} <= set(classes)
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if not str(f.metadata.get("help", "")).strip()]
    assert not missing, missing
    assert all(cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") for cls in classes)  # not dataclass's


def test_describe_one_section():
    from m3po_core.config import describe

    text = describe("sampling")
    assert "sampling.n (int; default: 32)" in text
    assert "Candidates sampled per prompt" in text
    assert "sampling.backend (one of transformers, vllm, openai; default: transformers)" in text
    assert "sampling.base_url (str | None; default: null)" in text
    body = text.split("\n\n", 1)[1]  # after the preface
    keys = [line.split(" ")[0] for line in body.splitlines() if line and not line.startswith((" ", "["))]
    assert keys and all(k.startswith("sampling.") for k in keys), keys
    for other in ("training.beta", "selection.alpha", "data.shard_size", "ipa.rounds"):  # helps may cite others
        assert other not in text
    nested = describe("data.world")
    assert "data.world.image_size (int; default: 64)" in nested and "data.shard_size" not in nested
    everything = describe()
    assert "training.lora_target_modules (list[str]; default: [q_proj," in everything
    assert "data.extra_sources[].path (str; default: required)" in everything
    assert 'evaluation.answer_suffix (str; default: "\\nAnswer the question' in everything


def test_describe_names_an_unknown_section():
    from m3po_core.config import describe

    with pytest.raises(ConfigError, match="nosuch") as e:
        describe("nosuch")
    assert "sampling" in str(e.value) and "data.world" in str(e.value)


def test_cli_config_prints_keys_and_refuses_unknown_sections():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "config", "training"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "training.beta" in ok.stdout and "sampling.n" not in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "m3po.flows.cli", "config", "nosuch"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "m3po config:" in bad.stderr and "nosuch" in bad.stderr
    assert not bad.stdout


def test_defaults_are_the_plain_dataclasses_and_the_papers():
    import dataclasses
    import yaml

    from m3po_core.config import CONFIG_DIR, DEFAULT_CONFIG, config_from_dict

    assert CONFIG_DIR.is_dir() and DEFAULT_CONFIG == CONFIG_DIR / "demo.yaml" and DEFAULT_CONFIG.is_file()
    plain = RunConfig()
    assert config_from_dict({}).to_dict() == plain.to_dict() == dataclasses.asdict(plain)
    demo = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert load_config(None).to_dict() == config_from_dict(demo).to_dict()
    assert (plain.sampling.n, plain.selection.alpha, plain.selection.delta) == (32, 0.5, 0.1)
    assert (plain.training.batch_size, plain.training.learning_rate) == (8, 5e-5)
    loaded = load_config(None)  # the demo keeps the paper's where it states no departure
    assert (loaded.sampling.n, loaded.selection.alpha, loaded.selection.delta, loaded.training.batch_size) == \
        (32, 0.5, 0.1, 8)
