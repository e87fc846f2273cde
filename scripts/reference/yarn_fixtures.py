#!/usr/bin/env python3
"""YaRN parity fixtures (tests/fixtures/tiny-qwen2-yarn, tiny-llama-yarn): tiny random Qwen2 and
Llama checkpoints whose RoPE is YaRN-scaled from 64 original positions by 4, evaluated on 200
tokens (past the original 64) by HF transformers, f32 on CPU. Run by scripts/reference/run.sh."""
from make_fixtures import tiny
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
POSITIONS = (0, 63, 64, 130, 199)

if __name__ == "__main__":
    # Qwen-2.5's model-card form: the config keeps max_position_embeddings at the pre-trained
    # context (64 here, 32768 there) and rope_scaling adds type, factor and original context.
    tiny("tiny-qwen2-yarn", Qwen2ForCausalLM,
         Qwen2Config(**COMMON, max_position_embeddings=64, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64}),
         seed=4, n_tokens=200, positions=POSITIONS)
    # Every YaRN knob set away from its default, on the Llama architecture.
    tiny("tiny-llama-yarn", LlamaForCausalLM,
         LlamaConfig(**COMMON, max_position_embeddings=256, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64, "beta_fast": 16.0,
                                      "beta_slow": 2.0, "attention_factor": 1.2, "truncate": False}),
         seed=5, n_tokens=200, positions=POSITIONS)
