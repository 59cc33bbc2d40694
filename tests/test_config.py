"""Configuration: presets load, overrides apply, and every bad value fails with a one-line error
that names the key."""

import pytest

from starcoder.config import PRESET_DIR, ConfigError, load_config

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.train.seq_length <= cfg.model.max_position_embeddings


# Fine-tuning recipes (configs/recipes/, named `recipes/<name>`) and the preset whose model
# section each repeats.
RECIPES = {"octocoder-sft": "starcoder-15b", "astraios-lora": "starcoderbase-1b",
           "starcoder2-instruct-sft": "starcoder2-15b", "zephyr-dpo": "starcoder2-15b"}


def test_every_recipe_is_listed():
    assert sorted(p.stem for p in (PRESET_DIR / "recipes").glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_load_and_start_from_a_model(name):
    cfg = load_config(f"recipes/{name}")
    assert cfg == load_config(PRESET_DIR / "recipes" / f"{name}.yaml")  # by name or by path
    assert cfg.model == load_config(RECIPES[name]).model
    assert cfg.train.init_from and cfg.train.min_lr == 0 and cfg.data.fim_rate == 0
    assert cfg.train.seq_length <= cfg.model.max_position_embeddings
    assert cfg.parallel.pipeline_parallel == 1  # train.init_from needs it
    assert load_config(f"recipes/{name}", ["train.init_from=base/"]).train.init_from == "base/"


def test_recipe_settings():
    sc2 = load_config("recipes/starcoder2-instruct-sft").train
    assert (sc2.lr, sc2.epochs, sc2.global_batch_size, sc2.warmup_ratio, sc2.lr_schedule, sc2.seq_length) == \
        (1e-5, 4, 64, 0.05, "linear", 1280)
    lora = load_config("recipes/astraios-lora").finetune
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.05)
    assert lora.lora_targets == ["q_proj", "kv_proj", "out_proj", "fc_out"]
    octo = load_config("recipes/octocoder-sft").train
    assert (octo.objective, octo.loss_normalization) == ("sft", "example")
    zephyr = load_config("recipes/zephyr-dpo")
    assert (zephyr.train.objective, zephyr.finetune.dpo_beta, zephyr.train.lr) == ("dpo", 0.1, 5e-7)
    assert (zephyr.train.lr_schedule, zephyr.train.warmup_ratio) == ("linear", 0.1)


def test_tiny_presets_are_pinned():
    for name, kv, pos, window in [("tiny-sc1", 1, "learned", None), ("tiny-sc2", 2, "rope", 64)]:
        m = load_config(name).model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_size, m.vocab_size) == (4, 256, 8, 1024, 8192)
        assert (m.num_query_groups, m.position_embedding, m.sliding_window) == (kv, pos, window)
        assert m.attention_dropout == m.hidden_dropout == m.embedding_dropout == 0.0
        assert load_config(name).train.seq_length == 256


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("tiny-sc2", ["model.sliding_window=null", "train.lr=1e-4", "data.paths=['2 a', 'b']",
                                   "parallel.sequence_parallel=true"])
    assert cfg.model.sliding_window is None
    assert cfg.train.lr == 1e-4
    assert [(p.path, p.weight) for p in cfg.data.paths] == [("a", 2.0), ("b", 1.0)]
    assert cfg.parallel.sequence_parallel is True


def test_window_at_or_above_sequence_is_valid():
    assert load_config("tiny-sc2", ["model.sliding_window=256"]).model.sliding_window == 256
    assert load_config("tiny-sc2", ["model.sliding_window=100000"]).model.sliding_window == 100000


def test_data_sources_accept_mappings():
    cfg = load_config({"data": {"paths": [{"path": "x", "weight": 0.3}, "y"]}})
    assert [(p.path, p.weight) for p in cfg.data.paths] == [("x", 0.3), ("y", 1.0)]


