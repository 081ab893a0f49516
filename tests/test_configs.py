"""The example run configs in configs/, `llara-dist init-model`, and `llara-dist --version`.

Every example config loads with its own class; the paper's and the released recipe's carry their
sources' numbers; the tiny CPU one trains on a model from init-model and shards from prep, as its
header says. init-model writes, for each architecture, a folder that plain transformers loads and
whose joint-prompt forward in llara-dist's decoder equals separate stock passes.
"""

from __future__ import annotations

import importlib.metadata
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import launch, make_docs, metrics, wait

from llara_dist import cli
from llara_dist.config import FinetuneConfig, FinetuneRunConfig, RunConfig, load_config
from llara_dist.errors import UserError
from llara_dist.model.tiny import ARCHITECTURES
from llara_dist.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLASSES = {"llara-paper-7b.yaml": RunConfig, "llara-released.yaml": RunConfig,
           "repllama-lora-finetune.yaml": FinetuneRunConfig, "tiny-cpu.yaml": RunConfig}


def llara_dist(*args: str) -> None:
    """A command through the CLI entry point in this process; exit status 0 asserted."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    assert e.value.code == 0, args


def header(name: str) -> str:
    """The comment block a config file starts with, without the '#'s."""
    lines = (CONFIGS / name).read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "\n".join(line.lstrip("# ") for line in lines[:end])


# --- the example configs ---------------------------------------------------------------------------


def test_every_example_config_loads_with_its_class_and_says_how_to_run_it():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(CLASSES)
    for name, cls in CLASSES.items():
        load_config(cls, CONFIGS / name)  # ConfigError lists every problem
        text = header(name)
        assert len(text.splitlines()) >= 5, name
        assert f"--config configs/{name}" in text, name  # the command that runs it


def test_paper_config_has_the_papers_numbers():
    """arXiv 2312.15503: LLaMA-2-7B, 10,000 steps, batch 256, 1024 tokens, lr 1e-5 (bf16, ZeRO-3)."""
    cfg = load_config(RunConfig, CONFIGS / "llara-paper-7b.yaml")
    assert (cfg.train.steps, cfg.train.global_batch, cfg.data.seq_len, cfg.train.lr) == (10_000, 256, 1024, 1e-5)
    assert cfg.objective.preset == "paper" and cfg.model.dtype == "bf16" and cfg.train.zero_stage == 3
    assert cfg.model.path.endswith("/meta-llama/Llama-2-7b-hf") and cfg.train.lora_r == 0
    assert cfg.train.global_batch % (cfg.train.micro_batch * 8) == 0  # one node of 8 GPUs, as the header says


def test_released_config_follows_the_released_recipe():
    """FlagEmbedding research/LLARA/pretrain: released prompts, all weights, lr 1e-5, warm-up ratio 0.1 then
    WarmupDecayLR (linear to 0), gradient checkpointing, bf16; the paper's steps, batch and length."""
    cfg = load_config(RunConfig, CONFIGS / "llara-released.yaml")
    t = cfg.train
    assert cfg.objective.preset == "released" and cfg.model.dtype == "bf16" and t.lora_r == 0
    assert (t.steps, t.global_batch, cfg.data.seq_len, t.lr) == (10_000, 256, 1024, 1e-5)
    assert t.warmup_steps == t.steps // 10 and (t.decay, t.min_lr_ratio) == ("linear", 0.0)
    assert t.activation_checkpointing and (t.weight_decay, t.grad_clip) == (0.0, 1.0)


def test_finetune_config_writes_out_the_projects_fine_tuning_defaults():
    cfg = load_config(FinetuneRunConfig, CONFIGS / "repllama-lora-finetune.yaml")
    defaults = FinetuneRunConfig()
    assert cfg.finetune == FinetuneConfig(data=cfg.finetune.data) and cfg.finetune.data.endswith("/train.jsonl")
    for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "zero3_layer_gather"):
        assert getattr(cfg.train, key) == getattr(defaults.train, key), key
    assert cfg.train.lora_r > 0 and cfg.train.lr == 3e-4  # LoRA; the released recipe's learning rate
    assert cfg.objective.preset == "released"  # the preset llara-released.yaml's export carries


@pytest.mark.slow
def test_tiny_cpu_config_trains_as_its_header_says(tmp_path, shared_data):
    """The header's three commands, with the header's tokenizer and corpus standing for local ones."""
    text = header("tiny-cpu.yaml")
    for command in ("llara-dist init-model tiny/model --arch llama --tokenizer",
                    "llara-dist prep --input wikitext2_valid.txt --format wikitext --tokenizer tiny/model "
                    "--out tiny/shards --seq-len 256",
                    "DS_ACCELERATOR=cpu llara-dist train --config configs/tiny-cpu.yaml"):
        assert command in text, command
    tiny = tmp_path / "tiny"
    llara_dist("init-model", str(tiny / "model"), "--arch", "llama", "--tokenizer",
               str(shared_data / "llama2-tokenizer"))
    llara_dist("prep", "--input", str(shared_data / "wikitext2_valid.txt"), "--format", "wikitext", "--tokenizer",
               str(tiny / "model"), "--out", str(tiny / "shards"), "--seq-len", "256")
    shutil.copy(CONFIGS / "tiny-cpu.yaml", tmp_path / "run.yaml")  # where helpers.launch reads it
    run_dir = tmp_path / "run"
    codes = wait(launch(tmp_path, run_dir, 1, f"model.path={tiny / 'model'}", f"data.shards={tiny / 'shards'}",
                        "train.steps=3", "train.ckpt_every=3"), timeout=300)
    assert codes == [0], (run_dir / "log-rank0.txt").read_text()[-3000:]
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(m["docs"] > 0 and math.isfinite(m["loss"]) for m in logged)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000003"


