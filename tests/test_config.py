"""Typed config: YAML + overrides, every problem reported at once."""

import pytest

from llara_dist.config import ConfigError, RunConfig, help_of, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  seq_len: 512\ntrain:\n  lr: 2.0e-5\n")
    cfg = load_config(RunConfig, path, ["train.lr=3e-5", "objective.preset=paper", "data.num_workers=2"])
    assert cfg.data.seq_len == 512
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.objective.preset == "paper"
    assert cfg.data.num_workers == 2
    assert cfg.train.global_batch == 256  # default kept


def test_all_problems_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["data.seq_lne=5", "train.lr=fast", "objective.preset=nope", "data.seq_len=4"])
    msg = str(e.value)
    assert "data.seq_lne: unknown key (did you mean data.seq_len?)" in msg
    assert "train.lr: expected a number" in msg
    assert "objective.preset" in msg and "nope" in msg
    assert "data.seq_len: 4 is too short" in msg
    assert len(e.value.problems) == 4


def test_roundtrip_and_help(tmp_path):
    cfg = load_config(RunConfig, None, ["data.seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(RunConfig, tmp_path / "c.yaml")
    assert again == cfg
    names = {name: help for name, help, _ in help_of(RunConfig)}
    assert names["data.seq_len"] and names["train.global_batch"]
    assert all(h for h in names.values()), [n for n, h in names.items() if not h]


def test_paths_are_made_absolute(tmp_path, monkeypatch):
    """The run folder saves absolute paths: a command started in another folder finds the same files."""
    from llara_dist.config import FinetuneRunConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(RunConfig, None, ["model.path=tiny", "data.shards=shards/wiki", "train.tokenizer=~/tok"])
    assert cfg.model.path == str(tmp_path / "tiny")
    assert cfg.data.shards == str(tmp_path / "shards" / "wiki")
    assert cfg.train.tokenizer.startswith("/") and cfg.train.tokenizer.endswith("/tok")
    assert cfg.run_dir == str(tmp_path / "runs" / "llara")  # the default too
    ft = load_config(FinetuneRunConfig, None, ["finetune.data=pairs.jsonl"])
    assert ft.finetune.data == str(tmp_path / "pairs.jsonl")
    for url in ("s3://bucket/shards", "pipe:aws s3 cp s3://b/{name} -"):
        assert load_config(RunConfig, None, [f"data.shards={url}"]).data.shards == url
    assert load_config(RunConfig, None, []).train.tokenizer == ""  # empty: "look elsewhere", kept


def test_values_of_the_wrong_type_are_reported_with_every_other_problem():
    """Phase one coerces every field and collects what cannot be; phase two checks values, with the
    default standing in for a value that failed (no TypeError, no other problem hidden)."""
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["data.seq_len=abc", "train.micro_batch=x", "train.global_batch=0",
                                      "train.deepspeed=7", "train.lora_dropout=1.5"])
    assert sorted(e.value.problems) == sorted([
        "data.seq_len: expected an integer, got 'abc'",
        "train.micro_batch: expected an integer, got 'x'",
        "train.deepspeed: expected a mapping, got 7",
        "train.global_batch: must be >= 1",
        "train.lora_dropout: 1.5 is not in [0, 1)",
    ])