BAD = [
    (["model.num_query_groups=3"], "model.num_attention_heads: 8 is not divisible by model.num_query_groups (3)"),
    (["model.sliding_window=0"], "model.sliding_window: must be at least 1"),
    (["model.hidden_size=250"], "model.hidden_size: 250 is not divisible by model.num_attention_heads"),
    (["model.slidng_window=3"], "model.slidng_window: unknown key (did you mean sliding_window?)"),
    (["modle.hidden_size=3"], "modle: unknown section (did you mean model?)"),
    (["model.num_layers=two"], "model.num_layers: expected an integer, got 'two'"),
    (["model.num_layers=2.5"], "model.num_layers: expected an integer, got 2.5"),
    (["model.tie_word_embeddings=1"], "model.tie_word_embeddings: expected true or false, got 1"),
    (["model.kernels=cuda"], "model.kernels: 'cuda' is not one of auto | torch | triton"),
    (["model.attention_dropout=1.5"], "model.attention_dropout: must be in [0, 1)"),
    (["model.position_embedding=learned"], "model.position_embedding: starcoder2 uses rope"),
    (["parallel.tensor_parallel=3"], "parallel.tensor_parallel: model.num_attention_heads (8) is not divisible by 3"),
    (["parallel.tensor_parallel=0"], "parallel.tensor_parallel: must be at least 1"),
    (["parallel.pipeline_parallel=3"], "parallel.pipeline_parallel: model.num_layers (4) does not split evenly"),
    (["train.seq_length=512"], "train.seq_length: 512 exceeds model.max_position_embeddings (256)"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"],
     "train.global_batch_size: 10 is not divisible by train.micro_batch_size (4)"),
    (["train.min_lr=1"], "train.min_lr: 1.0 must be in [0, train.lr"),
    (["train.precision=fp8"], "train.precision: 'fp8' is not one of auto | fp32 | bf16 | fp16"),
    (["data.fim_rate=2"], "data.fim_rate: must be in [0, 1], got 2.0"),
    (["data.split=a,b"], "data.split: expected numbers"),
    (["data.paths=['-1 x']"], "data.paths[0].weight: must be a positive finite number"),
    (["data.paths=[{path: x, weight: .inf}]"], "data.paths[0].weight: must be a positive finite number, got inf"),
    (["data.paths=['nan x']"], "data.paths[0].weight: must be a positive finite number, got nan"),
    (["model.hidden_size=[64"], "--set model.hidden_size=[64: the value is not valid YAML (line 1"),
    (["log.every=0"], "log.every: must be at least 1, got 0"),
    (["train.profile_steps=[3, 2]"], "train.profile_steps: expected [first, last] steps with 1 <= first"),
    (["train.lr"], "--set 'train.lr': expected section.key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sc2", overrides)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_kv_ratio_rule_under_tensor_parallel():
    load_config("tiny-sc2", ["parallel.tensor_parallel=4"])  # 2 KV heads shared by 4 ranks: fine
    load_config("tiny-sc1", ["parallel.tensor_parallel=8"])  # multi-query: fine
    with pytest.raises(ConfigError, match=r"^parallel.tensor_parallel: 4 must divide model.num_query_groups \(6\)"):
        load_config("tiny-sc2", ["model.num_attention_heads=12", "model.hidden_size=384",
                                 "model.num_query_groups=6", "parallel.tensor_parallel=4"])


def test_gpt_bigcode_rejects_what_it_cannot_export():
    with pytest.raises(ConfigError, match="^model.num_query_groups: gpt_bigcode supports multi-query"):
        load_config("tiny-sc1", ["model.num_query_groups=2"])
    with pytest.raises(ConfigError, match="^model.sliding_window: gpt_bigcode has no sliding window"):
        load_config("tiny-sc1", ["model.sliding_window=4"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="no such file or preset .*tiny-sc2"):
        load_config("tiny-sc3")


def test_config_reference_is_in_sync_with_config_py():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_config_reference", root / "tools" / "gen_config_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    assert (root / "docs" / "config.md").read_text() == text, \
        "docs/config.md is stale: run python tools/gen_config_reference.py"
    from starcoder.config import Config

    for section, value in Config().to_dict().items():  # every key of the schema is documented
        for key in value:
            assert f"| `{section}.{key}` |" in text


def test_a_config_file_that_is_not_yaml_or_not_utf8_names_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"a.yaml: not valid YAML \(line 3, column 1"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_bytes(b"train: {lr: 1}\n# \xff\n")
    with pytest.raises(ConfigError, match=r"b.yaml: not UTF-8 text \(byte 17 is 0xff\)"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- model\n")
    with pytest.raises(ConfigError, match="c.yaml: expected a mapping of sections, got list"):
        load_config(tmp_path / "c.yaml")
