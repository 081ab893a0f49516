"""llara_dist/patches.py: every third-party internal it relies on is found on the installed
versions, and a release without one is refused before any work, naming it."""

from __future__ import annotations

from helpers import refused

from llara_dist import patches


def test_the_installed_versions_have_every_internal_used():
    assert patches.problems() == []


def test_a_deepspeed_without_the_private_name_is_refused(monkeypatch):
    from deepspeed.runtime.zero import partition_parameters as pp

    def renamed(self, param):  # as a release that renamed the attribute would define it
        self.param = param

    monkeypatch.setattr(pp.NoGatherHandle, "__init__", renamed)
    found = patches.problems()
    assert len(found) == 1 and "NoGatherHandle" in found[0] and "_NoGatherHandle__param" in found[0]


def test_a_torch_without_the_block_mask_keyword_is_refused(monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "create_block_mask", lambda mask_mod, B, H, Q_LEN, KV_LEN, device="cuda": None)
    found = patches.problems()
    assert len(found) == 1 and "_compile=" in found[0] and "model.attn=sdpa" in found[0]


def test_a_kernels_wrapper_without_its_function_is_refused(monkeypatch):
    from transformers.models.llama import modeling_llama

    rope = modeling_llama.apply_rotary_pos_emb
    assert patches.kernel_function(rope) is not None  # the real wrapper keeps the function

    class Wrapper(type(rope)):  # a build that keeps it elsewhere
        def forward(self, *args, **kwargs):
            return args

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", Wrapper())
    found = patches.problems()
    assert len(found) == 1 and "model.fused_ops=false" in found[0]


def test_train_refuses_to_start_naming_what_is_missing(monkeypatch, capsys, tmp_path):
    from deepspeed.runtime.zero import partition_parameters as pp

    monkeypatch.setattr(pp.NoGatherCoalescedHandle, "__init__", lambda self, params: None)
    err = refused(["train", f"run_dir={tmp_path / 'run'}"], capsys)
    assert "llara_dist/patches.py" in err and "NoGatherCoalescedHandle" in err
    assert not (tmp_path / "run").exists()
