import json
import subprocess
import sys

import pytest

from visurf_megatron.config import Config, ConfigError, load_config, main


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_match_visurf_md():
    cfg = load_config()
    assert isinstance(cfg, Config)
    alg = cfg.algorithm
    assert (alg.paradigm, alg.eps, alg.std_ddof, alg.clip_low, alg.clip_high) == ("visurf", 1e-6, 1, 0.2, 0.2)
    assert alg.loss_agg == "token-mean" and alg.kl_coef == 0.0 and alg.entropy_coef == 0.0
    assert alg.smooth and alg.gt_no_thinking_reward and alg.align_gt_style
    assert cfg.data.image_size == 840 and cfg.train.lr == 1e-6


def test_yaml_and_dotted_overrides_with_coercion(tmp_path):
    path = write(tmp_path, "train:\n  lr: 2.0e-6\n  steps: 5\nparallel:\n  tp: 2\n")
    cfg = load_config(path, ["train.lr=1e-6", "parallel.sequence_parallel=true", "rollout.n=4",
                             "algorithm.std_ddof=0", "algorithm.dual_clip=3", "model.fp8=hybrid"],
                      world_size=4)
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 5 and cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.rollout.n == 4 and cfg.algorithm.std_ddof == 0
    assert cfg.algorithm.dual_clip == 3.0 and isinstance(cfg.algorithm.dual_clip, float)
    assert cfg.model.fp8 == "hybrid"
    assert cfg.parallel.dp == 2  # derived: 4 / (2 * 1)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.learning_rate=1"], "unknown key train.learning_rate"),
        (["trian.lr=1"], "unknown key trian"),
        (["train.steps=many"], "train.steps: expected an integer"),
        (["train.steps=1.5"], "train.steps: expected an integer"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel: expected true/false"),
        (["algorithm.paradigm=ppo"], "algorithm.paradigm: 'ppo' is not one of"),
        (["algorithm.loss_agg=sum"], "algorithm.loss_agg"),
        (["train"], "must look like section.key=value"),
        (["algorithm.clip_low=1.5"], "algorithm.clip_low must be in [0, 1)"),
        (["algorithm.dual_clip=0.5"], "algorithm.dual_clip must be > 1"),
        (["parallel.sequence_parallel=true"], "sequence_parallel needs parallel.tp > 1"),
    ],
)
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


def test_impossible_layouts(tmp_path):
    with pytest.raises(ConfigError, match=r"tp\(2\) \* pp\(2\) = 4 does not divide world size 6"):
        load_config(None, ["parallel.tp=2", "parallel.pp=2"], world_size=6)
    with pytest.raises(ConfigError, match=r"tp\(2\) \* pp\(1\) \* dp\(3\) = 6 != world size 4"):
        load_config(None, ["parallel.tp=2", "parallel.dp=3"], world_size=4)
    with pytest.raises(ConfigError, match="does not divide the 28 attention heads"):
        load_config(None, ["parallel.tp=8", "model.num_attention_heads=28", "model.num_query_groups=4"])
    with pytest.raises(ConfigError, match="does not divide the 2 query groups"):
        load_config(None, ["parallel.tp=4", "model.num_attention_heads=4", "model.num_query_groups=2"])
    # Heads read from an HF config.json when not given.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"text_config": {"num_attention_heads": 28, "num_key_value_heads": 4}}))
    with pytest.raises(ConfigError, match="does not divide the 28 attention heads"):
        load_config(None, [f"model.hf_path={hf}", "parallel.tp=8"])
    assert load_config(None, [f"model.hf_path={hf}", "parallel.tp=4"], world_size=8).parallel.dp == 2


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="unknown key bogus"):
        load_config(write(tmp_path, "bogus: 1\n"))
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


def test_cli_prints_resolved_config_and_reports_errors(tmp_path, capsys):
    path = write(tmp_path, "rollout:\n  n: 4\n")
    assert main([str(path), "train.lr=3e-6"]) == 0
    out = capsys.readouterr().out
    assert "n: 4" in out and "lr: 3.0e-06" in out
    assert main([str(path), "train.nope=1"]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "visurf_megatron.config", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "dotted overrides" in proc.stdout


def test_vllm_rollout_tp_must_divide_training_tp():
    with pytest.raises(ConfigError, match=r"rollout.tp=4 must divide parallel.tp=2"):
        load_config(None, ["rollout.engine=vllm", "rollout.tp=4", "parallel.tp=2"])
    assert load_config(None, ["rollout.engine=vllm", "rollout.tp=2", "parallel.tp=8"]).rollout.tp == 2
