"""Reading PEFT adapters: the scale P = s·BA agrees with PEFT's own delta weights."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from vllm_jd.compress.peft_io import discover, open_adapter


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_matches_peft(rslora, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=24, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=rslora,
                     rank_pattern={"v_proj": 4}, alpha_pattern={"up_proj": 5})
    model = get_peft_model(tiny_llama(), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # PEFT zero-initialises B
    model.save_pretrained(tmp_path / "a")
    adapter = open_adapter("a", tmp_path / "a")
    assert len(adapter.modules) == 2 * 3
    assert adapter.modules["model.layers.1.self_attn.v_proj"].rank == 4
    for module in adapter.modules:
        layer = model.base_model.model.get_submodule(module)
        A, Bt = adapter.factors(module)
        assert torch.allclose(Bt.T @ A, layer.get_delta_weight("default"), atol=1e-5), module
    assert adapter.lora_params == sum(s.rank * (s.d_in + s.d_out) for s in adapter.modules.values())


def test_bin_adapter_reads_like_safetensors(tmp_path, shared_adapters):
    src = shared_adapters / "adapter-0001"
    dst = tmp_path / "bin-adapter"
    shutil.copytree(src, dst)
    torch.save(load_file(str(dst / "adapter_model.safetensors")), dst / "adapter_model.bin")
    (dst / "adapter_model.safetensors").unlink()
    a, b = open_adapter("s", src), open_adapter("b", dst)
    assert a.modules == b.modules
    for m in a.modules:
        assert all(torch.equal(x, y) for x, y in zip(a.factors(m), b.factors(m), strict=True))


def test_discover_folder_of_adapters_and_single(shared_adapters):
    pairs = discover([shared_adapters])
    assert [n for n, _ in pairs] == sorted(p.name for p in shared_adapters.iterdir())
    assert discover([shared_adapters / "adapter-0003"]) == [("adapter-0003", shared_adapters / "adapter-0003")]


def test_checksum_changes_with_content(tmp_path, shared_adapters):
    dst = tmp_path / "c"
    shutil.copytree(shared_adapters / "adapter-0001", dst)
    before = open_adapter("c", dst).checksum()
    assert before == open_adapter("x", shared_adapters / "adapter-0001").checksum()
    (dst / "adapter_config.json").write_text((dst / "adapter_config.json").read_text() + " ")
    assert open_adapter("c", dst).checksum() != before
