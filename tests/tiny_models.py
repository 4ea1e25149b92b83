"""Tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Glm4MoeConfig,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 512
HIDDEN = 64
LAYERS = 3


def _configs(vocab: int) -> dict:
    common_rope = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128,
                       num_hidden_layers=LAYERS, num_attention_heads=4,
                       max_position_embeddings=256)
    return {
        "llama": LlamaConfig(num_key_value_heads=2, **common_rope),
        "mistral": MistralConfig(num_key_value_heads=2, **common_rope),
        "qwen2": Qwen2Config(num_key_value_heads=2, **common_rope),
        "opt": OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=128,
                         num_hidden_layers=LAYERS, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=HIDDEN),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                           n_positions=256),
        "gpt_neox": GPTNeoXConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128,
                                  num_hidden_layers=LAYERS, num_attention_heads=4,
                                  max_position_embeddings=256),
        "phi3": Phi3Config(num_key_value_heads=4, pad_token_id=0, **common_rope),
        # No adapter for Phi: exercises the generic fallback.
        "phi": PhiConfig(**common_rope),
    }


FAMILIES = tuple(_configs(VOCAB))


def _moe_configs(vocab: int) -> dict:
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=256)
    return {
        "mixtral": MixtralConfig(num_local_experts=4, **common),
        "qwen2_moe": Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, **common),
        "qwen3_moe": Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, head_dim=16,
                                    **common),
        "olmoe": OlmoeConfig(num_experts=4, **common),
        # GLM-4.5's mixture: a shared expert, a sigmoid router with a score-correction bias
        # (one group); its dense first blocks: ``tiny_glm4_moe(dense_blocks=1)``
        "glm4_moe": Glm4MoeConfig(n_routed_experts=4, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=0, n_group=1,
                                  topk_group=1, head_dim=16, **common),
        # DeepSeek-V3's mixture (latent attention: q and kv through low-rank projections;
        # one routing group, as expert removal needs)
        "deepseek_v3": DeepseekV3Config(n_routed_experts=4, moe_intermediate_size=32,
                                        n_shared_experts=1, first_k_dense_replace=0, n_group=1,
                                        topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                        **{**common, "num_key_value_heads": 4}),
        # gpt-oss: biased experts stored transposed with gate and up interleaved, its clamped
        # SwiGLU, a biased router, attention sinks, sliding and full attention in turn
        "gpt_oss": GptOssConfig(num_local_experts=4, head_dim=16,
                                **{**common, "intermediate_size": 32}),
    }


MOE_FAMILIES = tuple(_moe_configs(VOCAB))


def tiny_unsupported_moe(seed: int = 0):
    """A mixture of experts of a family snapprune has no adapter for (Granite-MoE)."""
    from transformers import GraniteMoeConfig

    torch.manual_seed(seed)
    config = GraniteMoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              num_local_experts=4, num_experts_per_tok=2,
                              max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_glm4_moe(dense_blocks: int = 1, seed: int = 0):
    """GLM-4.5's layout whole: ``dense_blocks`` plain MLP blocks first, then mixture blocks."""
    torch.manual_seed(seed)
    config = _moe_configs(VOCAB)["glm4_moe"]
    config.first_k_dense_replace = dense_blocks
    config.num_hidden_layers = dense_blocks + 2
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_deepseek_v2_lite(dense_blocks: int = 1, seed: int = 0):
    """DeepSeek-V2-Lite's layout whole: q without a low-rank step (``q_lora_rank`` None),
    ``dense_blocks`` plain MLP blocks first, a softmax router without a bias."""
    from transformers import DeepseekV2Config

    torch.manual_seed(seed)
    config = DeepseekV2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                              num_hidden_layers=dense_blocks + 2, num_attention_heads=4,
                              num_key_value_heads=4, num_experts_per_tok=2,
                              max_position_embeddings=256, n_routed_experts=4,
                              moe_intermediate_size=32, n_shared_experts=1,
                              first_k_dense_replace=dense_blocks, n_group=1, topk_group=1,
                              q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=16)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_moe_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_moe_configs(VOCAB)[family]).eval()


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    config = _configs(vocab)[family]
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-identical activations; widen them so pruning has work to do.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "emb" not in name and "wte" not in name:
                param.mul_(3.0)
    return model.eval()


def token_batch(nsamples: int = 4, seqlen: int = 32, vocab: int = VOCAB, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (nsamples, seqlen), generator=gen)


DEEP_LAYERS = 6


def deep_llama(vocab: int = VOCAB, seed: int = 0):
    """A random LLaMA of 6 blocks (enough to remove several whole blocks and attention
    sub-layers: prune-depth, search), widths 64 / 128, grouped-query attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=DEEP_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()