# --- init-model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_init_model_writes_a_model_folder_for_each_architecture(arch, tmp_path, shared_data):
    from transformers import AutoModelForCausalLM

    from llara_dist.config import ModelConfig, ObjectiveConfig
    from llara_dist.data.batch import build_batch
    from llara_dist.model.decoder import decoder_layers, forward_hidden, gather_states, load_model
    from llara_dist.prompts import prompt_tokens, resolve_preset
    from llara_dist.tokenizer import pad_id

    source = shared_data / "llama2-tokenizer"
    out = tmp_path / arch
    llara_dist("init-model", str(out), "--arch", arch, "--tokenizer", str(source), "--layers", "3")
    plain = AutoModelForCausalLM.from_pretrained(out)
    vocab = len(load_tokenizer(source))
    assert plain.config.model_type == arch
    assert plain.config.vocab_size == plain.get_input_embeddings().num_embeddings == vocab == 32000
    assert plain.config.num_hidden_layers == len(decoder_layers(plain)) == 3
    assert load_tokenizer(out).get_vocab() == load_tokenizer(source).get_vocab()  # the tokenizer beside it

    # llara-dist's decoder: the folder as model.path, sdpa; the joint pass equals separate stock passes
    tok = load_tokenizer(out)
    preset = resolve_preset(ObjectiveConfig(preset="released"))
    model = load_model(ModelConfig(path=str(out), attn="sdpa", dtype="fp32"), tok, preset, device="cpu").eval()
    prompt = prompt_tokens(tok, preset)
    docs = make_docs(tok, shared_data, [30, 9, 14])
    batch = build_batch([docs[:1], docs[1:]], prompt, seq_len=prompt.overhead * 2 + 50, pad_id=pad_id(tok))
    with torch.no_grad():
        hidden = forward_hidden(model, batch)
        joint = gather_states(hidden, batch.self_emb), gather_states(hidden, batch.next_emb)
        model.set_attn_implementation("sdpa")  # stock HF causal attention
        for d, doc in enumerate(docs):
            for states, suffix in zip(joint, (prompt.self_suffix, prompt.next_suffix)):
                ids = torch.tensor([list(prompt.prefix) + doc.ids.tolist() + list(suffix)])
                ref = model.get_decoder()(input_ids=ids).last_hidden_state[0, -prompt.num_emb_tokens:]
                assert (states[d] - ref).abs().max() <= 1e-5, (arch, d)


def test_init_model_options_and_refusals(tmp_path, tokenizer_dir, capsys):
    from transformers import AutoConfig

    from llara_dist.tools.init_model import init_model

    out = tmp_path / "m"
    llara_dist("init-model", str(out), "--arch", "mistral", "--tokenizer", str(tokenizer_dir), "--hidden", "32",
               "--heads", "2", "--kv-heads", "1", "--intermediate", "48", "--max-positions", "512", "--dtype", "bf16")
    config = AutoConfig.from_pretrained(out)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size,
            config.max_position_embeddings, config.dtype) == (32, 2, 1, 48, 512, torch.bfloat16)
    tok = load_tokenizer(tokenizer_dir)  # the special ids of the config are the tokenizer's
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

    with pytest.raises(UserError, match=f"{out}: the folder is not empty.*--overwrite"):
        init_model(out, "llama", tokenizer_dir)
    init_model(out, "llama", tokenizer_dir, overwrite=True)
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    with pytest.raises(UserError, match="--tokenizer .*nowhere: no such folder"):
        init_model(tmp_path / "new", "llama", tmp_path / "nowhere")
    with pytest.raises(UserError, match="--heads 4 is not a multiple of --kv-heads 3"):
        init_model(tmp_path / "new", "llama", tokenizer_dir, kv_heads=3)
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as e:  # argparse's own refusal
        cli.main(["init-model", str(tmp_path / "new"), "--arch", "gpt2", "--tokenizer", str(tokenizer_dir)])
    assert e.value.code == 2 and "invalid choice: 'gpt2'" in capsys.readouterr().err


# --- the version ----------------------------------------------------------------------------------


def test_version_is_the_installed_one_else_pyproject_s():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = subprocess.run([sys.executable, "-m", "llara_dist", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"llara-dist {importlib.metadata.version('llara-dist')}\n"
    # without site-packages the distribution is not installed: the package falls back to its own number
    bare = subprocess.run([sys.executable, "-S", "-c", "import llara_dist; print(llara_dist.__version__)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and bare.stdout.strip() == project, bare.stderr
