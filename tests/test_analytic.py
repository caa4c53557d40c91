"""Analytic FLOPs and bytes (`evaluation.analytic`) against hand computations on a tiny LLaMA and a linear layer,
in float32 and with torchao int8 weights (int8 data, float32 scales, int8 zero points)."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from evaluation.analytic import counted_flops, decode_cost, llm_shape, prefill_cost

torch.set_num_threads(1)

# hidden 16, MLP 24, 2 layers, 4 query heads and 2 KV heads of 4, vocabulary 40, untied head
HIDDEN, MLP, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 16, 24, 2, 4, 2, 4, 40
# per layer: q 16×16, k 16×8, v 16×8, o 16×16, gate 16×24, up 16×24, down 24×16
LAYER_LINEAR = 256 + 128 + 128 + 256 + 384 + 384 + 384
LINEAR = LAYERS * LAYER_LINEAR + VOCAB * HIDDEN  # + LM head
LAYER_OUT_FEATURES = 16 + 8 + 8 + 16 + 24 + 24 + 16  # one int8 scale per output channel
NORMS = LAYERS * 2 * HIDDEN + HIDDEN


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_decode_and_prefill_costs_of_a_float_llama():
    shape = llm_shape(tiny_llama())
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    assert shape.linear_params == LINEAR
    context = 10
    decode = decode_cost(shape, context)
    assert decode["flops"] == 2 * LINEAR + 4 * LAYERS * HEADS * HEAD_DIM * context
    # every float32 tensor once, but only one row of the (untied) input embedding
    weights = 4 * (LAYERS * LAYER_LINEAR + VOCAB * HIDDEN + NORMS + HIDDEN)
    kv = 2 * LAYERS * KV_HEADS * HEAD_DIM * context * 4
    assert decode["weight_bytes"] == weights and decode["kv_cache_bytes"] == kv and decode["bytes"] == weights + kv
    prefill = prefill_cost(shape, 5)
    assert prefill["flops"] == 5 * 2 * LINEAR + 4 * LAYERS * HEADS * HEAD_DIM * 5 * 5
    assert prefill["weight_bytes"] == weights + 4 * (VOCAB - 1) * HIDDEN  # the whole embedding, once


def test_int8_weights_count_their_int8_data_and_scales():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    llm = tiny_llama()
    quantize_(llm, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: isinstance(module, nn.Linear)
              and fqn != "lm_head")
    shape = llm_shape(llm)
    assert shape.linear_params == LINEAR  # a quantized weight keeps its logical shape
    # int8 data + a float32 scale and an int8 zero point per output channel (torchao stores the zero point, 0 when
    # symmetric)
    int8_layers = LAYERS * LAYER_LINEAR * 1 + LAYERS * LAYER_OUT_FEATURES * (4 + 1)
    expected = int8_layers + 4 * (VOCAB * HIDDEN + NORMS + HIDDEN)
    assert decode_cost(shape, 10)["weight_bytes"] == expected


@pytest.mark.parametrize("int8", [False, True])
def test_a_linear_layer_costs_two_in_out_flops_per_token(int8):
    torch.manual_seed(0)
    layer = nn.Linear(8, 16, bias=False)
    if int8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(layer, Int8WeightOnlyConfig())
    tokens = torch.randn(3, 8)
    _, flops = counted_flops(layer, tokens)
    assert flops == 2 * 8 * 16 * 3
