"""A SmolLM2-135M-shaped Llama with random weights and the tests' character tokenizer, saved to DIR.

Used where the real model cannot travel (bench/finetune_multi.py on a two-GPU machine):

    python bench/make_random_model.py DIR
"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import VOCAB, make_tokenizer, save_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).eval()
save_model(model, make_tokenizer(), Path(sys.argv[1]))
print("params", sum(p.numel() for p in model.parameters()) / 1e6, "M")
